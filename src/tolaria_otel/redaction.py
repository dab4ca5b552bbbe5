"""The import path docs/operations.md names for the log filter (``tolaria_otel.redaction.install_log_redaction``).

The code is in ``tolaria_otel.config.redaction``.
"""

from .config.redaction import install_log_redaction, redact, redacted_url

__all__ = ["install_log_redaction", "redact", "redacted_url"]
