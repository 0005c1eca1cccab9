"""Quantized outputs (`convert --dtype fp8_e4m3fn_scaled`, `convert --quant`) read back through
gguf-py, ComfyUI-GGUF's own loader and ComfyUI's scaled-fp8 loading rules, every tensor within its
type's bound; refusals are one line and leave nothing behind.

The rules of ComfyUI (GPL-3, not copied) are restated here as data with their line numbers; the
rules of ComfyUI-GGUF (Apache-2.0) are run from its vendored code (tests/upstream/gguf_loader.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct

import gguf
import numpy as np
import pytest
import torch
from cli_runner import run
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file, save_file
from upstream.gguf_loader import UPSTREAM_DIR, VENDORED_BLOBS, linear_weight, load_state_dict

from sftools.convert import convert_model
from sftools.errors import QuantizationError, SftoolsError
from sftools.io.lazy import LazyTensor
from sftools.io.output import write_ordered
from sftools.io.sources import open_checkpoint
from sftools.wan.config import PRESETS
from sftools.wan.fp8 import scaled_fp8_tensors
from sftools.wan.source import load_model
from sftools.wan.tiny import random_state_dict, write_a14b, write_checkpoint

QUANTS = ("Q8_0", "Q5_0", "Q4_0", "F16", "BF16")
FLF2V = dataclasses.replace(PRESETS["tiny-i2v"], model_type="flf2v")
MODELS = {"t2v": PRESETS["tiny"], "i2v": PRESETS["tiny-i2v"], "flf2v": FLF2V, "vace": PRESETS["tiny-vace"]}

# ComfyUI a125cd84 comfy/ldm/wan/model.py: the modules built with `operations.Linear`, which
# comfy/ops.py:379-390 `scaled_fp8_op` creates in the marker's fp8 dtype with a float32 `scale_weight`.
COMFY_WAN_LINEARS = re.compile(
    r"^(vace_)?blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)\.weight$"  # l.52-55 (self and cross attention)
    r"|^blocks\.\d+\.cross_attn\.(k_img|v_img)\.weight$"  # l.123-124 (WanI2VCrossAttention)
    r"|^(vace_)?blocks\.\d+\.ffn\.[02]\.weight$"  # l.205-206
    r"|^vace_blocks\.\d+\.(before_proj|after_proj)\.weight$"  # l.266-267 (VaceWanAttentionBlock)
    r"|^head\.head\.weight$"  # l.343
    r"|^img_emb\.proj\.[13]\.weight$"  # l.370-371 (MLPProj)
    r"|^(text_embedding|time_embedding)\.[02]\.weight$|^time_projection\.1\.weight$")  # l.478-483
# city96/ComfyUI-GGUF 795e4515 tools/lcpp.patch l.389-397 (LLM_ARCH_WAN): names never quantized, and
# l.426-428: image models quantize 2-D tensors only.
CITY96_NOT_QUANTIZED = ("modulation.", "patch_embedding.", "text_embedding.", "time_projection.",
                        "time_embedding.", "img_emb.", "head.")
FLOAT_TYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def source_state(kind: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return random_state_dict(MODELS[kind], seed=7, dtype=dtype)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{(kind, dtype): (path, state)}: a Self Forcing .pt (t2v) and original safetensors files."""
    folder = tmp_path_factory.mktemp("quant_sources")
    out = {}
    for kind, dtype in [("t2v", torch.float32), ("i2v", torch.float32), ("flf2v", torch.float32),
                        ("vace", torch.float32), ("t2v", torch.bfloat16)]:
        state = source_state(kind, dtype)
        layout = "self-forcing" if (kind, dtype) == ("t2v", torch.float32) else "original"
        name = f"{kind}_{str(dtype)[6:]}" + (".pt" if layout == "self-forcing" else ".safetensors")
        out[kind, dtype] = write_checkpoint(str(folder / name), state, layout, MODELS[kind]), state
    return out


