"""The files around the package that a wheel user needs too: ``tolaria-otel assets DIR`` writes them.

The OpenTelemetry Collector configurations, Nissa's Prometheus scrape configuration and alert rules
(with their promtool tests), the Grafana dashboards and their provisioning, ``docker-compose.yml``,
``.env.example`` and the docs. In the repository they live at its root (``collector/``,
``dashboards/``, ``docs/``, the README's links point there); the wheel carries a copy of each under
``tolaria_otel/_assets`` (the build copies them, ``setup.py``), and ``DIR`` gets the repository's
layout, so the README's relative links and ``docker compose up`` work from ``DIR``.

Standard library only: ``setup.py`` loads this file for :data:`SOURCES` before the package is built.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

#: What is shipped, relative to the repository root: folders (every file under them) and files.
SOURCES = (
    "collector",
    "dashboards/json",
    "dashboards/provisioning",
    "docs",
    "docker-compose.yml",
    ".env.example",
)
#: Where the wheel keeps them, inside the package.
PACKAGE_FOLDER = "_assets"


class AssetsError(Exception):
    """The assets cannot be written: the message says where and why."""


#: The installed package's folder (this module is ``tolaria_otel/cli/assets.py``).
_PACKAGE = Path(__file__).resolve().parents[1]


def source_root() -> Path:
    """The folder holding :data:`SOURCES`: the wheel's copy, or else the repository of a source checkout."""
    shipped = _PACKAGE / PACKAGE_FOLDER  # pip installs wheels unzipped
    if shipped.is_dir():
        return shipped
    checkout = _PACKAGE.parents[1]  # src/tolaria_otel -> the repository
    if all((checkout / source).exists() for source in SOURCES):
        return checkout
    raise AssetsError(
        f"this installation has no assets: neither {shipped} nor a source checkout around "
        f"{_PACKAGE} holds them; reinstall the package from its wheel"
    )


def asset_files(root: Path) -> Iterator[Path]:
    """Every file of :data:`SOURCES` under ``root``, relative to it, in a stable order."""
    for source in SOURCES:
        path = root / source
        if path.is_file():
            yield Path(source)
            continue
        for found in sorted(path.rglob("*")):
            if found.is_file() and "__pycache__" not in found.parts:
                yield found.relative_to(root)


def write_assets(target: Path, *, force: bool = False) -> list[Path]:
    """Copy every asset into ``target`` (created if missing), keeping the repository's layout.

    Refuses, before writing anything, when a file it would write exists, unless ``force``; other
    files in ``target`` are left alone. Returns the paths written, relative to ``target``.
    """
    root = source_root()
    relative = list(asset_files(root))
    if target.exists() and not target.is_dir():
        raise AssetsError(f"{target} exists and is not a folder")
    existing = [path for path in relative if (target / path).exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more of the files it would write)" if len(existing) > 1 else ""
        raise AssetsError(f"{target / existing[0]} exists{more}: pass --force to overwrite, or give an empty folder")
    for path in relative:
        destination = target / path
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes((root / path).read_bytes())
        except OSError as error:
            raise AssetsError(f"cannot write {destination}: {error.strerror or error}") from None
    return relative
