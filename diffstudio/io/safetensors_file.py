"""Safetensors files: validated before use, read lazily through mmap, written atomically.

A .safetensors file is ``u64 little-endian header length N | N bytes of JSON header | data``.
The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` with
offsets relative to the start of the data, plus an optional ``"__metadata__"`` of str -> str.

We check that structure ourselves before handing the file to the ``safetensors`` library, so a
truncated download or a file of the wrong kind gives a :class:`CorruptFileError` that says what
is wrong (and that re-downloading fixes it) instead of a low-level parse error.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffstudio.errors import CorruptFileError, UnsupportedFormatError
from diffstudio.io.folders import existing_path

# The safetensors library itself refuses headers above 100 MB; a bigger length field is garbage.
MAX_HEADER_BYTES = 100_000_000

# dtype string -> (bits per element, torch dtype name). Names torch lacks are simply not loadable.
SAFETENSORS_DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (8, "bool"),
    "U8": (8, "uint8"),
    "I8": (8, "int8"),
    "U16": (16, "uint16"),
    "I16": (16, "int16"),
    "U32": (32, "uint32"),
    "I32": (32, "int32"),
    "U64": (64, "uint64"),
    "I64": (64, "int64"),
    "F16": (16, "float16"),
    "BF16": (16, "bfloat16"),
    "F32": (32, "float32"),
    "F64": (64, "float64"),
    "C64": (64, "complex64"),
    "F8_E4M3": (8, "float8_e4m3fn"),
    "F8_E5M2": (8, "float8_e5m2"),
    "F8_E4M3FNUZ": (8, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (8, "float8_e5m2fnuz"),
    "F8_E8M0": (8, "float8_e8m0fnu"),
    "F4": (4, "float4_e2m1fn_x2"),
}

TensorInfo = tuple[str, tuple[int, ...]]  # (safetensors dtype string, shape)


def human_size(n_bytes: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as download pages show them)."""
    size = float(n_bytes)
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{int(size)} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def torch_dtype(dtype_str: str) -> torch.dtype:
    """'BF16' -> torch.bfloat16; a dtype this torch build lacks -> UnsupportedFormatError."""
    bits_and_name = SAFETENSORS_DTYPES.get(dtype_str)
    found = getattr(torch, bits_and_name[1], None) if bits_and_name else None
    if not isinstance(found, torch.dtype):
        raise UnsupportedFormatError(f"safetensors dtype {dtype_str!r} has no torch dtype in torch "
                                     f"{torch.__version__}; upgrade torch to read this tensor")
    return found


def _corrupt(path: Path, problem: str) -> CorruptFileError:
    return CorruptFileError(f"{path}: not a valid .safetensors file: {problem}")


def _read_raw_header(path: Path) -> tuple[dict, int]:
    """The parsed JSON header and the number of data bytes after it; every field checked."""
    file_size = path.stat().st_size
    if file_size == 0:
        raise _corrupt(path, "the file is empty (0 bytes) — re-download it")
    if file_size < 8:
        raise _corrupt(path, f"the file has only {file_size} bytes, less than the 8-byte header length "
                             "field — re-download it")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        first = f.read(1)
        if first != b"{":
            raise _corrupt(path, "the header does not start with '{' — this is not a safetensors file "
                                 "(garbage bytes, an HTML error page or another format); re-download it or "
                                 "check the path")
        if header_len < 2:
            raise _corrupt(path, f"the header length field says {header_len} bytes, too short for a "
                                 "JSON header — re-download it")
        if header_len > MAX_HEADER_BYTES:
            raise _corrupt(path, f"the header length field says {human_size(header_len)}, more than any real "
                                 "header (100 MB at most) — the file is damaged; re-download it")
        if header_len > file_size - 8:
            raise _corrupt(path, f"truncated: the header length field says {human_size(header_len)} of "
                                 f"header but the file has only {human_size(file_size - 8)} after it — "
                                 "re-download it")
        raw = first + f.read(header_len - 1)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, f"the {header_len}-byte header is not valid JSON ({err}) — "
                             "re-download it") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is JSON but not an object of tensors")
    return header, file_size - 8 - header_len


