"""Running the sftools CLI in a fresh process and reading that process's own peak RSS.

The child records its VmHWM at exit. (ru_maxrss of a child would count the parent's pages between
fork and exec, and a benchmark parent may just have held a whole checkpoint.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

WRAPPER = """
import atexit, sys
out = sys.argv.pop(1)
def record():
    kb = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]
    open(out, 'w').write(str(int(kb) * 1024))
atexit.register(record)
sys.argv[0] = 'sftools'
from sftools.cli.main import main
main()
"""


def run_sftools(*args: str) -> tuple[float, int]:
    """Run `sftools ARGS...`; returns (wall seconds, peak RSS in bytes) of that process."""
    fd, rss_file = tempfile.mkstemp(prefix="sftools-peak-rss-")
    os.close(fd)
    try:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", WRAPPER, rss_file, *args], check=True)
        seconds = time.perf_counter() - start
        with open(rss_file) as f:
            return seconds, int(f.read())
    finally:
        os.remove(rss_file)
