"""Files written by torch itself, in both formats, read back bit-exactly by the symbolic reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sftools.convert import convert_model as convert
from sftools.errors import SftoolsError
from sftools.io.torch_pickle import read_pickle_checkpoint, scan_pickle

FORMATS = {"zip": {}, "legacy": {"_use_new_zipfile_serialization": False}}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (NaN-safe, unlike torch.equal), including dtype and shape."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.contiguous().reshape(-1).view(torch.uint8).tolist() == b.contiguous().reshape(-1).view(torch.uint8).tolist()


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g)
    special = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40, 65504.0])
    out = {
        "f32": base, "f64": base.double(), "f16": base.half(), "bf16": base.bfloat16(),
        "f32_special": special, "bf16_special": special.bfloat16(),
        "i64": torch.arange(-7, 8).reshape(3, 5), "i32": torch.arange(15, dtype=torch.int32),
        "i16": torch.arange(-3, 3, dtype=torch.int16), "i8": torch.arange(-4, 4, dtype=torch.int8),
        "u8": torch.arange(0, 250, 7, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "c64": torch.complex(base, -base), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
        "u16": torch.arange(0, 60000, 999).to(torch.uint16), "u32": torch.tensor([0, 2**32 - 1], dtype=torch.uint32),
        "u64": torch.tensor([0, 2**63 - 1], dtype=torch.uint64),
        "f8_e4m3": base.to(torch.float8_e4m3fn), "f8_e5m2": base.to(torch.float8_e5m2),
    }
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_dtype_torch_saves_reads_back_bit_exact(tmp_path, fmt):
    tensors = every_dtype()
    path = tmp_path / "all.pt"
    torch.save(tensors, path, **FORMATS[fmt])
    ckpt = read_pickle_checkpoint(str(path))
    assert ckpt.format == f"torch-{fmt}"
    assert set(ckpt.tensors) == set(tensors)
    for name, t in tensors.items():
        assert same_bytes(ckpt.tensors[name].load(), t), name


@pytest.mark.parametrize("fmt", FORMATS)
def test_views_tied_and_strided_tensors_read_back_bit_exact(tmp_path, fmt):
    big = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    linear = torch.nn.Linear(4, 3)
    tensors = {
        "big": big,
        "slice_rows": big[2:5],  # nonzero storage offset into a shared storage
        "slice_cols": big[:, 3:6],  # offset and non-contiguous
        "transposed": big.t(),
        "every_other": big[::2, ::3],
        "expanded": torch.arange(4.0).expand(5, 4),  # stride 0 over a storage smaller than the tensor
        "channels_last": torch.randn(2, 3, 2, 2).to(memory_format=torch.channels_last),
        "tied_a": linear.weight, "tied_b": linear.weight,  # one Parameter twice (a memo get)
        "bias": linear.bias,
    }
    tensors["tied_c"] = torch.nn.Parameter(big.view(-1)[8:16])  # same storage, another offset
    path = tmp_path / "views.pt"
    torch.save(tensors, path, **FORMATS[fmt])
    scan = scan_pickle(str(path))
    assert scan.safe, scan.refusals
    assert scan.tensors["tied_a"].storage.key == scan.tensors["tied_b"].storage.key
    ckpt = read_pickle_checkpoint(str(path))
    for name, t in tensors.items():
        assert same_bytes(ckpt.tensors[name].load(), t.detach().contiguous()), name

    out = tmp_path / "views.safetensors"
    report = convert(str(path), str(out))
    assert any("share storage" in n for n in report["notes"])
    written = load_file(str(out))
    assert set(written) == set(tensors)
    for name, t in tensors.items():
        assert same_bytes(written[name], t.detach().contiguous()), name


def test_protocol_4_pickles_with_stack_global_and_memoize_are_read(tmp_path):
    tensors = {"a": torch.randn(4, 4), "b": torch.arange(6).reshape(2, 3)}
    path = tmp_path / "p4.pt"
    torch.save(tensors, path, pickle_protocol=4)
    scan = scan_pickle(str(path))
    assert scan.safe, scan.refusals
    assert {"STACK_GLOBAL", "MEMOIZE", "FRAME"} <= scan.opcodes
    ckpt = read_pickle_checkpoint(str(path))
    for name, t in tensors.items():
        assert same_bytes(ckpt.tensors[name].load(), t)


def test_nested_training_checkpoint_keeps_structure_and_skips_non_tensors_with_notes(tmp_path):
    w = torch.randn(3, 3)
    obj = {
        "generator_ema": {"model.blocks.0.w": w},
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]},
        "epoch": np.int64(7),  # a numpy scalar: weights_only torch.load chokes on these
        "lr": np.float64(1e-5),
        "step": 12,
    }
    path = tmp_path / "train.pt"
    torch.save(obj, path)
    scan = scan_pickle(str(path))
    assert scan.safe, scan.refusals
    assert set(scan.tensors) == {"generator_ema/model.blocks.0.w", "optimizer/state/0/exp_avg"}
    assert scan.skipped["epoch"].startswith("numpy")
    ckpt = read_pickle_checkpoint(str(path))
    assert any("'epoch'" in n for n in ckpt.notes)
    assert same_bytes(ckpt.tensors["generator_ema/model.blocks.0.w"].load(), w)


def test_complex128_is_refused_by_name_because_safetensors_cannot_store_it(tmp_path):
    path = tmp_path / "c128.pt"
    torch.save({"ok": torch.ones(2), "blocks.0.z": torch.ones(2, dtype=torch.complex128)}, path)
    with pytest.raises(SftoolsError, match="blocks.0.z"):
        convert(str(path), str(tmp_path / "out.safetensors"))
    assert not (tmp_path / "out.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c128.pt"]
