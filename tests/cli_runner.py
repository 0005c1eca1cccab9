"""The command line run in the test process (no interpreter start-up per call), as users call it."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass

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


@dataclass
class Completed:
    """What a test reads of a finished `subprocess.run(..., capture_output=True, text=True)`."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def completed(*args: str, cwd: str | None = None) -> Completed:
    """`sftools ARGS...` in this process, run in `cwd` if given, its output captured without capsys
    (so module-scoped fixtures can call it too); returns what `subprocess.run` would."""
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code, _, _ = run(None, *args)
    finally:
        os.chdir(here)
    return Completed(["sftools", *args], code, out.getvalue(), err.getvalue())
