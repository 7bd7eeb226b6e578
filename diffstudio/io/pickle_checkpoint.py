"""Pickle-based checkpoints (.ckpt / .pt / .pth / .bin), read with ``torch.load(weights_only=True)`` only.

A pickle is a small program: unpickling it can call any importable function (``os.system``...).
``weights_only=True`` runs it in torch's restricted unpickler, which only builds tensors and plain
containers. When that unpickler refuses a file we never retry without it: we scan the pickle's
opcodes (without executing anything) to name what it asked for, and raise
:class:`UnsafeCheckpointError`.

Released checkpoints often carry training metadata beside the weights (the SD 1.x ``.ckpt`` files
hold a Lightning ``ModelCheckpoint`` callback and NumPy scalars). The classes named in
:data:`INERT_GLOBALS` are allowlisted *by name only*: the restricted unpickler builds an
:class:`InertObject` in their place, so the real class is never imported and no code of the file
runs; those entries are then dropped as non-tensors.

Checkpoints come wrapped in many ways: Lightning (``{"state_dict": ..., "global_step": ...}``),
DeepSpeed (``{"module": ...}``), training scripts (``{"model": ..., "optimizer": ...}``), adapters
split by part (``{"image_proj": {...}, "ip_adapter": {...}}``). :func:`unwrap_state_dict` finds the
tensors, flattens nested dicts with dotted names and reports what it dropped.
"""

from __future__ import annotations

import io
import logging
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from diffstudio.errors import CorruptFileError, UnsafeCheckpointError
from diffstudio.io.folders import existing_path

log = logging.getLogger("diffstudio.io")

# Keys under which training frameworks nest the weights, tried in this order.
WRAPPER_KEYS = ("state_dict", "module", "model", "model_state_dict", "net", "params")

# Opcodes that push a string (a module or attribute name for STACK_GLOBAL).
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
               "SHORT_BINSTRING"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_NO_PUSH_OPS = {"PROTO", "FRAME", "MEMOIZE", "STOP"} | _PUT_OPS

# Harmless training metadata, allowlisted by name and built as InertObject (never imported).
_NUMPY_DTYPE_CLASSES = ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType",
                        "Int16DType", "Int8DType", "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType",
                        "BoolDType", "LongDType", "ULongDType", "ObjectDType", "StrDType", "BytesDType")
INERT_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.dtype", "numpy.ndarray",
    *(f"numpy.dtypes.{name}" for name in _NUMPY_DTYPE_CLASSES),
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata", "omegaconf.nodes.AnyNode",
    "typing.Any", "argparse.Namespace",
    # nn.Module containers of the first textual-inversion embeddings; their tensors are kept.
    "torch.nn.modules.container.ParameterDict", "torch.nn.modules.container.ParameterList",
)

# Platform and Python 2 module names (pickle protocol 2 writes them), shown as the names users know.
_FRIENDLY_MODULES = {"posix": "os", "nt": "os", "__builtin__": "builtins"}


