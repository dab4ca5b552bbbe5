"""Internal: OpenTelemetry: the instruments and their views, the meter provider and its readers, the volume.

The public names (``configure_meter_provider``, ``seed_layer_views``, the metric names) are re-exported by
``tolaria_otel``.
"""
