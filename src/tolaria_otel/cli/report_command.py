"""``tolaria-otel report``: a run's summaries as one self-contained HTML page (``cli.report``, no extra needed)."""

from __future__ import annotations

import argparse

from .common import CommandError


def run_report_command(args: argparse.Namespace) -> int:
    from .report import write_report  # loaded by the command that writes, not by --help

    try:
        print(write_report(args.summaries, args.output or args.summaries.with_suffix(".html")))
    except (OSError, ValueError) as error:
        raise CommandError(str(error)) from None
    return 0
