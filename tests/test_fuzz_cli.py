"""The command-line fuzz run of docs/operations.md ("Configuration checks and doctor"), smaller: every
hand-picked value and a few random ones per variable; no crash and no silent wrong result."""

import pytest

from devtools import fuzz_cli

pytestmark = pytest.mark.slow


def test_fuzzed_cli_inputs_are_all_clear(capsys):
    status = fuzz_cli.main_(["--random", "3", "--show", "crash", "--show", "silent wrong"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out.splitlines()[-1].endswith("| 0 | 0 |"), out
