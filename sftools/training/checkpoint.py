"""Training checkpoints without pickles: tensors in safetensors, everything else in JSON.

`--resume` reads a folder a user points at, so it gets the same treatment as any other input: no
`torch.load`. A checkpoint is written to a temporary folder and renamed when complete; the last N
are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from sftools.errors import SftoolsError

STEP_DIR = re.compile(r"^step-(\d{7})$")


def _flatten_optimizer(prefix: str, state: dict, tensors: dict, meta: dict) -> None:
    meta[prefix] = {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        meta[prefix]["state"][str(index)] = sorted(values)
        for key, value in values.items():
            tensors[f"{prefix}.{index}.{key}"] = value.detach().cpu().contiguous()


def _unflatten_optimizer(prefix: str, tensors: dict, meta: dict) -> dict:
    # A plain optimizer keys its state by parameter index, a gathered FSDP one by parameter name.
    state = {int(i) if i.isdigit() else i: {k: tensors[f"{prefix}.{i}.{k}"] for k in keys}
             for i, keys in meta[prefix]["state"].items()}
    return {"state": state, "param_groups": meta[prefix]["param_groups"]}


def save_checkpoint(run_dir: str, step: int, tensors: dict[str, torch.Tensor], optimizers: dict[str, dict],
                    info: dict, keep: int) -> str:
    """`run_dir/checkpoints/step-NNNNNNN/` holding `state.safetensors` and `state.json`."""
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:07d}")
    tmp = final + f".tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"step": step, **info}
    for name, state in optimizers.items():
        _flatten_optimizer(f"optimizer.{name}", state, flat, meta)
    save_file(flat, os.path.join(tmp, "state.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(meta, f, indent=1)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(n for n in os.listdir(root) if STEP_DIR.match(n))[:-keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def latest_checkpoint(path: str) -> str:
    """A checkpoint folder, or the newest one of a run folder."""
    if os.path.isfile(os.path.join(path, "state.json")):
        return path
    root = os.path.join(path, "checkpoints")
    steps = sorted(n for n in os.listdir(root) if STEP_DIR.match(n)) if os.path.isdir(root) else []
    if not steps:
        raise SftoolsError(f"{path}: no checkpoint to resume from (no checkpoints/step-NNNNNNN/ with state.json)")
    return os.path.join(root, steps[-1])


def load_checkpoint(path: str, optimizers: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict]:
    folder = latest_checkpoint(path)
    try:
        with open(os.path.join(folder, "state.json")) as f:
            meta = json.load(f)
        tensors = load_file(os.path.join(folder, "state.safetensors"))
        states = {name: _unflatten_optimizer(f"optimizer.{name}", tensors, meta) for name in optimizers}
    except (OSError, ValueError, KeyError) as exc:
        raise SftoolsError(f"{folder}: not a complete sftools training checkpoint ({exc})") from None
    return {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}, states, meta
