"""``tolaria-otel assets DIR``: write the files around the package (``tolaria_otel.assets``) into a folder."""

from __future__ import annotations

import argparse

from .common import CommandError


def run_assets_command(args: argparse.Namespace) -> int:
    from .assets import AssetsError, write_assets

    try:
        written = write_assets(args.folder, force=args.force)
    except AssetsError as error:
        raise CommandError(str(error)) from None
    folders = sorted({path.parts[0] for path in written})
    print(f"wrote {len(written)} files to {args.folder}: {', '.join(folders)}")
    return 0
