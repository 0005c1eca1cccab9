"""Self Forcing against teacher forcing on a task with a known teacher (sftools/training/experiment.py).

    python bench/experiment_self_forcing.py [--seeds 0 1 2 3] [--lora] [--workdir DIR]

For each seed, pretrains the tiny model on the law, trains its causal students on the CPU (about two
minutes a seed), samples each for more blocks than it was trained on, and writes
docs/self_forcing_experiment.md with the distances per block and a plot
(docs/self_forcing_experiment.png, if matplotlib is installed: pip install -e ".[bench]").
tests/test_training_experiment.py runs seed 0 of the same settings. Prints its figures last.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace

from sftools.training.experiment import LORA, MODEL, ExperimentResult, ExperimentSettings, run_experiment

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")
LABELS = {"base": "the base as a causal 4-step student, untrained", "ode_init": "ODE init", "teacher_forcing": "teacher forcing",
          "self_forcing": "Self Forcing", "teacher samples": "exact draws of the law (floor)"}


def block_table(result: ExperimentResult) -> str:
    blocks = len(next(iter(result.distances.values())))
    trained = result.settings.trained_blocks
    head = "| student | " + " | ".join(f"block {b + 1}{' *' if b < trained else ''}" for b in range(blocks))
    rows = [head + " | within | beyond | beyond / within |", "|" + "---|" * (blocks + 4)]
    for name, values in result.distances.items():
        rows.append(f"| {LABELS[name]} | " + " | ".join(f"{v:.2f}" for v in values)
                    + f" | {result.within(name):.2f} | {result.beyond(name):.2f} | {result.drift(name):.2f} |")
    return "\n".join(rows)


def seed_table(results: list[ExperimentResult]) -> str:
    rows = ["| seed | ODE init | teacher forcing | Self Forcing | Self Forcing beyond, against teacher forcing |",
            "|---|---|---|---|---|"]
    for r in results:
        cells = [f"{r.within(s):.2f} / {r.beyond(s):.2f}" for s in ("ode_init", "teacher_forcing", "self_forcing")]
        change = r.beyond("self_forcing") / r.beyond("teacher_forcing") - 1
        rows.append(f"| {r.settings.seed} | " + " | ".join(cells) + f" | {change:+.0%} |")
    return "\n".join(rows)


def summary(results: list[ExperimentResult]) -> str:
    def count(test) -> str:
        return f"{sum(map(test, results))} of {len(results)} seeds"

    return "\n".join([
        f"- Beyond the trained length, Self Forcing is below teacher forcing in "
        f"{count(lambda r: r.beyond('self_forcing') < r.beyond('teacher_forcing'))}, and its error grows "
        f"less (beyond / within) in {count(lambda r: r.drift('self_forcing') < r.drift('teacher_forcing'))}.",
        f"- Within it, Self Forcing is closer to the law than its ODE init in "
        f"{count(lambda r: r.within('self_forcing') < r.within('ode_init'))}, teacher forcing in "
        f"{count(lambda r: r.within('teacher_forcing') < r.within('ode_init'))}.",
        f"- Beyond it, the ODE init is below Self Forcing in "
        f"{count(lambda r: r.beyond('ode_init') < r.beyond('self_forcing'))}: DMD on two-block videos fits "
        "them better than the regression does and pays some of that back in drift.",
    ])


def plot(results: list[ExperimentResult], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    first = results[0]
    for name, values in first.distances.items():
        style = ":" if name == "teacher samples" else "-"
        ax.plot(range(1, len(values) + 1), values, style, marker="o", label=f"{LABELS[name]} (seed {first.settings.seed})")
    for i, r in enumerate(results[1:]):  # the other seeds, faintly: the two students whose difference is the point
        for name, color in (("teacher_forcing", "C2"), ("self_forcing", "C3")):
            values = r.distances[name]
            label = f"{LABELS[name]} (the other seeds)" if i == 0 else None
            ax.plot(range(1, len(values) + 1), values, "-", color=color, alpha=0.3, linewidth=1, label=label)
    ax.axvspan(0.5, first.settings.trained_blocks + 0.5, color="0.9", label="trained length")
    ax.set_xlabel("block index (3 latent frames each)")
    ax.set_ylabel("Fréchet distance to the teacher's law")
    ax.set_xlim(0.5, len(values) + 0.5)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write_docs(results: list[ExperimentResult], plotted: bool) -> str:
    s = results[0].settings
    path = os.path.join(DOCS, "self_forcing_experiment.md")
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in results[0].seconds.items())
    students = "Whole causal models (full-parameter)" if s.train == "full" else f"Rank-{s.rank} causal LoRAs on the base"
    with open(path, "w") as f:
        f.write(f"""# Self Forcing against teacher forcing, with a known teacher

