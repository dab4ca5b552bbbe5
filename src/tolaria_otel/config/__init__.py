"""Internal: the ``TOLARIA_*`` and ``OTEL_*`` contracts (names, defaults, parsing, validation, redaction).

The bottom of the package: it imports nothing of it. The public names are re-exported by ``tolaria_otel``.
"""
