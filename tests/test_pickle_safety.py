"""A malicious corpus, built in each test, that sftools must refuse without running any of it.

Every hostile file carries a payload that creates a sentinel file when pickle or torch would run it.
For each file the tests check that `scan_pickle` refuses it and names what it found, that the
globals it references are reported (also when the stream breaks after the payload), that `convert`
raises `SftoolsError` and leaves nothing behind, and that the sentinel never appears. Control tests
run the same payloads through `pickle.loads` or `torch.load(weights_only=False)` and show the
sentinel does appear there, so the sentinel check is able to fail.

Cases follow the threat model of the project's reference notes (`../shared/reference/safe_conversion.md`,
sections 1, 5 and 6, beside this repository), which restate public sources: torch's own loader
(`torch/serialization.py`, `torch/_weights_only_unpickler.py`), the picklescan and fickling advisories
(CVE-2025-1716, CVE-2025-1889, CVE-2025-1944, CVE-2025-1945, CVE-2025-10155/10156/10157,
GHSA-9gvj-pp9x-gcfr, GHSA-5j3x-jp52-966f), ReversingLabs' nullifAI write-up (Feb 2025) and
CVE-2026-24747 (record sizes that disagree with their storage).
"""

from __future__ import annotations

import builtins
import collections
import functools
import io
import json
import os
import pickle
import pickletools
import pydoc
import runpy
import shlex
import struct
import subprocess
import sys
import tarfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

import sftools.io.pickle_vm as pickle_vm
from cli_runner import completed
from sftools.convert import convert_model as convert
from sftools.errors import SftoolsError
from sftools.io.torch_pickle import scan_pickle

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

LEGACY = {"_use_new_zipfile_serialization": False}
ONES2 = struct.pack("<2f", 1.0, 1.0)  # the bytes of torch.ones(2)


# --- payloads ----------------------------------------------------------------------------------


def shell_cmd(sentinel: Path) -> str:
    return f"touch {shlex.quote(str(sentinel))}"


def py_code(sentinel: Path) -> str:
    return f"open({str(sentinel)!r}, 'w').close()"


class Payload:
    """An object whose pickle is `func(*args)`: what a booby-trapped checkpoint holds."""

    def __init__(self, func: Callable, *args: Any):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def uni(text: str) -> bytes:
    """BINUNICODE: a length-prefixed str argument."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def short(text: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4)."""
    raw = text.encode()
    assert len(raw) < 256
    return b"\x8c" + bytes([len(raw)]) + raw


def os_system_pickle(sentinel: Path, module: str = "posix") -> bytes:
    """Protocol 2: GLOBAL module.system, then REDUCE with the command."""
    return b"\x80\x02c" + module.encode() + b"\nsystem\n" + uni(shell_cmd(sentinel)) + b"\x85R."


def torch_saved(obj: Any, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


# --- torch-like files built by hand ------------------------------------------------------------


class StorageStub:
    def __init__(self, key: str, numel: int, cls: type = torch.FloatStorage):
        self.key, self.numel, self.cls = key, numel, cls


class TensorStub:
    """Pickles exactly like a float tensor: `_rebuild_tensor_v2(storage, offset, size, stride, ...)`."""

    def __init__(self, storage: StorageStub, size: tuple[int, ...], stride: tuple[int, ...] | None = None):
        self.storage, self.size = storage, size
        self.stride = stride if stride is not None else tuple(torch.empty(size).stride())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.size, self.stride, False, collections.OrderedDict())