class InertObject:
    """Stands in for a class of :data:`INERT_GLOBALS`: it only stores what the pickle hands it."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def module_tensors(self) -> dict | None:
        """The parameters and buffers when this stood in for an nn.Module (a ParameterDict)."""
        state = getattr(self, "state", None)
        if not (isinstance(state, dict) and isinstance(state.get("_parameters"), dict)):
            return None
        tensors = {**state["_parameters"], **(state.get("_buffers") or {})}
        return {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}


_INERT_ALLOWLIST = [(InertObject, name) for name in INERT_GLOBALS]


@dataclass
class UnwrapReport:
    """What :func:`unwrap_state_dict` did: where the tensors were, and what it left out."""

    wrapper_path: list[str] = field(default_factory=list)  # e.g. ["state_dict"]
    dropped: list[str] = field(default_factory=list)  # dotted names of non-tensor entries

    def summary(self) -> str:
        where = ".".join(self.wrapper_path) or "the top level"
        shown = ", ".join(self.dropped[:8]) + (" ..." if len(self.dropped) > 8 else "")
        dropped = f"; dropped non-tensor entries: {shown}" if self.dropped else ""
        return f"tensors taken from {where}{dropped}"


def _pickle_streams(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    """(stream, how many pickles to read from it): data.pkl of a zip, else the file itself.

    A legacy torch file is a row of pickles (magic number, protocol, sys info, the object,
    storage keys) followed by raw tensor bytes, so at most 5 pickles are read from it.
    """
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith("data.pkl"):
                    yield io.BytesIO(archive.read(name)), 1
    else:
        with open(path, "rb") as f:
            yield f, 5


def referenced_globals(path: str | Path) -> list[str]:
    """Every ``module.name`` the checkpoint's pickle imports, found by reading opcodes (nothing runs).

    Raises ValueError when a pickle ends before its STOP opcode (a truncated or garbage file).
    """
    found: list[str] = []
    for stream, count in _pickle_streams(Path(path)):
        for _ in range(count):
            position = stream.tell()
            if not stream.read(1):  # the file ended cleanly after the previous pickle
                break
            stream.seek(position)
            found += _globals_in_one_pickle(stream)
    return list(dict.fromkeys(found))


def _globals_in_one_pickle(stream: io.BytesIO) -> list[str]:
    found: list[str] = []
    recent: list[object] = []  # the last values pushed, as far as names are concerned
    memo: dict[int, object] = {}
    for opcode, arg, _pos in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            found.append(str(arg).replace(" ", "."))
        elif name == "STACK_GLOBAL":
            module, attr = (recent[-2:] if len(recent) >= 2 else [None, None])
            known = isinstance(module, str) and isinstance(attr, str)
            found.append(f"{module}.{attr}" if known else "<unknown>")
        if name in _STRING_OPS:
            recent.append(arg)
        elif name in _GET_OPS:
            recent.append(memo.get(arg))
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in _PUT_OPS:
            memo[arg] = recent[-1] if recent else None
        elif name not in _NO_PUSH_OPS:
            recent.append(None)
        del recent[:-2]
        if name == "STOP":
            break
    return found


def _allowed_globals() -> set[str]:
    """The names torch's weights-only unpickler accepts (private API, so guarded)."""
    allowed: set[str] = set()
    getter = getattr(getattr(torch, "_weights_only_unpickler", None), "_get_allowed_globals", None)
    if callable(getter):
        allowed |= set(getter())
    for item in torch.serialization.get_safe_globals():
        obj = item[0] if isinstance(item, tuple) else item
        allowed.add(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
    return allowed


def _refusal(path: Path, torch_message: str) -> Exception:
    """Explain why torch's restricted unpickler refused ``path``: unsafe, or simply broken."""
    try:
        names = referenced_globals(path)
    except (ValueError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile):
        return CorruptFileError(f"{path}: the checkpoint's pickle is truncated or damaged — re-download it")
    allowed = _allowed_globals() | set(INERT_GLOBALS)
    unsafe = [n for n in names if n not in allowed and n.replace("__builtin__.", "builtins.") not in allowed]
    if unsafe:
        shown = ", ".join(_friendly(n) for n in unsafe[:6]) + (" ..." if len(unsafe) > 6 else "")
        what = f"asks to run or build {shown}"
    else:
        detail = next((line.strip() for line in torch_message.splitlines() if "GLOBAL" in line), "")
        what = f"holds objects torch's safe loader refuses ({detail or 'see torch.load weights_only'})"
    return UnsafeCheckpointError(
        f"refused {path}: the file {what}. diffstudio only loads tensors from pickles and never runs code in "
        "them. Convert it to .safetensors with a tool you trust (in an isolated environment), or use a "
        ".safetensors release of the model.")


def _friendly(name: str) -> str:
    if name == "<unknown>":
        return "a global whose name is computed at load time"
    module, _, attr = name.partition(".")
    shown = f"{_FRIENDLY_MODULES.get(module, module)}.{attr}"
    return f"`{shown}`" if shown == name else f"`{shown}` ({name})"


def _restricted_load(path: Path, mmap: bool) -> object:
    with warnings.catch_warnings(), torch.serialization.safe_globals(_INERT_ALLOWLIST):
        warnings.filterwarnings("ignore", message="Detected pickle protocol")  # noise to our users
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _torch_load(path: Path) -> object:
    """torch.load with weights_only=True, memory-mapped when the file is a zip; errors named."""
    if path.stat().st_size == 0:
        raise CorruptFileError(f"{path}: the file is empty (0 bytes) — re-download it")
    is_zip = zipfile.is_zipfile(path)
    try:
        try:
            return _restricted_load(path, mmap=is_zip)
        except RuntimeError as err:
            if not (is_zip and "mmap" in str(err)):
                raise
            return _restricted_load(path, mmap=False)  # a zip not laid out for memory mapping
    except pickle.UnpicklingError as err:
        raise _refusal(path, str(err)) from None
    except (EOFError, RuntimeError, ValueError, zipfile.BadZipFile, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorruptFileError(f"{path}: could not be read as a PyTorch checkpoint ({first_line}); the file "
                               "is truncated or not a checkpoint — re-download it") from None


def _as_mapping(obj: object) -> Mapping | None:
    """A dict, or the tensors of a stood-in nn.Module container; else None."""
    if isinstance(obj, Mapping):
        return obj
    return obj.module_tensors() if isinstance(obj, InertObject) else None


def _has_tensors(obj: object) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    mapping = _as_mapping(obj)
    return mapping is not None and any(_has_tensors(v) for v in mapping.values())


def _flatten(obj: Mapping, prefix: str, out: dict, dropped: list[str]) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value.detach() if value.requires_grad else value
        elif _has_tensors(value):
            _flatten(_as_mapping(value), f"{name}.", out, dropped)
        else:
            dropped.append(name)


def unwrap_state_dict(obj: object) -> tuple[dict[str, torch.Tensor], UnwrapReport]:
    """Find the weights in an unpickled checkpoint: ``(flat {name: Tensor}, report)``.

    While the top level holds no tensors itself, descend into the first of WRAPPER_KEYS that holds
    some (Lightning's ``state_dict``, DeepSpeed's ``module`` ...). Nested dicts of tensors below
    that are flattened with dotted names; everything that is not a tensor is dropped and reported.
    """
    report = UnwrapReport()
    if not isinstance(obj, Mapping):
        raise CorruptFileError(f"the checkpoint holds a {type(obj).__name__}, not a dict of tensors; "
                               "it is not a model checkpoint diffstudio can read")
    while not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping) and _has_tensors(obj[k])),
                   None)
        if key is None:
            break
        prefix = ".".join(report.wrapper_path + [""])
        report.dropped += [f"{prefix}{k}" for k in obj if k != key]
        report.wrapper_path.append(key)
        obj = obj[key]
    state_dict: dict[str, torch.Tensor] = {}
    _flatten(obj, "", state_dict, report.dropped)
    return state_dict, report


