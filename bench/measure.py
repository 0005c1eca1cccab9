"""Running the sftools CLI in a fresh process and reading that process's own peak RSS, and what
the conversion benchmarks share: their options and the plain-copy baseline.

The child records its VmHWM at exit. (ru_maxrss of a child would count the parent's pages between
fork and exec, and a benchmark parent may just have held a whole checkpoint.)
"""

from __future__ import annotations

import argparse
import os
import shutil
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


def block_args(default_blocks: int, block_size: str) -> argparse.Namespace:
    """`--blocks N` (Wan 14B blocks to write) and `--workdir DIR` (created)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=default_blocks, help=f"14B blocks to write ({block_size} each)")
    parser.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    return args


def timed_copy(src: str, dst: str) -> float:
    """Seconds to copy `src` to `dst` and sync it to disk (the baseline); `dst` is removed."""
    start = time.perf_counter()
    shutil.copyfile(src, dst)
    os.sync()
    elapsed = time.perf_counter() - start
    os.remove(dst)
    return elapsed
