"""One entry point for weights on disk: any supported file or folder -> ``{name: Tensor}``.

The format is decided by the file's first bytes, and only then by its extension (files are often
renamed: a ``.ckpt`` that is really safetensors, a ``.bin`` that is a torch zip):

* ``PK\\x03\\x04`` — a torch zip checkpoint (``torch.save`` since 1.6) -> :mod:`.pickle_checkpoint`
* ``0x80`` — a legacy torch pickle (protocol 2+) -> :mod:`.pickle_checkpoint`
* ``<u64 header length>{`` — safetensors -> :mod:`.safetensors_file`
* a folder — a diffusers / Hugging Face component folder -> :mod:`.folders`

GGUF, HDF5 and .npy files are recognised only to say that they are not supported.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffstudio.errors import CorruptFileError, UnsupportedFormatError
from diffstudio.io.folders import component_files, existing_path, read_component, read_component_config
from diffstudio.io.pickle_checkpoint import load_pickle_checkpoint, load_pickle_checkpoint_meta
from diffstudio.io.safetensors_file import (
    load_safetensors,
    read_safetensors_header,
    torch_dtype,
)

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
SUPPORTED = (".safetensors, .ckpt / .pt / .pth / .bin (read with torch's weights-only loader), "
             "or a diffusers / Hugging Face component folder (config.json + weights)")

# Formats we recognise by their magic bytes only to say clearly that we do not read them.
_KNOWN_UNSUPPORTED = {
    b"GGUF": "a GGUF (quantised llama.cpp-style) file",
    b"\x89HDF": "an HDF5 (Keras .h5) file",
    b"\x93NUMPY": "a NumPy .npy array",
}


def file_format(path: str | Path) -> str:
    """``"safetensors"``, ``"pickle"`` or ``"folder"`` for a readable path; else a named error."""
    path = existing_path(path)
    if path.is_dir():
        return "folder"
    with open(path, "rb") as f:
        head = f.read(16)
    # safetensors first: its first 8 bytes are the header's length, whose low byte may be 0x80 like a pickle's
    # protocol opcode; a header that opens with "{" and fits in the file is safetensors'.
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") + 8 <= path.stat().st_size:
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "pickle"
    for magic, what in _KNOWN_UNSUPPORTED.items():
        if head.startswith(magic):
            raise UnsupportedFormatError(f"{path} is {what}, which diffstudio does not read; "
                                         f"supported: {SUPPORTED}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_EXTENSIONS:
        return "safetensors"  # its reader explains what is wrong with the bytes
    if suffix in PICKLE_EXTENSIONS:
        return "pickle"
    if not head:
        raise CorruptFileError(f"{path} is empty (0 bytes) — re-download it")
    raise UnsupportedFormatError(f"{path}: unknown format (extension {suffix or 'none'!r}, and its first "
                                 f"bytes are no known magic number); supported: {SUPPORTED}")


def _refuse_pipeline_folder(folder: Path) -> None:
    if (folder / "model_index.json").is_file():
        raise UnsupportedFormatError(
            f"{folder} is a diffusers pipeline folder (model_index.json) with one subfolder per component; "
            "read it with diffstudio.load, or read one component with read_component(folder / 'unet')")


def read_state_dict(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a weights file or component folder. ``dtype`` casts floating-point tensors only."""
    kind = file_format(path)
    path = Path(path).expanduser()
    if kind == "safetensors":
        return load_safetensors(path, device, dtype)
    if kind == "pickle":
        return load_pickle_checkpoint(path, device, dtype)
    _refuse_pipeline_folder(path)
    return read_component(path, device, dtype)[0]


def _safetensors_meta(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    infos, metadata = read_safetensors_header(path)
    tensors = {name: torch.empty(shape, dtype=torch_dtype(dtype), device="meta")
               for name, (dtype, shape) in infos.items()}
    return tensors, metadata


def _folder_metadata(folder: Path) -> dict[str, str]:
    """The safetensors metadata of a folder's weight files, plus its config.json under "config"."""
    _refuse_pipeline_folder(folder)
    metadata: dict[str, str] = {}
    for file in component_files(folder):
        if file.name.endswith(".safetensors"):
            metadata.update(read_safetensors_header(file)[1])
    config = read_component_config(folder)
    if config is not None:
        metadata["config"] = json.dumps(config, sort_keys=True)
    return metadata


def read_state_dict_meta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``({name: meta tensor with the real shape and dtype}, metadata)`` without reading weights.

    Safetensors: from the header alone. Zip checkpoints: memory-mapped, so only the pickle is
    read. Legacy pickles have to be read whole. For a component folder the metadata holds its
    ``config.json`` (as a JSON string under ``"config"``) merged with the files' own metadata.
    """
    kind = file_format(path)
    path = Path(path).expanduser()
    if kind == "safetensors":
        return _safetensors_meta(path)
    if kind == "pickle":
        return load_pickle_checkpoint_meta(path), {}
    _refuse_pipeline_folder(path)
    tensors: dict[str, torch.Tensor] = {}
    for file in component_files(path):
        tensors.update(_safetensors_meta(file)[0] if file.name.endswith(".safetensors")
                       else load_pickle_checkpoint_meta(file))
    return tensors, _folder_metadata(path)


def read_file_metadata(path: str | Path) -> dict[str, str]:
    """The metadata stored with the weights: a safetensors ``__metadata__`` (str -> str).

    Pickled checkpoints carry none we read (``{}``); a component folder gives its files'
    metadata plus its config.json under ``"config"``. ``decode_metadata_value`` parses JSON values.
    """
    kind = file_format(path)
    path = Path(path).expanduser()
    if kind == "safetensors":
        return read_safetensors_header(path)[1]
    if kind == "pickle":
        return {}
    return _folder_metadata(path)
