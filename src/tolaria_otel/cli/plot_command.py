"""``tolaria-otel plot``: render a run's summaries to a PNG (``tolaria_otel.plot``, which needs matplotlib)."""

from __future__ import annotations

import argparse

from .common import CommandError


def run_plot_command(args: argparse.Namespace) -> int:
    try:
        from .plot import render

        print(render(args.summaries, args.output or args.summaries.with_suffix(".png")))
    except (OSError, ValueError, ImportError) as error:
        raise CommandError(str(error)) from None
    return 0
