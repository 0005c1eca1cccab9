"""Quantized conversion throughput and memory on Wan 2.1 14B shapes.

Writes a bf16 safetensors Wan model with the real 14B tensors (dim 5120, ffn 13824: embeddings,
time projection, head and `--blocks` whole blocks), then in one run:
  baseline   a plain file copy of the same bytes (shutil.copyfile), measured before and after
  Q8_0       `sftools convert X.safetensors Y.gguf --quant Q8_0` in a fresh process
  fp8        `sftools convert X.safetensors Y.safetensors --dtype fp8_e4m3fn_scaled` in a fresh process
(each reads, quantizes, checks every value against its bound, writes and reads back), and prints
throughput as a ratio to the copy (of source bytes) and each process's peak RSS as a ratio to the
largest tensor.

    python bench/bench_quant.py [--blocks 2] [--workdir bench/out]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.measure import block_args, run_sftools, timed_copy  # noqa: E402
from sftools.io.lazy import LazyTensor  # noqa: E402
from sftools.io.output import write_file  # noqa: E402
from sftools.wan.config import T2V_14B, model_shapes  # noqa: E402


def make_model(path: str, blocks: int) -> tuple[int, str, int]:
    """A bf16 14B-shaped model with `blocks` blocks, written one tensor at a time (each drawn when
    the writer asks for it); returns (bytes, name and bytes of the largest tensor)."""
    shapes = {k: s for k, s in model_shapes(T2V_14B).items()
              if not k.startswith("blocks.") or int(k.split(".")[1]) < blocks}

    def draw(seed: int, shape: tuple[int, ...]) -> LazyTensor:
        gen = torch.Generator().manual_seed(seed)
        return LazyTensor(torch.bfloat16, shape, lambda: (torch.randn(shape, generator=gen) * 0.02).bfloat16())

    tensors = {k: draw(i, tuple(s)) for i, (k, s) in enumerate(shapes.items())}
    write_file(path, tensors, {"format": "pt"})
    largest = max(tensors, key=lambda k: tensors[k].nbytes)
    return sum(t.nbytes for t in tensors.values()), largest, tensors[largest].nbytes


def main() -> None:
    args = block_args(2, "0.7 GB bf16")
    src = os.path.join(args.workdir, "wan14b_shapes_bf16.safetensors")
    outputs = {"Q8_0": (os.path.join(args.workdir, "wan14b_shapes-Q8_0.gguf"), "--quant", "Q8_0"),
               "fp8": (os.path.join(args.workdir, "wan14b_shapes_fp8_e4m3fn_scaled.safetensors"),
                       "--dtype", "fp8_e4m3fn_scaled")}
    print(f"writing a bf16 Wan model of 14B tensors with {args.blocks} blocks ...", flush=True)
    total, largest_name, largest = make_model(src, args.blocks)
    file_bytes = os.path.getsize(src)
    timed_copy(src, src + ".warm")  # bring the source into the page cache for every contender

    copy_before = timed_copy(src, src + ".copy")
    runs = {}
    for form, (dst, *flags) in outputs.items():
        seconds, peak = run_sftools("convert", src, dst, *flags)
        start = time.perf_counter()
        os.sync()
        runs[form] = (seconds + time.perf_counter() - start, peak, os.path.getsize(dst))
    copy_time = (copy_before + timed_copy(src, src + ".copy")) / 2
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import sftools.convert"], check=True)  # torch, numpy, gguf
    startup = time.perf_counter() - start

    lines = [f"source: {file_bytes / 1e9:.2f} GB bf16 safetensors ({args.blocks} blocks of Wan 2.1 14B plus its "
             f"embeddings and head), largest tensor {largest_name} {largest / 1e6:.0f} MB",
             f"copy (baseline, mean of before/after): {copy_time:.2f} s = {file_bytes / copy_time / 1e9:.2f} GB/s",
             f"interpreter start-up with what convert imports (torch, numpy, gguf): {startup:.2f} s"]
    for form, (seconds, peak, out_bytes) in runs.items():
        lines += [f"{form}: {seconds:.2f} s = {total / seconds / 1e9:.2f} GB/s of source, output "
                  f"{out_bytes / 1e9:.2f} GB; throughput vs copy {copy_time / seconds:.2f}x "
                  f"({copy_time / (seconds - startup):.2f}x excluding start-up); peak RSS {peak / 1e9:.2f} GB = "
                  f"{peak / largest:.2f}x the largest tensor, {(peak - largest) / 1e9:.2f} GB above it"]
    print("\n" + "\n".join(lines))
    for path in [src] + [dst for dst, *_ in outputs.values()]:
        os.remove(path)


if __name__ == "__main__":
    main()
