"""A symbolic pickle machine: it reads a pickle stream and never executes any of it.

Why not `pickle.Unpickler` with a `find_class` allowlist: the allowlisted objects are real functions
that then get called with attacker-chosen arguments (torch's own weights-only unpickler has a CVE
history for exactly that). Here every GLOBAL stays a pair of strings, REDUCE builds a `Call` record,
and only the handful of torch rebuild calls we know are interpreted, by our own code, into
`TensorRef` descriptions. Nothing is imported, resolved or called, whatever the stream says, so the
machine can run a hostile stream to its end and report every global it references.

Opcodes are decoded by `pickletools.genops`, which only parses; the stack machine is ours.
"""

from __future__ import annotations

import pickletools
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable

import torch

from sftools.io.lazy import nbytes

# Bounds against memory and time exhaustion; real checkpoints are orders of magnitude below them.
MAX_OPCODES = 20_000_000
MAX_MEMO = 5_000_000
MAX_STACK = 2_000_000
MAX_MARKS = 10_000
MAX_ARG_BYTES = 64 * 1024 * 1024
MAX_DIM = 2**48  # no real tensor dimension, stride or offset comes near; keeps byte arithmetic sane
PLAIN_KEYS = (str, int, bool, float, type(None))


class PickleError(Exception):
    """A pickle stream that is broken, over a bound, or uses something we refuse to interpret."""


@dataclass(frozen=True)
class Global:
    """A (module, name) reference, kept as strings and never resolved."""

    module: str
    name: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass
class Call:
    """A call the stream asks for and we did not interpret (REDUCE, NEWOBJ, INST, OBJ)."""

    func: Any
    args: Any
    state: Any = None


@dataclass(frozen=True)
class StorageRef:
    """A storage named by a persistent id: `key` locates its bytes in the container."""

    key: str
    dtype: torch.dtype
    nbytes: int
    location: str = "cpu"
    base_offset: int = 0  # elements; legacy views point into a root storage


@dataclass(frozen=True)
class TensorRef:
    """A tensor as torch would rebuild it: a strided view (in elements) of one storage."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor once materialized (a view can describe more than its storage holds)."""
        return nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class Opaque:
    """A value we recognise and deliberately do not rebuild (numpy scalars, dtypes, devices)."""

    what: str


@dataclass
class PickleResult:
    value: Any
    opcodes: set[str] = field(default_factory=set)
    end: int = 0  # stream position after STOP


# --- the allowlist: exact (module, name) strings and what each means -------------------------

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
        "bool", "complex64", "complex128", "uint16", "uint32", "uint64", "float8_e4m3fn",
        "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    )
    if hasattr(torch, name)
}

# Globals refused with a specific reason, because the reason helps the user more than "unknown".
KNOWN_REFUSALS: dict[tuple[str, str], str] = {
    ("torch.storage", "_load_from_bytes"): "nested pickle (torch.storage._load_from_bytes)",
    ("torch._utils", "_rebuild_sparse_tensor"): "sparse tensor rebuild",
    ("torch._utils", "_rebuild_sparse_csr_tensor"): "sparse tensor rebuild",
    ("torch._utils", "_rebuild_qtensor"): "quantized tensor rebuild",
    ("torch._utils", "_rebuild_nested_tensor"): "nested tensor rebuild",
    ("torch._utils", "_rebuild_wrapper_subclass"): "tensor subclass rebuild",
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): "meta tensor rebuild",
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): "tensor rebuilt from numpy",
    ("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"): "device tensor rebuild",
}

TENSOR_TYPES = {("torch", "Tensor"), ("torch.nn.parameter", "Parameter"), ("torch._tensor", "Tensor")}
NUMPY_OPAQUE = {
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"), ("numpy.dtypes", "Float64DType"), ("numpy.dtypes", "Float32DType"),
    ("numpy.dtypes", "Int64DType"), ("numpy.dtypes", "Int32DType"),
}