def _check_tensor_entry(path: Path, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _corrupt(path, f"tensor {name!r} lacks dtype/shape/data_offsets in the header")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        known = ", ".join(SAFETENSORS_DTYPES)
        raise _corrupt(path, f"tensor {name!r} has unknown dtype {dtype!r} (known: {known})")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise _corrupt(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    bits = SAFETENSORS_DTYPES[dtype][0]
    needed = (math.prod(shape) * bits + 7) // 8
    if offsets[1] - offsets[0] != needed:
        raise _corrupt(path, f"tensor {name!r} ({dtype}, shape {shape}) needs {needed} bytes but its "
                             f"data_offsets span {offsets[1] - offsets[0]}")
    return dtype, tuple(shape)


def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a .safetensors file and return ``({name: (dtype_str, shape)}, metadata)``.

    Reads only the header: no tensor data is touched. Raises :class:`CorruptFileError` when the
    file is empty, truncated, garbage or inconsistent, naming the file and the problem.
    """
    path = existing_path(path)
    header, data_size = _read_raw_header(path)
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        infos[name] = _check_tensor_entry(path, name, entry)
        data_end = max(data_end, entry["data_offsets"][1])
    if data_end > data_size:
        raise _corrupt(path, f"truncated: the header says {human_size(data_end)} of tensor data, the file "
                             f"has {human_size(data_size)} — an interrupted download? re-download it")
    return infos, dict(metadata)


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Cast floating-point tensors only: integer buffers (position ids, step counters) keep their type."""
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor


class LazySafetensors(Mapping):
    """A read-only ``{name: Tensor}`` view of a safetensors file; each tensor is read when asked for.

    The file is memory-mapped by ``safetensors.safe_open``; nothing is read until ``sd[key]``.
    Use as a context manager (or call :meth:`close`) to release the mapping.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None):
        self.path = existing_path(path)
        self.infos, self.metadata = read_safetensors_header(self.path)
        self.dtype = dtype
        self._file = safe_open(str(self.path), framework="pt", device=str(device))

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.infos:
            raise KeyError(f"{key!r} is not a tensor of {self.path}")
        if self._file is None:
            raise ValueError(f"{self.path} was closed; open it again to read {key!r}")
        return _cast(self._file.get_tensor(key), self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def meta(self, key: str) -> torch.Tensor:
        """The tensor's shape and dtype as a meta tensor (no data)."""
        dtype_str, shape = self.infos[key]
        dtype = self.dtype if self.dtype is not None and torch_dtype(dtype_str).is_floating_point else None
        return torch.empty(shape, dtype=dtype or torch_dtype(dtype_str), device="meta")

    def close(self) -> None:
        """Release the memory map; tensors already read stay valid."""
        if self._file is not None:
            self._file.__exit__(None, None, None)
            self._file = None

    def __enter__(self) -> LazySafetensors:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_safetensors(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                     keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Read tensors (all, or only ``keys``) from a validated safetensors file, one key at a time.

    ``dtype`` casts floating-point tensors only. Unknown ``keys`` raise KeyError naming the file.
    """
    with LazySafetensors(path, device, dtype) as lazy:
        wanted = list(lazy.keys()) if keys is None else list(keys)
        missing = [k for k in wanted if k not in lazy.infos]
        if missing:
            raise KeyError(f"{lazy.path} has no tensor(s) {missing[:5]} (it has {len(lazy)} tensors)")
        return {key: lazy[key] for key in wanted}


def metadata_to_strings(metadata: Mapping[str, object] | None) -> dict[str, str]:
    """Safetensors metadata must be str -> str: strings stay, everything else becomes JSON."""
    out = {}
    for key, value in (metadata or {}).items():
        out[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return out


def decode_metadata_value(value: str) -> object:
    """The inverse of :func:`metadata_to_strings` for one value: JSON objects/arrays are parsed."""
    if value[:1] in ("{", "["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _independent_contiguous(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no storage (safetensors refuses shared/tied tensors)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"cannot save {name!r}: it is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        if storage in seen and t.numel() > 0:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: Mapping[str, object] | None = None) -> Path:
    """Write ``state_dict`` to ``path`` atomically: a temporary file in the same folder, then os.replace.

    Metadata values that are not strings (dicts, numbers, lists) are stored as JSON. A crash
    mid-write leaves the old file (if any) untouched and no partial file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = _independent_contiguous(state_dict)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata_to_strings(metadata))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private (0600); a saved model is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
