"""Self Forcing against teacher forcing on a task with a known teacher (sftools/training/experiment.py).

    python bench/experiment_self_forcing.py [--workdir DIR] [--quick] [--full]

Trains the tiny model's causal LoRA students on the CPU (a few minutes), samples each for more blocks
than it was trained on, and writes docs/self_forcing_experiment.md with the distances per block and a
plot (docs/self_forcing_experiment.png, if matplotlib is installed: pip install -e ".[bench]").
Prints its figures last.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace

from sftools.training.experiment import QUICK, STUDENTS, ExperimentResult, ExperimentSettings, run_experiment

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")
LABELS = {"base": "the base as a causal 4-step student, untrained", "ode_init": "ODE init", "teacher_forcing": "teacher forcing",
          "self_forcing": "Self Forcing", "teacher samples": "exact draws of the law (floor)"}


def table(result: ExperimentResult) -> str:
    blocks = len(next(iter(result.distances.values())))
    trained = result.settings.trained_blocks
    head = "| student | " + " | ".join(f"block {b + 1}{' *' if b < trained else ''}" for b in range(blocks))
    head += " | within | beyond | beyond / within |"
    rows = [head, "|" + "---|" * (blocks + 4)]
    for name, values in result.distances.items():
        within = sum(values[:trained]) / trained
        beyond = sum(values[trained:]) / (blocks - trained)
        rows.append(f"| {LABELS[name]} | " + " | ".join(f"{v:.2f}" for v in values)
                    + f" | {within:.2f} | {beyond:.2f} | {beyond / within:.2f} |")
    return "\n".join(rows)


def plot(result: ExperimentResult, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in result.distances.items():
        style = ":" if name == "teacher samples" else "-"
        ax.plot(range(1, len(values) + 1), values, style, marker="o", label=LABELS[name])
    ax.axvspan(0.5, result.settings.trained_blocks + 0.5, color="0.9", label="trained length")
    ax.set_xlabel("block index (3 latent frames each)")
    ax.set_ylabel("Fréchet distance to the teacher's law")
    ax.set_xlim(0.5, len(values) + 0.5)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write_docs(result: ExperimentResult, plotted: bool) -> str:
    s = result.settings
    path = os.path.join(DOCS, "self_forcing_experiment.md")
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    with open(path, "w") as f:
        f.write(f"""# Self Forcing against teacher forcing, with a known teacher

Written by `python bench/experiment_self_forcing.py` (the code is `sftools/training/experiment.py`;
`tests/test_training_experiment.py` runs a smaller version and checks the direction).

**Task.** The teacher is `model.teacher: synthetic`: the exact denoiser of a Gaussian video law
(`sftools/training/synthetic.py`): each latent frame is a prompt's mean plus 4 patterns whose
coefficients follow a stationary AR(1) process over frames (correlation 0.9, standard deviation 2)
plus white noise (0.1). Its samples, its scores and the law of every frame are exact, at any length.
The base is the tiny built-in Wan (2 layers, dim 256), trained in full for {s.base_steps} steps as a
bidirectional flow-matching model on exact draws, so that it knows the task as Wan knows video.

**Students.** {"Whole causal models (full-parameter)" if s.train == "full" else f"Rank-{s.rank} causal LoRAs"}, {s.frames_per_block} latent frames a block, 4 steps:
`ode_init` for {s.ode_steps} iterations on {s.pairs} teacher trajectories, then from that {"model" if s.train == "full" else "LoRA"}
{s.steps} iterations each of `teacher_forcing` and `self_forcing` (the same DMD, critic ratio
{s.critic_ratio}, learning rates {s.lr} / {s.lr_critic}, after {s.lr_ode} for the regression; the
only difference is what fills the cache:
the teacher's video or the student's own blocks). Training videos have {s.trained_blocks} blocks.

**Distance.** Each student samples {s.videos} videos of {s.eval_blocks} blocks with the sampler of
`sftools sample`. For every frame, the Fréchet (2-Wasserstein) distance between the Gaussian fitted to
the videos' pattern coefficients of that frame and the one before it, and the law's exact Gaussian of
the same; averaged per block. This is FID's formula, and here it is exact rather than a proxy: the law
is Gaussian in these coordinates, so a student matches it exactly when these means and covariances do;
pairs of frames make the distance see motion (frame-to-frame correlation), not only each frame's look.
With {s.videos} videos the estimate has a floor: exact draws of the law score the last row.

## Distance to the teacher's law per block (lower is better; * = within the trained length)

{table(result)}

{"![distance per block](self_forcing_experiment.png)" if plotted else "(matplotlib not installed: no plot)"}

Training seconds on this machine's CPU: {seconds}.
""")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where the runs go (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="the test's small settings (about a minute)")
    parser.add_argument("--full", action="store_true", help="whole-model students (model.train: full), as Self "
                        "Forcing trains them, at full-parameter learning rates, instead of LoRAs")
    args = parser.parse_args()
    settings = QUICK if args.quick else ExperimentSettings()
    if args.full:
        settings = replace(settings, train="full", lr_ode=3e-4, lr=1e-4, lr_critic=1e-3)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_experiment(settings, args.workdir or tmp, on_stage=lambda text: print(text, file=sys.stderr))
    os.makedirs(DOCS, exist_ok=True)
    plotted = plot(result, os.path.join(DOCS, "self_forcing_experiment.png"))
    docs = write_docs(result, plotted)
    print(table(result))
    for student in STUDENTS[1:]:
        print(f"{student}: blocks beyond the trained length / within = {result.drift(student):.2f}")
    print(f"written: {docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
