"""The import path of the PNG plot (``tolaria_otel.plot.render``, ``draw``); ``python -m tolaria_otel.plot RUN.jsonl``
is ``tolaria-otel plot RUN.jsonl``.

The code is in ``tolaria_otel.cli.plot``.
"""

import sys

from .cli.plot import draw, render

__all__ = ["draw", "render"]

if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["plot", *sys.argv[1:]]))