def _finish(state_dict: dict[str, torch.Tensor], device, dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state_dict.items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[name] = tensor.to(device) if str(device) != "cpu" else tensor
    return out


def load_pickle_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                           dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A .ckpt/.pt/.pth/.bin checkpoint -> flat ``{name: Tensor}``, safely.

    Raises UnsafeCheckpointError for a pickle that would run code or build non-allowlisted
    objects, CorruptFileError for an empty, truncated or non-checkpoint file. ``dtype`` casts
    floating-point tensors only. What was dropped while unwrapping is logged (``diffstudio.io``).
    """
    path = existing_path(path)
    state_dict, report = unwrap_state_dict(_torch_load(path))
    if not state_dict:
        raise CorruptFileError(f"{path}: the checkpoint holds no tensors ({report.summary()})")
    if report.wrapper_path or report.dropped:
        log.info("%s: %s", path, report.summary())
    return _finish(state_dict, device, dtype)


def load_pickle_checkpoint_meta(path: str | Path) -> dict[str, torch.Tensor]:
    """Names, shapes and dtypes as meta tensors; a zip checkpoint is memory-mapped, so no data is read."""
    path = existing_path(path)
    state_dict, _ = unwrap_state_dict(_torch_load(path))
    return {name: torch.empty_like(t, device="meta") for name, t in state_dict.items()}
