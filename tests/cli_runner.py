"""The command line run in the test process (no interpreter start-up per call), as users call it."""

from __future__ import annotations

import sys

from sftools.cli.main import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `sftools ARGS...`."""
    old, sys.argv = sys.argv, ["sftools", *args]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = old
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err
