"""Self Forcing training on adapters: seconds and peak memory per step of the tiny CPU recipe, and
the memory of one base with two adapters against the three separate models Self Forcing trains.

  per step   `sftools train recipes/tiny-cpu.yaml` in a fresh process: its seconds per iteration
             (a critic update every iteration, a generator update every second) and its peak RSS;
  memory     parameter bytes of one frozen base + generator and critic LoRA adapters (rank r on every
             block Linear) against generator + critic + teacher as three full models, computed from
             the real Wan 2.1 shapes, and measured on a small model as the RSS each layout adds.

    python bench/bench_training.py [--workdir bench/out] [--rank 16]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.measure import WRAPPER  # noqa: E402
from sftools.wan.config import T2V_1_3B, T2V_14B, WanConfig, base_shapes  # noqa: E402

RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "tiny-cpu.yaml")


def adapter_parameters(config: WanConfig, rank: int) -> int:
    """LoRA factors on every block Linear: q k v o of both attentions, and the two FFN layers."""
    d, f = config.dim, config.ffn_dim
    per_block = 8 * rank * (d + d) + rank * (d + f) + rank * (f + d)
    return config.num_layers * per_block


def rss() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) * 1024


def measured_ratio(rank: int) -> tuple[int, int]:
    """RSS added by base + 2 adapters, and by three copies of the model (small Wan, fp32)."""
    from diffusers import WanTransformer3DModel

    from sftools.training.adapters import add_adapters
    from sftools.wan.config import diffusers_config

    small = WanConfig(dim=1024, ffn_dim=4096, num_heads=8, num_layers=8, text_dim=256)
    settings = {k: v for k, v in diffusers_config(small).items() if not k.startswith("_")}
    gc.collect()
    before = rss()
    shared = WanTransformer3DModel(**settings)
    add_adapters(shared, rank)
    one = rss() - before
    del shared
    gc.collect()
    before = rss()
    three = [WanTransformer3DModel(**settings) for _ in range(3)]
    added = rss() - before
    del three
    return one, added


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "out"))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    rss_file = os.path.join(args.workdir, "train-peak-rss")
    run = subprocess.run([sys.executable, "-c", WRAPPER, rss_file, "train", RECIPE, "--set", f"run.steps={args.steps}",
                          "--output-dir", os.path.join(args.workdir, "train-tiny"), "--json"],
                         check=True, capture_output=True, text=True)
    report = json.loads(run.stdout.strip().splitlines()[-1])
    seconds = report["seconds_per_step"][1:]  # the first iteration warms up
    peak = int(open(rss_file).read())
    one, three = measured_ratio(args.rank)

    print(f"tiny recipe ({args.steps} iterations, CPU, {torch.get_num_threads()} threads): "
          f"{sum(seconds) / len(seconds):.2f} s per iteration (critic every one, generator every 2nd), "
          f"peak RSS {peak / 1e6:.0f} MB")
    for name, config in (("Wan2.1 1.3B", T2V_1_3B), ("Wan2.1 14B", T2V_14B)):
        base = sum(torch.Size(s).numel() for s in base_shapes(config).values())
        adapters = 2 * adapter_parameters(config, args.rank)
        print(f"{name}, rank {args.rank}: base + 2 adapters {(base + adapters) / 1e9:.3f}B parameters vs three models "
              f"{3 * base / 1e9:.3f}B: {(base + adapters) / (3 * base):.3f}x")
    print(f"measured on a small model (dim 1024, 8 layers, fp32): base + 2 adapters added {one / 1e6:.0f} MB, "
          f"three models {three / 1e6:.0f} MB: {one / three:.3f}x")


if __name__ == "__main__":
    main()