def gguf_expected_type(name: str, t: torch.Tensor, quant: str) -> str:
    """What city96's rules store: 2-D tensors outside the kept parts in the requested type, the
    other 2-D ones in the source's float type (not quantized), everything else F32 (1-D:
    tools/convert.py l.274-277; `.modulation`: keys_hiprec l.102-104; 5-D patch embeddings:
    tools/fix_5d_tensors.py `add_extra_key` F32; FLF2V's emb_pos is an nn.Parameter like modulation)."""
    if t.dim() != 2:
        return "F32"
    return FLOAT_TYPES[t.dtype] if any(part in name for part in CITY96_NOT_QUANTIZED) else quant


def reference_dequantized(x: torch.Tensor, quant: str) -> torch.Tensor:
    """llama.cpp's reference rounding (ggml-quants.c, as gguf 0.19.0 quants.py restates it), written
    again here in torch: blocks of 32 along the rows, an fp16 scale per block."""
    if quant in ("F16", "BF16"):
        return x.to(torch.float16 if quant == "F16" else torch.bfloat16).float()
    blocks = x.float().reshape(-1, 32)
    if quant == "Q8_0":
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        inv = torch.where(d == 0, 0.0, 1 / d)
        v = blocks * inv
        q = torch.sign(v) * torch.floor(v.abs() + 0.5)  # round half away from zero
    else:
        levels = {"Q5_0": 16, "Q4_0": 8}[quant]
        largest = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))  # signed, first of equals
        d = largest / -levels
        inv = torch.where(d == 0, 0.0, 1 / d)
        q = torch.trunc(blocks * inv + (levels + 0.5)).clamp(0, 2 * levels - 1) - levels
    return (q * d.half().float()).reshape(x.shape)


def bound(x: torch.Tensor, quant: str) -> torch.Tensor:
    """The per-element error bound of the module docstring of sftools/io/quantize.py, derived anew:
    half a step of the block (Q8_0) or one step (Q5_0/Q4_0, whose top code is clipped on the side
    opposite the largest value), plus the float16 rounding of the block scale times the largest code."""
    if quant in ("F16", "BF16"):
        return x.abs() * (2.0**-11 if quant == "F16" else 2.0**-8) + 2.0**-24
    blocks = x.float().reshape(-1, 32)
    levels, steps = {"Q8_0": (127, 0.5), "Q5_0": (16, 1.0), "Q4_0": (8, 1.0)}[quant]
    d = blocks.abs().amax(dim=1, keepdim=True) / levels
    per_block = steps * d + levels * ((d - d.half().float()).abs() + d * 1e-6)
    return per_block.expand_as(blocks).reshape(x.shape)


