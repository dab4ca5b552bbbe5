"""Write the dashboards' JSON into ``dashboards/json/`` (``make dashboards``), or check it (``--check``).

The JSON is committed so that Grafana provisioning (and a reviewer) needs no Python; the test suite
fails when it and this generator disagree.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard

from . import seed_layers

JSON_DIR = Path(__file__).resolve().parent / "json"
DASHBOARDS: dict[str, Callable[[], Dashboard]] = {"tolaria-seed-layers.json": seed_layers.build}


def to_json(dashboard: Dashboard) -> str:
    return json.dumps(dashboard, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def rendered() -> dict[str, str]:
    """File name -> the JSON text the generator makes for it."""
    return {name: to_json(build()) for name, build in DASHBOARDS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is not up to date")
    parser.add_argument("--out", type=Path, default=JSON_DIR, help=f"folder to write (default {JSON_DIR})")
    args = parser.parse_args(argv)
    stale = []
    for name, text in rendered().items():
        path = args.out / name
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(path)
    if stale:
        print(f"out of date (run `make dashboards`): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
