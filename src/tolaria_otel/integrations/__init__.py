"""The framework callbacks: ``tolaria_otel.lightning`` and ``tolaria_otel.transformers`` are their import paths."""