class TorchPickler(pickle.Pickler):
    """Writes storages as the zip format's persistent ids: ('storage', class, key, location, numel)."""

    def persistent_id(self, obj: Any):
        if isinstance(obj, StorageStub):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def torch_pickle(obj: Any, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    TorchPickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def ones_state(extra: dict | None = None, numel: int = 2, size: tuple[int, ...] = (2,)) -> dict:
    return {"w": TensorStub(StorageStub("0", numel), size), **(extra or {})}


def write_zip(path: Path, records: list[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate-name case
        with zipfile.ZipFile(path, "w", compression) as z:
            for name, data in records:
                z.writestr(name, data)
    return path


def torch_zip(path: Path, data_pkl: bytes, *, byteorder: bytes = b"little", storage: bytes = ONES2,
              compression: int = zipfile.ZIP_STORED, extra: tuple[tuple[str, bytes], ...] = ()) -> Path:
    """The records torch.save writes: archive/data.pkl, byteorder, data/0, version."""
    records = [("archive/data.pkl", data_pkl), ("archive/byteorder", byteorder),
               ("archive/data/0", storage), ("archive/version", b"3\n"), *extra]
    return write_zip(path, records, compression)


def central_entries(raw: bytes):
    """(central directory position, name, local header offset) of each entry of a plain zip."""
    eocd = raw.rfind(b"PK\x05\x06")
    count, _size, offset = struct.unpack_from("<HII", raw, eocd + 10)
    pos = offset
    for _ in range(count):
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", raw, pos + 28)
        (local,) = struct.unpack_from("<I", raw, pos + 42)
        yield pos, raw[pos + 46 : pos + 46 + name_len], local
        pos += 46 + name_len + extra_len + comment_len


def patch_zip(path: Path, record: str, *, flags: int = 0, local_name: str | None = None) -> None:
    """Set general-purpose flag bits (central and local) or rename the local header only."""
    raw = bytearray(path.read_bytes())
    for pos, name, local in list(central_entries(bytes(raw))):
        if name == record.encode():
            raw[pos + 8] |= flags
            raw[local + 6] |= flags
            if local_name is not None:
                assert len(local_name) == len(name)
                raw[local + 30 : local + 30 + len(name)] = local_name.encode()
    path.write_bytes(bytes(raw))


class TinyScripted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x)


# --- the corpus ----------------------------------------------------------------------------------


@dataclass
class Case:
    build: Callable[[Path, Path], Path]  # (folder, sentinel) -> the hostile file
    words: tuple[str, ...]  # each must appear in the scan's refusals
    globals: tuple[str, ...] = ()  # each must be listed in scan.globals
    trigger: str | None = None  # how the payload runs outside sftools: "pickle" or "torch"
    convert_names_refusal: bool = True  # False: convert routes the file to another reader


# Gadgets: (payload factory, the global the scan must report). os.system pickles as posix.system.
GADGETS: dict[str, tuple[Callable[[Path, Path], Any], tuple[str, ...]]] = {
    "os_system": (lambda s, d: Payload(os.system, shell_cmd(s)), ("posix.system",)),
    # Protocol 2 writes builtins as __builtin__ (fix_imports); Python 3 maps it back on load.
    "builtins_exec": (lambda s, d: Payload(builtins.exec, py_code(s)), ("__builtin__.exec",)),
    "builtins_eval": (lambda s, d: Payload(builtins.eval, py_code(s)), ("__builtin__.eval",)),
    # ... and subprocess as commands (its Python 2 name).
    "subprocess_popen": (lambda s, d: Payload(subprocess.Popen, ["touch", str(s)]), ("commands.Popen",)),
    "pydoc_pipepager": (lambda s, d: Payload(pydoc.pipepager, "", shell_cmd(s)), ("pydoc.pipepager",)),
    "runpy_run_code": (lambda s, d: Payload(runpy._run_code, py_code(s), {}), ("runpy._run_code",)),
    "functools_partial_torch_load": (
        lambda s, d: Payload(functools.partial(torch.load, str(_inner_file(s, d)), weights_only=False)),
        ("functools.partial", "torch.serialization.load"),
    ),
    "numpy_object_array": (
        lambda s, d: np.array([Payload(os.system, shell_cmd(s))], dtype=object), ("posix.system",),
    ),
}


def _inner_file(sentinel: Path, folder: Path) -> Path:
    inner = folder / "inner.pt"
    torch.save(Payload(os.system, shell_cmd(sentinel)), inner)
    return inner


def saved_case(gadget: str, legacy: bool = False) -> Case:
    make, names = GADGETS[gadget]

    def build(d: Path, s: Path) -> Path:
        path = d / "model.pt"
        torch.save({"w": torch.ones(2), "x": make(s, d)}, path, **(LEGACY if legacy else {}))
        return path

    return Case(build, names, names, "torch")


def nested_case(legacy: bool) -> Case:
    def build(d: Path, s: Path) -> Path:
        inner = torch_saved({"x": Payload(os.system, shell_cmd(s))})
        path = d / "model.pt"
        torch.save({"w": torch.ones(2), "x": Payload(torch.storage._load_from_bytes, inner)}, path,
                   **(LEGACY if legacy else {}))
        return path

    return Case(build, ("nested pickle",), ("torch.storage._load_from_bytes",), "torch")


def raw_case(data: Callable[[Path], bytes], words: tuple[str, ...], globals_: tuple[str, ...],
             name: str = "model.pkl", trigger: str | None = "pickle", named: bool = True) -> Case:
    def build(d: Path, s: Path) -> Path:
        path = d / name
        path.write_bytes(data(s))
        return path

    return Case(build, words, globals_, trigger, named)


def zip_case(data_pkl: Callable[[Path], bytes], words: tuple[str, ...], globals_: tuple[str, ...] = (),
             trigger: str | None = "torch", **zip_kwargs: Any) -> Case:
    def build(d: Path, s: Path) -> Path:
        return torch_zip(d / "model.pt", data_pkl(s), **zip_kwargs)

    return Case(build, words, globals_, trigger)


def evil_data_pkl(protocol: int = 2, gadget: str = "os_system") -> Callable[[Path], bytes]:
    return lambda s: torch_pickle(ones_state({"x": GADGETS[gadget][0](s, s.parent)}), protocol)


# Hand-crafted streams.
def importlib_chain(s: Path) -> bytes:
    # getattr(importlib.import_module("os"), "system")(cmd)
    return (b"\x80\x02cbuiltins\ngetattr\ncimportlib\nimport_module\n" + uni("os") + b"\x85R"
            + uni("system") + b"\x86R" + uni(shell_cmd(s)) + b"\x85R.")


def stack_global_from_memo(s: Path) -> bytes:
    # Both STACK_GLOBAL operands are fetched back from the memo after being popped.
    return (b"\x80\x04" + short("builtins") + b"\x94" + short("eval") + b"\x94" + b"00"
            + b"h\x00h\x01\x93" + uni(py_code(s)) + b"\x85R.")


def stack_global_short_binstring(s: Path) -> bytes:
    return b"\x80\x04U\x08builtinsU\x04exec\x93" + uni(py_code(s)) + b"\x85R."


def dotted_global(s: Path) -> bytes:
    # find_class walks attributes for protocol >= 4: torch.os.system is os.system.
    return b"\x80\x04ctorch\nos.system\n" + uni(shell_cmd(s)) + b"\x85R."


def dotted_stack_global(s: Path) -> bytes:
    return b"\x80\x04" + short("subprocess") + short("os.system") + b"\x93" + uni(shell_cmd(s)) + b"\x85R."


def protocol0_global(s: Path) -> bytes:
    return b"cposix\nsystem\n(V" + shell_cmd(s).encode() + b"\ntR."


def protocol0_inst(s: Path) -> bytes:
    return b"(V" + shell_cmd(s).encode() + b"\nios\nsystem\n."


def protocol1_obj_popen(s: Path) -> bytes:
    return b"(csubprocess\nPopen\n](Vtouch\nV" + str(s).encode() + b"\neo."


def broken_after_payload(s: Path) -> bytes:
    # The payload REDUCE runs, then POP, then bytes that are no opcode at all (nullifAI).
    return os_system_pickle(s)[:-1] + b"0\xff\xfe garbage"


def truncated_after_payload(s: Path) -> bytes:
    return os_system_pickle(s)[:-1]  # no STOP


def huge_declared_argument(s: Path) -> bytes:
    return b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"only a few bytes"  # BINBYTES8 of 1 TiB


def pickle_then_zip(d: Path, s: Path) -> Path:
    path = d / "model.pt"
    path.write_bytes(os_system_pickle(s) + torch_saved({"w": torch.ones(2)}))
    with zipfile.ZipFile(path) as z:  # Python's zipfile sees a benign checkpoint in it
        assert "archive/data.pkl" in z.namelist()
    return path


def zip_then_pickle(d: Path, s: Path) -> Path:
    path = d / "model.pt"
    path.write_bytes(torch_saved({"w": torch.ones(2)}) + os_system_pickle(s))
    return path


def truncated_zip(d: Path, s: Path) -> Path:
    raw = torch_saved({"w": torch.ones(2), "x": Payload(os.system, shell_cmd(s))})
    path = d / "model.pt"
    path.write_bytes(raw[: len(raw) // 2])
    return path


def truncated_legacy(d: Path, s: Path) -> Path:
    raw = torch_saved({"w": torch.ones(2), "x": Payload(os.system, shell_cmd(s))}, **LEGACY)
    path = d / "model.pt"
    path.write_bytes(raw[:-4])  # cut inside the storage bytes, after the object pickle
    return path


def big_endian_legacy(d: Path, s: Path) -> Path:
    raw = bytearray(torch_saved({"w": torch.ones(2)}, **LEGACY))
    at = raw.index(b"little_endian")
    at = raw.index(b"\x88", at)  # NEWTRUE -> NEWFALSE
    raw[at] = 0x89
    path = d / "model.pt"
    path.write_bytes(bytes(raw))
    return path


def payload_first_then_benign(d: Path, s: Path, payload_name: str) -> Path:
    """`payload_name` holds the payload and comes first; a benign torch-like zip follows.

    Which of two names torch finds depends on miniz's binary search over the sorted directory; for
    this record set it is the first entry (checked by the control tests).
    """
    payload = (payload_name, torch_pickle(ones_state({"x": Payload(os.system, shell_cmd(s))})))
    benign = [("archive/data.pkl", torch_pickle(ones_state())), ("archive/byteorder", b"little"),
              ("archive/data/0", ONES2), ("archive/version", b"3\n")]
    return write_zip(d / "model.pt", [payload, *benign])


def duplicate_data_pkl(d: Path, s: Path) -> Path:
    return payload_first_then_benign(d, s, "archive/data.pkl")


def local_name_mismatch(d: Path, s: Path) -> Path:
    path = torch_zip(d / "model.pt", torch_pickle(ones_state({"x": Payload(os.system, shell_cmd(s))})))
    patch_zip(path, "archive/data.pkl", local_name="archive/datap.kl")  # CVE-2025-1944
    return path


def flagged(bits: int) -> Callable[[Path, Path], Path]:
    def build(d: Path, s: Path) -> Path:
        path = torch_zip(d / "model.pt", torch_pickle(ones_state({"x": Payload(os.system, shell_cmd(s))})))
        patch_zip(path, "archive/data.pkl", flags=bits)  # CVE-2025-1945
        return path

    return build


def torchscript_stored(d: Path, s: Path) -> Path:
    # torch.jit.save's archive, rewritten with every record STORED, so only its content is at issue.
    scripted = d / "scripted.pt"
    torch.jit.save(torch.jit.script(TinyScripted()), str(scripted))
    with zipfile.ZipFile(scripted) as z:
        records = [(n, z.read(n)) for n in z.namelist()]
    scripted.unlink()
    return write_zip(d / "model.pt", records)


def torchscript_as_saved(d: Path, s: Path) -> Path:
    path = d / "model.pt"
    torch.jit.save(torch.jit.script(TinyScripted()), str(path))
    return path


def torch_saved_file(obj_factory: Callable[[], Any]) -> Callable[[Path, Path], Path]:
    def build(d: Path, s: Path) -> Path:
        path = d / "model.pt"
        torch.save(obj_factory(), path)
        return path

    return build


CASES: dict[str, Case] = {
    # torch.save of a dict with a booby-trapped entry, zip format
    **{f"torch_save_zip-{g}": saved_case(g) for g in GADGETS},
    # ... and the legacy (non-zip) format
    **{f"torch_save_legacy-{g}": saved_case(g, legacy=True)
       for g in ("os_system", "builtins_exec", "pydoc_pipepager", "subprocess_popen")},
    "nested_pickle_load_from_bytes-zip": nested_case(legacy=False),
    "nested_pickle_load_from_bytes-legacy": nested_case(legacy=True),
    # hand-crafted raw pickles
    "raw_p2_global_os_system": raw_case(lambda s: os_system_pickle(s, "os"), ("os.system", "plain pickle"), ("os.system",)),
    "raw_p0_global_named_bin": raw_case(protocol0_global, ("posix.system",), ("posix.system",), name="pytorch_model.bin"),
    "raw_p0_inst": raw_case(protocol0_inst, ("os.system",), ("os.system",)),
    "raw_p1_obj_subprocess_popen": raw_case(protocol1_obj_popen, ("subprocess.Popen",), ("subprocess.Popen",)),
    "raw_p4_stack_global_memo_operands": raw_case(stack_global_from_memo, ("builtins.eval",), ("builtins.eval",)),
    "raw_p4_stack_global_short_binstring": raw_case(stack_global_short_binstring, ("builtins.exec",), ("builtins.exec",)),
    "raw_p4_dotted_global": raw_case(dotted_global, ("dotted global name torch.os.system",), ("torch.os.system",)),
    "raw_p4_dotted_stack_global": raw_case(dotted_stack_global, ("dotted global name subprocess.os.system",),
                                           ("subprocess.os.system",)),
    "raw_importlib_chain": raw_case(importlib_chain, ("importlib.import_module", "builtins.getattr"),
                                    ("importlib.import_module", "builtins.getattr")),
    "raw_broken_stream_after_payload": raw_case(broken_after_payload, ("broken pickle stream", "posix.system"),
                                                ("posix.system",)),
    "raw_truncated_after_payload": raw_case(truncated_after_payload, ("STOP", "posix.system"), ("posix.system",)),
    "raw_pickle_with_data_extension": raw_case(protocol0_global, ("posix.system",), ("posix.system",),
                                               name="weights.data", named=False),
    "raw_huge_declared_argument": raw_case(huge_declared_argument, ("exceeds the",), (), trigger=None),
    # hand-built torch-like zips
    "zip_p2_global": zip_case(evil_data_pkl(2), ("posix.system",), ("posix.system",)),
    "zip_p4_stack_global_memoized": zip_case(evil_data_pkl(4, "builtins_exec"), ("builtins.exec",), ("builtins.exec",)),
    "zip_p4_dotted_global": zip_case(dotted_global, ("dotted global name torch.os.system",), ("torch.os.system",)),
    "zip_importlib_chain": zip_case(importlib_chain, ("importlib.import_module",), ("importlib.import_module", "builtins.getattr")),
    "zip_broken_stream_after_payload": zip_case(broken_after_payload, ("broken pickle stream", "posix.system"), ("posix.system",)),
    "zip_compressed_records": zip_case(evil_data_pkl(2), ("compressed",), compression=zipfile.ZIP_DEFLATED),
    "zip_forged_record_size": zip_case(lambda s: torch_pickle(ones_state(numel=1000)),
                                       ("storage 0 declares 4000 bytes but its record holds 8",), trigger=None),
    "zip_view_past_its_storage": zip_case(lambda s: torch_pickle(ones_state(size=(1000,))),
                                          ("reaches byte 4000 of storage 0, which holds 8",), trigger=None),
    "zip_big_endian_byteorder": zip_case(lambda s: torch_pickle(ones_state()), ("big-endian",),
                                         trigger=None, byteorder=b"big"),
    "zip_duplicate_record_names": Case(duplicate_data_pkl, ("appears twice",), (), "torch"),
    "zip_local_central_name_mismatch": Case(local_name_mismatch, ("differs between directory",), (), "torch"),
    # torch 2.13's miniz refuses these flag bits as well, so they have no control test.
    "zip_flag_encrypted_0x1": Case(flagged(0x1), ("encryption or patch flags",)),
    "zip_flag_patched_0x20": Case(flagged(0x20), ("encryption or patch flags",)),
    "zip_flag_strong_encryption_0x40": Case(flagged(0x40), ("encryption or patch flags",)),
    "zip_truncated": Case(truncated_zip, ("truncated",)),
    "legacy_truncated_after_payload": Case(truncated_legacy, ("truncated", "posix.system"), ("posix.system",), "torch"),
    "legacy_big_endian": Case(big_endian_legacy, ("big-endian",)),
    # polyglots
    "polyglot_pickle_then_zip": Case(pickle_then_zip, ("plain pickle", "posix.system"), ("posix.system",), "torch"),
    "polyglot_zip_then_pickle": Case(zip_then_pickle, ("unexpected bytes after the zip directory",)),
    # code and tensor kinds a weights converter must not rebuild
    "torchscript_archive_stored": Case(torchscript_stored, ("TorchScript",)),
    "torchscript_archive_as_jit_saved": Case(torchscript_as_saved, ()),  # named as such: see test_jit_saved_archive_is_reported_as_torchscript
    "sparse_coo_rebuild": Case(torch_saved_file(lambda: {"s": torch.eye(3).to_sparse()}), ("sparse tensor rebuild",),
                               ("torch._utils._rebuild_sparse_tensor",)),
    "sparse_csr_rebuild": Case(torch_saved_file(lambda: {"s": torch.eye(2).to_sparse_csr()}), ("sparse",),
                               ("torch._utils._rebuild_sparse_tensor",)),
    "quantized_rebuild": Case(torch_saved_file(lambda: {"q": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)}),
                              ("quantized tensor rebuild",), ("torch._utils._rebuild_qtensor",)),
}
LIVE = [name for name, case in CASES.items() if case.trigger]


def wait_for(path: Path, seconds: float = 10.0) -> bool:
    """Payloads such as subprocess.Popen finish after the load returns."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists():
            return True
        time.sleep(0.02)
    return path.exists()


def assert_refused(path: Path, sentinel: Path, words: tuple[str, ...] = (), globals_: tuple[str, ...] = (),
                   convert_names_refusal: bool = True) -> None:
    """Scan refuses naming `words`, lists `globals_`; convert raises and writes nothing; nothing ran."""
    folder = path.parent
    scan = scan_pickle(str(path))
    assert scan.safe is False
    assert scan.refusals
    text = " | ".join(scan.refusals)
    for word in words:
        assert word in text, f"{word!r} not in refusals {scan.refusals}"
    found = [str(g) for g in scan.globals]
    for g in globals_:
        assert g in found, f"{g} not in scanned globals {found}"
    assert all(isinstance(g, pickle_vm.Global) and str(g) == f"{g.module}.{g.name}" for g in scan.globals)

    before = set(os.listdir(folder))
    out = folder / "out.safetensors"
    with pytest.raises(SftoolsError) as exc:
        convert(str(path), str(out))
    if convert_names_refusal:
        assert any(r in str(exc.value) for r in scan.refusals), str(exc.value)
    assert not out.exists()
    assert set(os.listdir(folder)) == before, "convert left a file behind"
    time.sleep(0.05)  # room for an asynchronous payload (Popen) to show itself
    assert not sentinel.exists(), "the payload ran"


@pytest.mark.parametrize("name", CASES)
def test_malicious_file_is_refused_and_nothing_runs(tmp_path, name):
    case = CASES[name]
    sentinel = tmp_path / "SENTINEL"
    path = case.build(tmp_path, sentinel)
    assert not sentinel.exists()
    assert_refused(path, sentinel, case.words, case.globals, case.convert_names_refusal)


@pytest.mark.parametrize("name", LIVE)
def test_payload_runs_under_pickle_or_torch_load(tmp_path, name):
    """Control: the same bytes do run their payload when pickle or torch loads them."""
    case = CASES[name]
    sentinel = tmp_path / "SENTINEL"
    path = case.build(tmp_path, sentinel)
    assert not sentinel.exists()
    result = None
    try:
        if case.trigger == "pickle":
            result = pickle.loads(path.read_bytes())
        else:
            result = torch.load(path, weights_only=False)
    except Exception:
        pass  # broken, truncated and polyglot files fail after the payload ran
    assert wait_for(sentinel), f"control failed: {name} did not run under {case.trigger}"
    del result


def test_hand_built_zip_is_a_checkpoint_torch_and_sftools_both_read(tmp_path):
    """The corpus builder makes real checkpoints: without a payload both readers accept it."""
    path = torch_zip(tmp_path / "model.pt", torch_pickle(ones_state()))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    scan = scan_pickle(str(path))
    assert scan.safe, scan.refusals
    assert list(scan.tensors) == ["w"]


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_benign_checkpoint_converts(tmp_path, fmt):
    """Control for the convert assertions: a clean file of the same shape does convert."""
    from safetensors.torch import load_file

    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path, **(LEGACY if fmt == "legacy" else {}))
    convert(str(path), str(tmp_path / "out.safetensors"))
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["w"], torch.ones(2))


# --- bounds --------------------------------------------------------------------------------------

BOUNDS = {
    "MAX_OPCODES": (10, "exceeds 10 opcodes"),
    "MAX_MEMO": (2, "memo exceeds 2 entries"),
    "MAX_ARG_BYTES": (4, "exceeds the 4-byte bound"),
    "MAX_STACK": (2, "stack"),
    "MAX_MARKS": (0, "nesting"),
}


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("bound", BOUNDS)
def test_normal_checkpoint_is_refused_over_a_lowered_bound(tmp_path, monkeypatch, bound, fmt):
    path = tmp_path / "model.pt"
    torch.save({"layer.weight": torch.randn(4, 3), "layer.bias": torch.zeros(4)}, path,
               **(LEGACY if fmt == "legacy" else {}))
    assert scan_pickle(str(path)).safe  # within the real bounds
    value, words = BOUNDS[bound]
    monkeypatch.setattr(pickle_vm, bound, value)
    assert_refused(path, tmp_path / "SENTINEL", (words,))


# --- the command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """One hostile checkpoint, and scan / scan --json / convert on it, run in this process from its folder."""
    folder = tmp_path_factory.mktemp("cli")
    sentinel = folder / "SENTINEL"
    path = folder / "model.pt"
    torch.save({"w": torch.ones(2), "x": Payload(os.system, shell_cmd(sentinel))}, path)
    before = set(os.listdir(folder))
    commands = {
        "scan": ["scan", str(path)],
        "json": ["scan", "--json", str(path)],
        "convert": ["convert", str(path), str(folder / "out.safetensors")],
    }
    runs = {k: completed(*args, cwd=str(folder)) for k, args in commands.items()}
    results = {k: (r.returncode, r.stdout, r.stderr) for k, r in runs.items()}
    return {"results": results, "sentinel": sentinel, "folder": folder, "before": before}


def test_cli_scan_lists_the_forbidden_global_and_exits_1(cli):
    code, out, err = cli["results"]["scan"]
    assert code == 1, (out, err)
    assert "REFUSED" in out
    assert any("posix.system" in line and "not allowed" in line for line in out.splitlines()), out
    assert "Traceback" not in err
    assert not cli["sentinel"].exists()


def test_cli_scan_json_reports_unsafe(cli):
    code, out, err = cli["results"]["json"]
    assert code == 1, (out, err)
    report = json.loads(out)
    assert report["safe"] is False
    assert any("posix.system" in r for r in report["refusals"])
    assert {"name": "posix.system", "count": 1, "allowed": False} in report["globals"]
    assert not cli["sentinel"].exists()


def test_cli_convert_refuses_with_one_error_line(cli):
    code, out, err = cli["results"]["convert"]
    assert code == 1, (out, err)
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("sftools: error:"), err
    assert "posix.system" in lines[0]
    assert "Traceback" not in err
    assert set(os.listdir(cli["folder"])) == cli["before"]  # no output, no temporary file
    assert not cli["sentinel"].exists()


# --- parser differentials and structure bombs, with controls that show each one is real ----------


def tar_without_ustar_magic(d: Path, s: Path) -> Path:
    """A pre-0.1.10 tar checkpoint (old V7 header, no "ustar" magic) whose first member name is a
    complete, empty legacy pickle stream, and whose `storages` member carries the payload.

    torch.load tries tarfile first for any non-zip file (`_legacy_load` -> `legacy_load`), and
    tarfile accepts V7 headers, so torch unpickles `storages`. sftools only recognises tar by the
    "ustar" magic and otherwise reads the bytes from offset 0 as a legacy pickle stream.
    """
    stream = (pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
              + b"}." + b"}." + b"].")  # magic, protocol, sys_info, object {}, storage keys []
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("x" * len(stream), b""), ("storages", os_system_pickle(s))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = bytearray(buf.getvalue())
    raw[: len(stream)] = stream  # the first member's name field
    raw[257:265] = bytes(8)  # no ustar magic: a V7 header
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw[:512])  # header checksum
    path = d / "model.pt"
    path.write_bytes(bytes(raw))
    return path


def case_insensitive_data_pkl(d: Path, s: Path) -> Path:
    """The payload as `archive/DATA.PKL`, next to a benign `archive/data.pkl`.

    torch (miniz `mz_zip_reader_locate_file` without MZ_ZIP_FLAG_CASE_SENSITIVE) looks record names
    up case-insensitively and reads the payload; sftools matches exact names and reads the benign one.
    """
    return payload_first_then_benign(d, s, "archive/DATA.PKL")


@pytest.mark.parametrize("build", [tar_without_ustar_magic, case_insensitive_data_pkl], ids=["v7_tar", "case_insensitive_name"])
def test_control_torch_runs_payload_of_parser_differential(tmp_path, build):
    sentinel = tmp_path / "SENTINEL"
    path = build(tmp_path, sentinel)
    try:
        torch.load(path, weights_only=False)
    except Exception:
        pass
    assert wait_for(sentinel)


def test_tar_checkpoint_without_ustar_magic_is_refused(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    path = tar_without_ustar_magic(tmp_path, sentinel)
    assert scan_pickle(str(path)).safe is False
    assert not sentinel.exists()


def test_record_names_equal_up_to_case_are_refused(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    path = case_insensitive_data_pkl(tmp_path, sentinel)
    assert_refused(path, sentinel)


def test_jit_saved_archive_is_reported_as_torchscript(tmp_path):
    path = torchscript_as_saved(tmp_path, tmp_path / "SENTINEL")
    scan = scan_pickle(str(path))
    assert scan.safe is False
    assert scan.format == "torchscript"
    assert any("TorchScript" in r for r in scan.refusals), scan.refusals


SELF_REFERENCING = {
    "list_containing_itself": b"\x80\x02]q\x00h\x00a.",  # L = []; L.append(L)
    "dict_containing_itself": b"\x80\x02}q\x00" + uni("k") + b"h\x00s.",  # d = {}; d["k"] = d
}


@pytest.mark.parametrize("name", SELF_REFERENCING)
def test_self_referencing_container_is_refused_not_a_recursion_error(tmp_path, name):
    path = tmp_path / "model.pkl"
    path.write_bytes(SELF_REFERENCING[name])
    assert pickle.loads(SELF_REFERENCING[name])  # an ordinary, loadable pickle
    assert scan_pickle(str(path)).safe is False
    with pytest.raises(SftoolsError):
        convert(str(path), str(tmp_path / "out.safetensors"))


def test_shared_containers_do_not_make_the_scan_exponential(tmp_path):
    import multiprocessing

    nested: list = [[]]
    for _ in range(40):
        nested = [nested, nested]
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(nested, protocol=2))
    assert path.stat().st_size < 1000
    child = multiprocessing.get_context("fork").Process(target=scan_pickle, args=(str(path),))
    child.start()
    child.join(3)
    hung = child.is_alive()
    if hung:
        child.kill()
        child.join()
    assert not hung, "scan_pickle did not finish within 3 s"


def test_expanded_view_describing_terabytes_is_refused_before_any_allocation(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1).expand(2**40)}, path)  # 4 bytes of storage, 4 TiB as a tensor
    scan = scan_pickle(str(path))
    assert scan.safe is False and any("would expand" in r and "tensor w" in r for r in scan.refusals)
    with pytest.raises(SftoolsError, match="would expand"):
        convert(str(path), str(tmp_path / "out.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def deep_tuple_key() -> bytes:
    """{(((...(),),),): None} nested a million levels: hashing it recurses in C without a check."""
    return b"\x80\x02}" + b")" + b"\x85" * 1_000_000 + b"Ns."


def shared_tuple_key() -> bytes:
    """t = (t, t) forty times over the memo, used as a dict key: hashing or repr costs 2**40 steps."""
    body = b")q\x00"
    for _ in range(40):
        body += b"0h\x00h\x00\x86q\x00"  # POP, BINGET 0, BINGET 0, TUPLE2, BINPUT 0
    return b"\x80\x02}" + body + b"Ns."


@pytest.mark.parametrize("build", [deep_tuple_key, shared_tuple_key], ids=["deep_key", "shared_key"])
def test_hostile_dict_keys_are_never_hashed_or_printed(tmp_path, build):
    path = tmp_path / "model.pkl"
    path.write_bytes(build())
    code = (f"from sftools.io.torch_pickle import scan_pickle; s = scan_pickle({str(path)!r}); "
            "print(s.safe, s.format)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-500:]  # no segfault (139), no hang
    assert r.stdout.split() == ["False", "pickle"]


def test_legacy_view_with_a_negative_offset_is_refused(tmp_path):
    """A legacy persistent id whose view starts before its root storage would read the neighbour's
    bytes (and its record header). torch no longer writes views, so one is patched in: the last
    storage's `view_metadata` None becomes (its own key, -4, 4)."""
    path = tmp_path / "model.pt"
    torch.save({"a": torch.arange(4.0), "b": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    stream = io.BytesIO(raw)
    for _ in range(3):  # magic, protocol, sys_info
        list(pickletools.genops(stream))
    ops = list(pickletools.genops(stream))
    keys = [arg for op, arg, _ in ops if op.name == "BINUNICODE" and arg.isdigit()]
    nones = [pos for (op, _, pos), (nxt, _, _) in zip(ops, ops[1:]) if op.name == "NONE" and nxt.name == "TUPLE"]
    key = keys[-1].encode()
    view = b"X" + struct.pack("<I", len(key)) + key + b"J" + struct.pack("<i", -4) + b"K\x04\x87"
    path.write_bytes(raw[: nones[-1]] + view + raw[nones[-1] + 1:])
    scan = scan_pickle(str(path))
    assert scan.safe is False and any("offset outside the storage" in r for r in scan.refusals), scan.refusals


def test_empty_tensor_with_an_absurd_dimension_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(0, 3)}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    needle = b"K\x00K\x03\x86"  # size (0, 3)
    assert raw.count(needle) == 1
    path.write_bytes(raw.replace(needle, b"K\x00\x8a\x09" + (2**70).to_bytes(9, "little") + b"\x86"))
    scan = scan_pickle(str(path))
    assert scan.safe is False and any("do not describe a view" in r for r in scan.refusals), scan.refusals