def bounded_summary(value: Any) -> str:
    """A short, bounded description of an untrusted value: never its repr, which a hostile
    structure can make exponentially long or deep."""
    if isinstance(value, (str, bytes)):
        return f"{type(value).__name__} of length {len(value)}"
    if isinstance(value, (int, float, bool)) or value is None:
        return type(value).__name__
    if isinstance(value, (tuple, list, dict)):
        return f"{type(value).__name__} of {len(value)} items"
    return type(value).__name__


def is_allowed(g: Global) -> bool:
    """Whether a global is one we interpret or may leave opaque. Exact strings only."""
    key = (g.module, g.name)
    if "." in g.name or key in KNOWN_REFUSALS:
        return False
    if g.module in ("torch", "torch.cuda") and g.name in STORAGE_DTYPES:
        return True
    if g.module == "torch" and g.name in DTYPES:
        return True
    return key in REBUILDERS or key in TENSOR_TYPES or key in NUMPY_OPAQUE or key in {
        ("collections", "OrderedDict"), ("torch.storage", "UntypedStorage"), ("torch", "Size"),
        ("torch", "device"), ("_codecs", "encode"),
    }


def refusal_reason(g: Global) -> str:
    if "." in g.name:
        return f"dotted global name {g}"
    return KNOWN_REFUSALS.get((g.module, g.name), f"global {g} is not on the allowlist")


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int for v in value):
        raise PickleError(f"tensor {what} is not a tuple of ints (got {bounded_summary(value)})")
    return value


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None = None) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise PickleError(f"tensor rebuild on something that is not a storage: {type(storage).__name__}")
    if type(offset) is not int or offset < 0:
        raise PickleError(f"tensor storage offset ({bounded_summary(offset)}) is not a non-negative int")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides) or not all(0 <= s < MAX_DIM for s in shape + strides) or offset >= MAX_DIM:
        raise PickleError(f"tensor size {shape[:8]} and stride {strides[:8]} do not describe a view")
    return TensorRef(storage, storage.base_offset + offset, shape, strides, dtype or storage.dtype)


def _rebuild_v1_v2(args: tuple) -> TensorRef:
    """(storage, offset, size, stride, ...): v2 adds requires_grad, hooks and metadata we drop."""
    return _rebuild_tensor(*args[:4])


def _rebuild_v3(args: tuple) -> TensorRef:
    dtype = args[6] if len(args) >= 7 else None
    if not (isinstance(dtype, Global) and dtype.module == "torch" and dtype.name in DTYPES):
        raise PickleError("_rebuild_tensor_v3 without a torch dtype argument")
    return _rebuild_tensor(*args[:4], dtype=DTYPES[dtype.name])


def _rebuild_parameter(args: tuple) -> TensorRef:
    if not args or not isinstance(args[0], TensorRef):
        raise PickleError("_rebuild_parameter around something that is not a tensor")
    return args[0]


def _rebuild_from_type_v2(args: tuple) -> TensorRef:
    if len(args) != 4 or not isinstance(args[0], Global) or not isinstance(args[1], Global):
        raise PickleError("_rebuild_from_type_v2 with unexpected arguments")
    func, new_type, inner = args[0], args[1], args[2]
    if (new_type.module, new_type.name) not in TENSOR_TYPES:
        raise PickleError(f"tensor subclass {new_type} is not supported")
    rebuild = REBUILDERS.get((func.module, func.name))
    if rebuild is None or not isinstance(inner, tuple):
        raise PickleError(f"_rebuild_from_type_v2 around {func}")
    return rebuild(inner)


REBUILDERS: dict[tuple[str, str], Callable[[tuple], Any]] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_v1_v2,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v1_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
}


