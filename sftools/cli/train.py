"""sftools train."""

from __future__ import annotations

import click

from sftools.cli.common import JSON_OPTION, emit


@click.command("train", short_help="Retrain causal LoRA adapters with Self Forcing.")
@click.argument("recipe", metavar="RECIPE.yaml")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key by its dotted path (run.steps=20, optim.lr=1e-4); repeatable.")
@click.option("--output-dir", metavar="DIR", help="Where checkpoints and final/ go (default: runs/<recipe name>).")
@click.option("--resume", metavar="DIR", help="Continue from a run folder or one of its checkpoints.")
@JSON_OPTION
def train_cmd(recipe, overrides, output_dir, resume, as_json) -> None:
    """Train the generator (a LoRA adapter on the frozen causal base) with Self Forcing: self-rollouts
    with the KV cache and DMD against the base as teacher, a critic adapter learning the generator's
    distribution. At the end DIR/final/lora.safetensors (comfyui form; lora_diffusers.safetensors
    beside it) is ready for `sftools sample --lora`. `accelerate launch -m sftools train ...` runs
    the same recipe on several processes. With model.train: full (small models) the generator and
    critic are whole copies of the base and the result is DIR/final/model.safetensors. With model.vace
    (or a VACE base) the add-on is retrained for causal use under data.controls, the base frozen, and
    the result is DIR/final/vace_module.safetensors."""
    import os

    from sftools.training.config import load_recipe
    from sftools.training.trainer import Trainer

    settings = load_recipe(recipe, list(overrides))
    output_dir = output_dir or os.path.join("runs", os.path.splitext(os.path.basename(recipe))[0])
    trainer = Trainer(settings, output_dir)
    if resume:
        trainer.resume(resume)

    def log(entry) -> None:
        if trainer.accelerator.is_main_process and not as_json:
            click.echo(f"step {entry.iteration + 1}/{settings.run.steps}: {entry.describe()}, {entry.seconds:.2f} s")

    report = trainer.train(log)
    if trainer.accelerator.is_main_process:
        emit(report, as_json, [f"{output_dir}: trained to step {report['steps']} on {report['processes']} process(es); "
                               f"{', '.join(report['outputs'].values())}"])
