"""Record what ComfyUI, Kijai's WanVideoWrapper and Wan2GP (with mmgp) do with the test LoRAs.

Their code is GPL-3 (ComfyUI, mmgp), under a custom licence (Wan2GP) or of no stated licence in the
snapshot read (the wrapper), so none of it is in this repository: this script runs it from checkouts
elsewhere and writes `observed.json`, which `test_lora_loaders.py` holds `lora check` to. Run it
again after a loader changes, with the commits it read:

    python tests/loaders/derive.py --comfyui COMFYUI_DIR --wrapper NODES_MODEL_LOADING_PY \\
        --wan2gp WAN2GP_DIR --mmgp MMGP_SRC_DIR [--deps DIR] --out tests/loaders/observed.json

- ComfyUI: `comfy.lora.model_lora_keys_unet` on a Wan state dict (its unet_config has no
  num_res_blocks, as Wan's), `comfy.lora_convert.convert_lora`, `comfy.lora.load_lora`, the key
  filter of `ModelPatcher.add_patches` (keys of the model's state dict) and `comfy.lora.calculate_weight`:
  `load_lora_for_models` without the model object. `comfy.model_base` is a stub of the classes
  `model_lora_keys_unet` tests with isinstance (a Wan model is none of them).
- The wrapper: its `standardize_lora_key_format` (taken from the file given), then the ComfyUI path.
- Wan2GP: `WanModel.preprocess_loras` (taken from models/wan/modules/model.py; `wgp.test_class_i2v`
  stubbed: the model kind is the LoRA's), mmgp's `load_loras_into_model` on a module tree with Wan's
  names, then mmgp's own forwards (`offload._lora_linear_forward` for Linear modules, probed with an
  identity input; `offload._lora_generic_forward` for the rest) give the weights each module runs with.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import sys
import tempfile
import types

import torch
from safetensors.torch import load_file

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from loaders.cases import FOR_SOURCES, base, cases, fingerprint, for_loader, write  # noqa: E402
from loaders.observe import observe  # noqa: E402
from loaders.runners import module_tree  # noqa: E402

READ = {
    "comfyui": "Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832",
    "wanvideowrapper": "kijai/ComfyUI-WanVideoWrapper@3317577052282dbd76e3fe3c4f72c8321d761523 nodes_model_loading.py, "
                       "then ComfyUI as above",
    "wan2gp": "deepbeepmeep/Wan2GP@8681e9f777f9f847f74a0bdefd13d5b9a6efe12d with mmgp 3.7.12 (PyPI; the functions "
              "used are those of deepbeepmeep/mmgp@04b8d1fb8c29145759067bc5369a0c597e027828)",
}
_MODEL_BASE_CLASSES = ("StableCascade_C", "SD3", "AuraFlow", "PixArt", "HunyuanDiT", "Flux", "GenmoMochi",
                       "HunyuanVideo", "HiDream", "ACEStep", "Omnigen2", "QwenImage")


def _function(path: str, name: str, owner: str | None = None, namespace: dict | None = None):
    """A function (or method of class `owner`) of a source file, compiled on its own."""
    tree = ast.parse(pathlib.Path(path).read_text())
    body = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == owner).body if owner else tree.body
    fn = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name)
    ns = dict(namespace or {})
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), ns)
    return ns[name]


def comfy_runner(comfy_dir: str):
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    stub = types.ModuleType("comfy.model_base")
    for cls in _MODEL_BASE_CLASSES:
        setattr(stub, cls, type(cls, (), {}))
    sys.modules["comfy.model_base"] = comfy.model_base = stub
    import comfy.lora
    import comfy.lora_convert

    def run(lora: dict, weights: dict) -> dict:
        model_sd = {"diffusion_model." + k: v for k, v in weights.items()}
        model = types.SimpleNamespace(state_dict=lambda: model_sd, model_config=types.SimpleNamespace(unet_config={}))
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora)),
                                       comfy.lora.model_lora_keys_unet(model, {}), log_missing=False)
        out = {k: v.clone() for k, v in weights.items()}
        for key, patch in patches.items():
            if key in model_sd:
                out[key[len("diffusion_model."):]] = comfy.lora.calculate_weight(
                    [(1.0, patch, 1.0, None, None)], model_sd[key].clone(), key)
        return out

    return run


def wan2gp_runner(wan2gp_dir: str, mmgp_dir: str):
    sys.path.insert(0, mmgp_dir)
    from mmgp import offload

    sys.modules["wgp"] = types.SimpleNamespace(test_class_i2v=lambda kind: kind == "i2v")
    preprocess = _function(os.path.join(wan2gp_dir, "models/wan/modules/model.py"), "preprocess_loras", "WanModel",
                           {"torch": torch})

    def run(path: str, weights: dict, kind: str) -> dict:
        model = module_tree(weights)
        data = {m: {} for m in model.modules() if m is not model and hasattr(m, "weight")}
        model._loras_model_data, model._loras_model_shortcuts = data, {}
        owner = types.SimpleNamespace(vace_layers=[])
        offload.load_loras_into_model(model, [path], preprocess_sd=lambda sd: preprocess(owner, kind, sd))
        if getattr(model, "_loras_errors", []):
            raise RuntimeError(model._loras_errors)
        model._loras_active_adapters, model._loras_scaling = ["0"], {"0": 1.0}
        mm = offload.offload.__new__(offload.offload)
        out = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, module in model.named_modules():
            if "0" in data.get(module, {}):
                data[module]["0_GPU"] = list(data[module]["0"])
                out.update(_effective(mm, model, name, module, data[module]))
        return out

    return run


@torch.no_grad()
def _effective(mm, model, name: str, module, lora_data) -> dict:
    """The weight (and bias) `module` runs with under mmgp's forward."""
    if isinstance(module, torch.nn.Linear):
        n = module.weight.shape[1]
        y = mm._lora_linear_forward(model, module, lora_data, torch.cat([torch.eye(n), torch.zeros(1, n)]))
        out = {f"{name}.weight": (y[:-1] - y[-1]).T}
        return out | ({f"{name}.bias": y[-1]} if module.bias is not None else {})
    bias = getattr(module, "bias", None)
    seen = mm._lora_generic_forward(model, module, lora_data, lambda: (module.weight.clone(), bias is not None and bias.clone()))
    return {f"{name}.weight": seen[0]} | ({f"{name}.bias": seen[1]} if bias is not None else {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for flag in ("--comfyui", "--wrapper", "--wan2gp", "--mmgp", "--out"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--deps", help="a folder of packages mmgp imports (optimum-quanto), if not installed")
    args = ap.parse_args()
    if args.deps:
        sys.path.append(args.deps)
    comfy = comfy_runner(args.comfyui)
    standardize = _function(args.wrapper, "standardize_lora_key_format")
    wan2gp = wan2gp_runner(args.wan2gp, args.mmgp)
    runs = {
        "comfyui": lambda path, weights, kind: comfy(load_file(path), weights),
        "wanvideowrapper": lambda path, weights, kind: comfy(standardize(load_file(path)), weights),
        "wan2gp": wan2gp,
    }
    observed, prints = {name: {} for name in runs}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for case, (kind, tensors, metadata) in cases().items():
            path, prints[case] = write(f"{tmp}/{case}.safetensors", tensors, metadata), fingerprint(tensors)
            for name, run in runs.items():
                observed[name][case] = _record(observe(lambda: run(path, base(kind), kind), tensors, base(kind)))
        for name, run in runs.items():
            for source in FOR_SOURCES:
                kind, case = cases()[source][0], f"{source}_for_{name}"
                path, tensors, _ = for_loader(tmp, source, name)
                prints[case] = fingerprint(tensors)
                observed[name][case] = _record(observe(lambda: run(path, base(kind), kind), tensors, base(kind)), True)
    with open(args.out, "w") as f:  # not stdout: mmgp prints as it loads
        json.dump({"read": READ, "fingerprints": prints, "observed": observed}, f, indent=1, sort_keys=True)


def _record(seen: dict, deltas: bool = False) -> dict:
    if seen["unexplained"]:
        raise SystemExit(f"changes no key explains: {seen['unexplained']}")
    out = {"applied": len(seen["applied"]), "ignored": seen["ignored"], "refused": seen["refused"]}
    return out | ({"deltas": seen["deltas"]} if deltas else {})


if __name__ == "__main__":
    main()
