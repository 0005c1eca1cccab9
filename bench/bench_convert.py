"""Conversion throughput and memory on a multi-GB fp32 checkpoint with real Wan 14B shapes.

Writes a torch zip `.pt` of whole Wan 2.1 14B blocks (fp32, 1.4 GB a block), then in one run:
  baseline  a plain file copy of the same bytes (shutil.copyfile), measured before and after
  convert   `sftools convert X.pt Y.safetensors --dtype bf16` in a fresh process (read, cast,
            stream-write, read back and compare), with its peak RSS from the kernel
and prints throughput as a ratio to the copy, and peak RSS as a ratio to the largest tensor.

    python bench/bench_convert.py [--blocks 4] [--workdir bench/out]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.measure import block_args, run_sftools, timed_copy  # noqa: E402
from sftools.wan.config import T2V_14B, base_shapes  # noqa: E402


def make_checkpoint(path: str, blocks: int) -> tuple[int, int]:
    shapes = {k: v for k, v in base_shapes(T2V_14B).items() if any(k.startswith(f"blocks.{i}.") for i in range(blocks))}
    gen = torch.Generator().manual_seed(0)
    state = {f"model.{k}": torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    torch.save({"generator_ema": state}, path)
    sizes = [t.numel() * 4 for t in state.values()]
    return sum(sizes), max(sizes)


def main() -> None:
    args = block_args(4, "1.4 GB fp32")
    src = os.path.join(args.workdir, "wan14b_blocks_fp32.pt")
    dst = os.path.join(args.workdir, "wan14b_blocks_bf16.safetensors")
    print(f"writing {args.blocks} Wan 14B blocks as an fp32 torch checkpoint ...", flush=True)
    total, largest = make_checkpoint(src, args.blocks)
    file_bytes = os.path.getsize(src)
    timed_copy(src, dst + ".warm")  # bring the source into the page cache for both contenders

    copy_before = timed_copy(src, dst + ".copy")
    convert_time, peak_rss = run_sftools("convert", src, dst, "--dtype", "bf16")
    start = time.perf_counter()
    os.sync()
    convert_time += time.perf_counter() - start
    copy_after = timed_copy(src, dst + ".copy")
    copy_time = (copy_before + copy_after) / 2
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sftools", "--help"], check=True, capture_output=True)
    startup = time.perf_counter() - start

    print(f"""
source: {file_bytes / 1e9:.2f} GB fp32 torch zip ({args.blocks} blocks of Wan 2.1 14B), largest tensor {largest / 1e6:.0f} MB
copy (baseline, mean of before/after): {copy_time:.2f} s = {file_bytes / copy_time / 1e9:.2f} GB/s
convert to bf16 safetensors, verified: {convert_time:.2f} s = {file_bytes / convert_time / 1e9:.2f} GB/s of source
interpreter + torch start-up alone (sftools --help): {startup:.2f} s
throughput vs copy, whole command: {copy_time / convert_time:.2f}x   (goal >= 0.5x)
throughput vs copy, excluding start-up: {copy_time / (convert_time - startup):.2f}x
peak RSS of the convert process: {peak_rss / 1e9:.2f} GB = {peak_rss / largest:.2f}x the largest tensor; \
{(peak_rss - largest) / 1e9:.2f} GB above it   (goal: under 1 GB + the largest tensor)""")
    os.remove(src)
    os.remove(dst)


if __name__ == "__main__":
    main()