Written by `python bench/experiment_self_forcing.py` (the code is `sftools/training/experiment.py`).
`tests/test_training_experiment.py` runs seed 0 with the same settings and checks the direction.
How these settings were found, and what did not work: [self_forcing_experiment_notes.md](self_forcing_experiment_notes.md).

**Task.** The teacher is `model.teacher: synthetic`: the exact denoiser of a Gaussian video law
(`sftools/training/synthetic.py`): each latent frame is a prompt's mean plus 4 patterns whose
coefficients follow a stationary AR(1) process over frames (correlation 0.9, standard deviation 2)
plus white noise (0.1). Its samples, its scores and the law of every frame are exact, at any length.
The base is the tiny built-in Wan ({MODEL.num_layers} layers, dim {MODEL.dim}, {MODEL.text_len} context rows
instead of 512), trained in full for {s.base_steps} steps as a bidirectional flow-matching model on
exact draws, so that it knows the task as Wan knows video.

**Students.** {students}, {s.frames_per_block} latent frames a block, 4 steps: `ode_init` for
{s.ode_steps} iterations on {s.pairs} teacher trajectories, then from that student {s.steps} iterations
each of `teacher_forcing` and `self_forcing` (the same DMD, critic ratio {s.critic_ratio}, learning
rates {s.lr} / {s.lr_critic}, after {s.lr_ode} for the regression). The only difference between the two
is what fills the cache: the teacher's video or the student's own blocks. Training videos have
{s.trained_blocks} blocks.

**Sampling beyond the trained length.** Each student samples {s.videos} videos of {s.eval_blocks} blocks with the
sampler of `sftools sample`, its KV cache rolling over a window of the trained length
({s.window} latent frames: `--local-attn-frames {s.window}`), as Self Forcing extrapolates (`local_attn_size`).
So every block after the first is made the way the last trained block was, from the block before it
(RoPE positions are relative), and what grows with the block index is the error a student feeds
itself, not positions it never saw.

**Distance.** For every frame, the Fréchet (2-Wasserstein) distance between the Gaussian fitted to
the videos' pattern coefficients of that frame and the one before it, and the law's exact Gaussian of
the same; averaged per block. This is FID's formula, and here it is exact rather than a proxy: the law
is Gaussian in these coordinates, so a student matches it exactly when these means and covariances do;
pairs of frames make the distance see motion (frame-to-frame correlation), not only each frame's look.
With {s.videos} videos the estimate has a floor: exact draws of the law score the last row.

## Distance to the teacher's law per block, seed {s.seed} (lower is better; * = within the trained length)

{block_table(results[0])}

{"![distance per block](self_forcing_experiment.png)" if plotted else "(matplotlib not installed: no plot)"}

Training seconds on this machine's CPU (seed {s.seed}): {seconds}.

## Every seed: distance within / beyond the trained length

Each seed draws its own base weights, pretraining data, teacher trajectories, training noise and
evaluation noise.

{seed_table(results)}

{summary(results)}
""")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--lora", action="store_true", help="rank-16 LoRA students on the base instead of whole models")
    parser.add_argument("--workdir", help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()
    settings = LORA if args.lora else ExperimentSettings()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            workdir = os.path.join(args.workdir or tmp, f"seed{seed}")
            results.append(run_experiment(replace(settings, seed=seed), workdir,
                                          on_stage=lambda text, seed=seed: print(f"seed {seed}: {text}", file=sys.stderr)))
    os.makedirs(DOCS, exist_ok=True)
    plotted = plot(results, os.path.join(DOCS, "self_forcing_experiment.png"))
    docs = write_docs(results, plotted)
    print(block_table(results[0]))
    print(seed_table(results))
    print(summary(results))
    print(f"written: {docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
