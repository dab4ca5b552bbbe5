"""The import path of the PNG plot (``tolaria_otel.plot.render``, ``python -m tolaria_otel.plot``).

The code is in ``tolaria_otel.cli.plot``.
"""

from .cli.plot import main, render

__all__ = ["main", "render"]

if __name__ == "__main__":
    raise SystemExit(main())