def _interpret_call(func: Any, args: Any) -> Any:
    """Turn a REDUCE on an allowlisted global into a symbolic value; leave anything else a Call."""
    if not isinstance(func, Global) or not is_allowed(func) or not isinstance(args, tuple):
        return Call(func, args)
    key = (func.module, func.name)
    if key in REBUILDERS:
        return REBUILDERS[key](args)
    if key == ("collections", "OrderedDict"):
        return {}
    if key == ("torch", "Size"):
        return tuple(args[0]) if args and isinstance(args[0], (tuple, list)) else ()
    return Opaque(str(func))


class _BoundedReader:
    """Gives genops a stream that refuses any single argument over MAX_ARG_BYTES."""

    def __init__(self, f: BinaryIO):
        self._f = f

    def _take(self, n: int) -> None:
        if n > MAX_ARG_BYTES:
            raise PickleError(f"pickle argument of {n} bytes exceeds the {MAX_ARG_BYTES}-byte bound")

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            raise PickleError("unbounded read in pickle stream")
        self._take(n)
        return self._f.read(n)

    def readline(self) -> bytes:
        line = self._f.readline(MAX_ARG_BYTES + 1)
        self._take(len(line))
        return line

    def tell(self) -> int:
        return self._f.tell()


def _pop_mark(stack: list, marks: list[int]) -> list:
    if not marks:
        raise PickleError("MARK expected on the stack")
    start = marks.pop()
    items = stack[start:]
    del stack[start:]
    return items