def gguf_values(tensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ------------------------------------------------------------------------------------------------
# GGUF


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("kind", ["t2v", "i2v", "flf2v", "vace"])
def test_gguf_reads_back_through_gguf_py_every_tensor_in_its_type_and_bound(sources, tmp_path, kind, quant):
    src, state = sources[kind, torch.float32]
    out = str(tmp_path / f"{kind}-{quant}.gguf")
    report = convert_model(src, out, quant=quant.lower())
    reader = gguf.GGUFReader(out)
    assert reader.get_field("general.architecture").contents() == "wan"
    assert reader.get_field("general.file_type").contents() == gguf.LlamaFileType[f"MOSTLY_{quant}"]
    assert reader.get_field("general.quantization_version").contents() == gguf.GGML_QUANT_VERSION
    assert sorted(t.name for t in reader.tensors) == sorted(state)
    for t in reader.tensors:
        x = state[t.name]
        assert t.tensor_type.name == gguf_expected_type(t.name, x, quant), t.name
        assert tuple(reversed(t.shape.tolist())) == tuple(x.shape), t.name
        values = gguf_values(t).reshape(x.shape)
        if t.tensor_type == Q.F32:
            assert bits(values) == bits(x), t.name  # high precision: bit for bit
        else:
            assert torch.equal(values, reference_dequantized(x, quant)), t.name
            assert ((values - x).abs() <= bound(x, quant)).all(), t.name
    assert report["dtypes"][quant] == sum(1 for t in reader.tensors if t.tensor_type.name == quant) > 0
    assert report["bytes"] == sum(int(t.n_bytes) for t in reader.tensors)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("kind", ["i2v", "vace"])
def test_gguf_loads_in_comfyui_gguf_with_exact_shapes_and_values_within_bound(sources, tmp_path, kind, quant):
    src, state = sources[kind, torch.float32]
    out = str(tmp_path / "m.gguf")
    convert_model(src, out, quant=quant)
    loaded, arch = load_state_dict(out)
    assert arch == "wan" and set(loaded) == set(state)
    plain = {t.name: gguf_values(t) for t in gguf.GGUFReader(out).tensors}
    for name, x in state.items():
        assert tuple(loaded[name].shape) == tuple(x.shape), name  # what ComfyUI's model detection reads
        if x.dim() != 2:
            # Plain torch tensors (F32) viewed to their shape: modulation and emb_pos become nn.Parameters
            # of ComfyUI's Wan model, which could not take raw quantized bytes.
            assert loaded[name].tensor_type == Q.F32
            assert bits(loaded[name].as_subclass(torch.Tensor)) == bits(x), name
            continue
        layer = name.removesuffix(".weight")
        weight, bias = linear_weight(loaded[name], loaded.get(layer + ".bias"), torch.float32)
        exact, _ = linear_weight(loaded[name], None, torch.float32, dequant_dtype=torch.float32)
        assert torch.equal(exact, plain[name].reshape(x.shape)), name  # ComfyUI-GGUF's dequant = gguf-py's
        stored = gguf_expected_type(name, x, quant)
        if stored.startswith("Q"):
            # The node's default dequantizes in float16 arithmetic: one more float16 rounding.
            assert ((weight - x).abs() <= bound(x, quant) + weight.abs() * 2.0**-11 + 2.0**-24).all(), name
        elif stored == quant:
            assert ((weight - x).abs() <= bound(x, quant)).all(), name
        else:
            assert bits(weight) == bits(x), name
        assert layer + ".bias" not in state or bits(bias) == bits(state[layer + ".bias"]), name


def test_gguf_of_a_bf16_source_keeps_its_unquantized_tensors_bf16_bit_for_bit(sources, tmp_path):
    src, state = sources["t2v", torch.bfloat16]
    out = str(tmp_path / "bf16.gguf")
    convert_model(src, out, quant="Q8_0")
    types = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert types["time_projection.1.weight"].tensor_type == Q.BF16
    assert types["blocks.0.norm3.weight"].tensor_type == Q.F32
    for name, x in state.items():
        if types[name].tensor_type != Q.Q8_0:
            assert bits(gguf_values(types[name]).reshape(x.shape).to(x.dtype)) == bits(x), name
    loaded, _ = load_state_dict(out)
    weight, _ = linear_weight(loaded["head.head.weight"], None, torch.float32)
    assert bits(weight.bfloat16()) == bits(state["head.head.weight"])


def test_dtype_casts_before_quantizing_so_the_unquantized_tensors_take_it(sources, tmp_path):
    src, state = sources["t2v", torch.float32]
    out = str(tmp_path / "m.gguf")
    report = convert_model(src, out, dtype="fp16", quant="Q4_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["text_embedding.0.weight"] == Q.F16 and types["blocks.1.ffn.2.weight"] == Q.Q4_0
    assert types["head.modulation"] == Q.F32 and report["quant"] == "Q4_0"


def test_each_source_tensor_is_read_once_and_the_writer_streams(sources, tmp_path, monkeypatch):
    """One tensor at a time: every source tensor is produced exactly once, for GGUF and for scaled
    fp8 (whose scale and weight come from one read)."""
    _, state = sources["vace", torch.float32]
    counts: dict[str, int] = {}

    def counted(name: str, t: torch.Tensor) -> LazyTensor:
        def load() -> torch.Tensor:
            counts[name] = counts.get(name, 0) + 1
            return t
        return LazyTensor(t.dtype, tuple(t.shape), load)

    from sftools.io.gguf_io import write_gguf
    from sftools.wan.gguf_form import ARCH, file_type, gguf_tensors

    lazy = {n: counted(n, t) for n, t in state.items()}
    write_gguf(str(tmp_path / "m.gguf"), gguf_tensors(lazy, "Q8_0"), ARCH, file_type("Q8_0"), {})
    assert counts == dict.fromkeys(state, 1)
    counts.clear()
    write_ordered(str(tmp_path / "m.safetensors"), scaled_fp8_tensors(lazy), {})
    assert counts == dict.fromkeys(state, 1)


# ------------------------------------------------------------------------------------------------
# Scaled fp8


def comfy_scaled_fp8_load(stored: dict[str, torch.Tensor], model_keys: list[str]) -> dict[str, torch.Tensor]:
    """The weights ComfyUI computes with, by its rules at a125cd84 (restated, not copied):
    model_detection.py:693-702 pops `scaled_fp8` and takes its dtype (float32 read as e4m3fn) for the
    weights; ops.py:379-396 makes every Linear in that dtype with `scale_weight` = ones((), float32);
    model_base.py:292-300 loads the file with strict=False, casting each tensor into its parameter
    (missing ones keep their defaults); ops.py:412-417 uses weight * scale_weight. Other parameters
    load in the compute dtype (sd.py:1319-1326), float32 here."""
    stored = dict(stored)
    marker = stored.pop("scaled_fp8")
    weight_dtype = torch.float8_e4m3fn if marker.dtype == torch.float32 else marker.dtype
    out = {}
    for key in model_keys:
        if COMFY_WAN_LINEARS.match(key):
            scale = stored.get(key.removesuffix(".weight") + ".scale_weight", torch.ones((), dtype=torch.float32))
            out[key] = stored[key].to(weight_dtype).float() * scale.float()
        else:
            out[key] = stored[key].float()
    return out


@pytest.mark.parametrize("kind,dtype", [("t2v", torch.float32), ("i2v", torch.float32), ("flf2v", torch.float32),
                                        ("vace", torch.float32), ("t2v", torch.bfloat16)])
def test_scaled_fp8_is_comfyuis_form_and_loads_by_its_rules_within_the_fp8_bound(sources, tmp_path, kind, dtype):
    src, state = sources[kind, dtype]
    out = str(tmp_path / "m_fp8_e4m3fn_scaled.safetensors")
    report = convert_model(src, out, dtype="fp8_e4m3fn_scaled")
    stored = load_file(out)
    linears = sorted(k for k in state if COMFY_WAN_LINEARS.match(k))
    assert linears == sorted(k for k in state if k.endswith(".weight") and state[k].dim() == 2)
    assert set(stored) == set(state) | {k.removesuffix(".weight") + ".scale_weight" for k in linears} | {"scaled_fp8"}
    marker = stored["scaled_fp8"]
    assert (marker.dtype, tuple(marker.shape)) == (torch.float8_e4m3fn, (0,))  # model_base.py:326-327
    for key in linears:
        w, scale = state[key].float(), stored[key.removesuffix(".weight") + ".scale_weight"]
        assert (scale.dtype, tuple(scale.shape)) == (torch.float32, ())
        assert scale == w.abs().max() / 448
        assert bits(stored[key]) == bits((w / scale).to(torch.float8_e4m3fn)), key
    for key in set(state) - set(linears):
        assert stored[key].dtype == dtype and bits(stored[key]) == bits(state[key]), key
    loaded = comfy_scaled_fp8_load(stored, list(state))
    for key, x in state.items():
        scale = stored.get(key.removesuffix(".weight") + ".scale_weight")
        limit = x.float().abs() / 16 + scale / 1024 if key in linears else 0
        assert ((loaded[key] - x.float()).abs() <= limit).all(), key
    assert report["dtypes"]["float8_e4m3fn"] == len(linears) + 1  # and the marker


def test_scaled_fp8_file_is_aligned_and_a_weight_alone_still_loads(sources, tmp_path):
    _, state = sources["i2v", torch.float32]
    ordered = scaled_fp8_tensors({n: LazyTensor.of(t) for n, t in state.items()})
    path = str(tmp_path / "m.safetensors")
    write_ordered(path, ordered, {})
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    itemsize = {"F32": 4, "F8_E4M3": 1}
    assert all(v["data_offsets"][0] % itemsize[v["dtype"]] == 0 for k, v in header.items() if k != "__metadata__")
    alone = dict(scaled_fp8_tensors({n: LazyTensor.of(t) for n, t in state.items()}))["head.head.weight"].load()
    assert bits(alone) == bits(load_file(path)["head.head.weight"])


def test_scaled_fp8_of_a_scaled_fp8_file_is_that_file_again(sources, tmp_path):
    src, _ = sources["vace", torch.float32]
    first, second = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    convert_model(src, first, dtype="fp8_e4m3fn_scaled")
    report = convert_model(first, second, dtype="fp8_e4m3fn_scaled")
    a, b = load_file(first), load_file(second)
    assert set(a) == set(b) and all(bits(a[k]) == bits(b[k]) for k in a)
    assert any("dequantized" in n for n in report["notes"])


# ------------------------------------------------------------------------------------------------
# Reading both forms back, and the LoRA commands on a scaled-fp8 base


def test_inspect_and_scan_read_both_forms_back(sources, tmp_path, capsys):
    src, state = sources["i2v", torch.float32]
    gguf_path, fp8_path = str(tmp_path / "m.gguf"), str(tmp_path / "m.safetensors")
    convert_model(src, gguf_path, quant="Q5_0")
    convert_model(src, fp8_path, dtype="fp8_e4m3fn_scaled")
    for path, quantized in ((gguf_path, "Q5_0"), (fp8_path, "float8_e4m3fn")):
        code, out, _ = run(capsys, "inspect", path, "--json")
        info = json.loads(out)
        assert code == 0 and info["kind"] == "wan2.1 i2v" and info["dtypes"][quantized] > 0
        assert not info["missing"] and not info["unexpected"] and not info["mismatched"]
        code, out, _ = run(capsys, "scan", path, "--json")
        scan = json.loads(out)
        assert code == 0 and scan["safe"] and scan["bytes"] == _tensor_bytes(path)
    assert json.loads(run(capsys, "scan", gguf_path, "--json")[1])["metadata"]["general.architecture"] == "wan"


def _tensor_bytes(path: str) -> int:
    """What the file stores for its tensors: GGUF's sizes per tensor, safetensors' data section."""
    if path.endswith(".gguf"):
        return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
    with open(path, "rb") as f:
        return os.path.getsize(path) - 8 - struct.unpack("<Q", f.read(8))[0]


def test_a_gguf_source_reads_as_its_dequantized_values(sources, tmp_path):
    src, state = sources["t2v", torch.float32]
    path = str(tmp_path / "m.gguf")
    convert_model(src, path, quant="Q8_0")
    ckpt = open_checkpoint(path)
    values = {t.name: gguf_values(t) for t in gguf.GGUFReader(path).tensors}
    assert {n: t.stored for n, t in ckpt.tensors.items() if t.stored} == {
        n: "Q8_0" for n, x in state.items() if gguf_expected_type(n, x, "Q8_0") == "Q8_0"}
    for name, t in ckpt.tensors.items():
        assert torch.equal(t.load(), values[name].reshape(state[name].shape)), name


def test_a_gguf_with_comfy_orig_shape_fields_reads_in_that_shape_and_damage_is_one_line(tmp_path):
    """ComfyUI-GGUF's loader takes `comfy.gguf.orig_shape.<name>` over the stored dims (loader.py
    l.16-24, l.108-110); its converter writes it for rows reshaped to 256 (tools/convert.py l.287-295)."""
    path = str(tmp_path / "x.gguf")
    writer = gguf.GGUFWriter(path, "wan")
    data = np.arange(3 * 512, dtype=np.float32).reshape(6, 256)
    writer.add_array("comfy.gguf.orig_shape.x", [3, 2, 256])
    writer.add_tensor("x", gguf.quants.quantize(data, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert open_checkpoint(path).tensors["x"].shape == (3, 2, 256)
    with open(path, "rb") as f:
        head = f.read(os.path.getsize(path) - 100)
    cut = str(tmp_path / "cut.gguf")
    with open(cut, "wb") as f:
        f.write(head)
    with pytest.raises(SftoolsError, match=r"cut\.gguf: gguf cannot read the file") as info:
        open_checkpoint(cut)
    assert "\n" not in str(info.value)


def test_lora_extract_and_merge_take_a_scaled_fp8_base(sources, tmp_path, capsys):
    """A LoRA of a rank-2 change made on the fp8 base's dequantized weights merges back onto that
    base to the changed weights: both commands read the base as weight times scale, not as codes."""
    src, _ = sources["t2v", torch.float32]
    base = str(tmp_path / "base_fp8.safetensors")
    convert_model(src, base, dtype="fp8_e4m3fn_scaled")
    weights = {n: t.load() for n, t in load_model(base, dequant=True).tensors.items()}
    changed = {n: w + 0.05 * torch.randn(w.shape[0], 2) @ torch.randn(2, w.shape[1]) if w.dim() == 2 else w
               for n, w in weights.items()}
    tuned = write_checkpoint(str(tmp_path / "tuned.safetensors"), changed, "original", MODELS["t2v"])
    lora, merged = str(tmp_path / "lora.safetensors"), str(tmp_path / "merged.safetensors")
    assert run(capsys, "lora", "extract", base, tuned, "-o", lora, "--rank", "2", "--dtype", "fp32")[0] == 0
    assert run(capsys, "lora", "merge", base, lora, "-o", merged)[0] == 0
    result = load_file(merged)
    assert set(result) == set(changed)  # scales and marker were read as such, not merged as weights
    for name, w in changed.items():
        assert torch.allclose(result[name].float(), w, atol=1e-4), name


# ------------------------------------------------------------------------------------------------
# Refusals: one line, exit 1 or 2, no output


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, sources):
    folder = tmp_path_factory.mktemp("bad")
    lora = str(folder / "lora.safetensors")
    save_file({"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.ones(2, 32),
               "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.ones(64, 2)}, lora)
    from sftools.wan.tiny_parts import write_tiny_vae

    vae = os.path.join(write_tiny_vae(str(folder / "pipe")), "vae")
    state = source_state("t2v")
    state["blocks.1.ffn.0.weight"][3, 5] = float("inf")
    inf = write_checkpoint(str(folder / "inf.safetensors"), state, "original", MODELS["t2v"])
    a14b = write_a14b(str(folder / "a14b"), {"high_noise": source_state("t2v"), "low_noise": source_state("t2v")})
    return {"pt": sources["t2v", torch.float32][0], "lora": lora, "vae": vae, "inf": inf, "a14b": a14b}


REFUSALS = [
    (["{pt}", "o.gguf", "--quant", "Q4_K"], 2, "K-quants"),
    (["{pt}", "o.gguf", "--quant", "Q5_K_M"], 2, "gguf-py can only dequantize"),
    (["{pt}", "o.gguf", "--quant", "Q9_0"], 2, "is not one of Q8_0, Q5_0, Q4_0, F16, BF16"),
    (["{pt}", "o.safetensors", "--quant", "Q8_0"], 2, "--quant writes GGUF; give a name ending in .gguf"),
    (["{pt}", "o.gguf"], 2, "a GGUF output needs --quant"),
    (["{pt}", "o.gguf", "--quant", "Q8_0", "--dtype", "fp8_e4m3fn_scaled"], 2, "two output forms"),
    (["{pt}", "o.gguf", "--quant", "Q8_0", "--layout", "diffusers"], 2, "original Wan names"),
    (["{pt}", "o.gguf", "--quant", "Q8_0", "--max-shard-size", "1GB"], 2, "one file"),
    (["{pt}", "o.gguf", "--dtype", "fp8_e4m3fn_scaled"], 2, "a GGUF output needs --quant"),
    (["{pt}", "o.pt", "--dtype", "fp8_e4m3fn_scaled"], 1, "give a name ending in .safetensors"),
    (["{lora}", "o.gguf", "--quant", "Q8_0"], 1, "lora.safetensors: is a LoRA, not a model"),
    (["{lora}", "o.safetensors", "--dtype", "fp8_e4m3fn_scaled"], 1, "is a LoRA, not a model"),
    (["{vae}", "o.gguf", "--quant", "Q8_0"], 1, "vae: is not a Wan model"),
    (["{vae}", "o.safetensors", "--dtype", "fp8_e4m3fn_scaled"], 1, "is not a Wan model"),
    (["{a14b}", "o.gguf", "--quant", "Q8_0"], 1, "quantize each into its own file"),
    (["{inf}", "o.gguf", "--quant", "Q8_0"], 1, "tensor blocks.1.ffn.0.weight: holds inf or nan, which Q8_0 cannot"),
    (["{inf}", "o.safetensors", "--dtype", "fp8_e4m3fn_scaled"], 1, "blocks.1.ffn.0.weight: holds inf or nan"),
    (["{pt}", "{pt}", "--dtype", "fp8_e4m3fn_scaled"], 1, "is the input"),
]


@pytest.mark.parametrize("args,code,message", REFUSALS, ids=[f"{' '.join(a[1:])}" for a, _, _ in REFUSALS])
def test_bad_input_is_one_line_with_its_exit_code_and_leaves_no_output(bad_inputs, tmp_path, capsys, args, code, message):
    argv = [a.format(**bad_inputs) if "{" in a else (str(tmp_path / a) if a.startswith("o.") else a) for a in args]
    listing = sorted(os.listdir(tmp_path))
    got, out, err = run(capsys, "convert", *argv)
    assert (got, out) == (code, "") and message in err and "Traceback" not in err, err
    error_lines = [line for line in err.splitlines() if "rror" in line]
    assert len(error_lines) == 1 and message in error_lines[0], err
    assert sorted(os.listdir(tmp_path)) == listing  # no output, no temporary file


def test_values_outside_the_bound_are_caught_before_the_rename(sources, tmp_path, monkeypatch):
    """The check can fail: a quantizer that breaks one value is refused and nothing is written."""
    import sftools.io.quantize as quantize

    real = quantize.quants.quantize

    def off_by_one(data, qtype):
        out = real(data, qtype).copy()
        out.reshape(-1)[-1] ^= 0x40  # a high bit of the last code of the last block
        return out

    monkeypatch.setattr(quantize.quants, "quantize", off_by_one)
    src, _ = sources["t2v", torch.float32]
    with pytest.raises(QuantizationError, match="beyond the type's error bound"):
        convert_model(src, str(tmp_path / "m.gguf"), quant="Q8_0")
    assert os.listdir(tmp_path) == []


def test_the_comfyui_gguf_files_are_vendored_unchanged():
    vendored = {p for p in os.listdir(UPSTREAM_DIR) if not p.startswith("__")}
    assert vendored == set(VENDORED_BLOBS) | {"NOTICE.md"}
    for name, blob in VENDORED_BLOBS.items():
        data = (UPSTREAM_DIR / name).read_bytes()
        assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob, name