def run_pickle(
    f: BinaryIO,
    persistent_load: Callable[[Any], Any] | None = None,
    on_global: Callable[[Global], None] | None = None,
) -> PickleResult:
    """Run one pickle stream symbolically from the current position of `f` up to its STOP.

    `persistent_load` maps a persistent id (already a symbolic tuple) to a value, for BINPERSID.
    `on_global` sees every global as soon as it is read, so a caller still knows them when a later
    opcode breaks the stream.
    """
    result = PickleResult(value=None)
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}

    def note_global(g: Global) -> Global:
        if on_global:
            on_global(g)
        return g

    def pop() -> Any:
        if not stack or (marks and len(stack) <= marks[-1]):
            raise PickleError("pickle stack underflow")
        return stack.pop()

    def put(idx: int) -> None:
        if len(memo) >= MAX_MEMO and idx not in memo:
            raise PickleError(f"pickle memo exceeds {MAX_MEMO} entries")
        if not stack:
            raise PickleError("memo put with an empty stack")
        memo[idx] = stack[-1]

    reader = _BoundedReader(f)
    count = 0
    try:
        for op, arg, _pos in pickletools.genops(reader):
            count += 1
            if count > MAX_OPCODES:
                raise PickleError(f"pickle exceeds {MAX_OPCODES} opcodes")
            if len(stack) > MAX_STACK or len(marks) > MAX_MARKS:
                raise PickleError("pickle stack or nesting exceeds its bound")
            name = op.name
            result.opcodes.add(name)
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                result.value = pop()
                result.end = f.tell()
                return result
            if name in ("GLOBAL", "INST"):
                module, _, gname = arg.partition(" ")
                g = note_global(Global(module, gname))
                if name == "INST":
                    stack.append(Call(g, tuple(_pop_mark(stack, marks))))
                else:
                    stack.append(g)
            elif name == "STACK_GLOBAL":
                gname, module = pop(), pop()
                if not isinstance(module, str) or not isinstance(gname, str):
                    note_global(Global("<non-string>", "<non-string>"))
                    raise PickleError("STACK_GLOBAL with operands that are not strings")
                stack.append(note_global(Global(module, gname)))
            elif name == "MARK":
                marks.append(len(stack))
            elif name == "POP":
                pop()
            elif name == "POP_MARK":
                _pop_mark(stack, marks)
            elif name == "DUP":
                stack.append(stack[-1] if stack else pop())
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                put(int(arg))
            elif name == "MEMOIZE":
                put(len(memo))
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if int(arg) not in memo:
                    raise PickleError(f"memo get of missing index {arg}")
                stack.append(memo[int(arg)])
            elif name in ("NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG",
                          "LONG1", "LONG4", "FLOAT", "BINFLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING",
                          "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES",
                          "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"):
                stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}.get(name, arg))
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = [pop() for _ in range(n)][::-1]
                stack.append(tuple(items))
            elif name == "TUPLE":
                stack.append(tuple(_pop_mark(stack, marks)))
            elif name in ("EMPTY_LIST", "LIST"):
                stack.append([] if name == "EMPTY_LIST" else _pop_mark(stack, marks))
            elif name in ("EMPTY_DICT", "DICT"):
                items = [] if name == "EMPTY_DICT" else _pop_mark(stack, marks)
                stack.append(_dict_from_items({}, items))
            elif name in ("EMPTY_SET", "FROZENSET"):
                stack.append([] if name == "EMPTY_SET" else _pop_mark(stack, marks))
            elif name == "ADDITEMS":
                items = _pop_mark(stack, marks)
                target = pop()
                if not isinstance(target, list):
                    raise PickleError("ADDITEMS to something that is not a set")
                target.extend(items)
                stack.append(target)
            elif name in ("APPEND", "APPENDS"):
                items = [pop()] if name == "APPEND" else _pop_mark(stack, marks)
                target = pop()
                if not isinstance(target, list):
                    raise PickleError(f"{name} to a {type(target).__name__}, not a list")
                target.extend(items)
                stack.append(target)
            elif name in ("SETITEM", "SETITEMS"):
                items = [pop() for _ in range(2)][::-1] if name == "SETITEM" else _pop_mark(stack, marks)
                target = pop()
                if not isinstance(target, dict):
                    raise PickleError(f"{name} on a {type(target).__name__}, not a dict")
                stack.append(_dict_from_items(target, items))
            elif name == "REDUCE":
                args, func = pop(), pop()
                stack.append(_interpret_call(func, args))
            elif name == "NEWOBJ":
                args, cls = pop(), pop()
                stack.append(Call(cls, args))
            elif name == "NEWOBJ_EX":
                kwargs, args, cls = pop(), pop(), pop()
                stack.append(Call(cls, (args, kwargs)))
            elif name == "OBJ":
                items = _pop_mark(stack, marks)
                if not items:
                    raise PickleError("OBJ without a class")
                stack.append(Call(items[0], tuple(items[1:])))
            elif name == "BUILD":
                state = pop()
                target = stack[-1] if stack else pop()
                if isinstance(target, Call):
                    target.state = state
                # BUILD on a dict (OrderedDict `_metadata`) or a tensor only sets attributes we drop.
            elif name == "BINPERSID":
                pid = pop()
                if persistent_load is None:
                    raise PickleError("persistent id in a pickle that has no storages")
                stack.append(persistent_load(pid))
            else:
                # PERSID (text persistent ids), EXT1/2/4 (the copyreg extension registry),
                # NEXT_BUFFER / READONLY_BUFFER (out-of-band buffers): torch never writes them.
                raise PickleError(f"pickle opcode {name} is not supported")
    except PickleError:
        raise
    except (ValueError, EOFError, IndexError, UnicodeDecodeError, OverflowError, KeyError) as exc:
        raise PickleError(f"broken pickle stream: {exc}") from None
    raise PickleError("pickle stream ended without STOP (truncated)")


def _dict_from_items(target: dict, items: list) -> dict:
    if len(items) % 2:
        raise PickleError("odd number of items for a dict")
    for k, v in zip(items[::2], items[1::2]):
        # Only plain scalars are hashed: hashing a hostile tuple can recurse a million levels deep
        # in C, or cost 2**40 steps on a memoised (t, t) chain. Other keys are named by position.
        target[k if type(k) in PLAIN_KEYS else f"<{type(k).__name__} key {len(target)}>"] = v
    return target

