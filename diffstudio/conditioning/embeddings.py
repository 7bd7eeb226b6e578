"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word"): new token vectors.

An embedding file holds N vectors of the text encoder's token-embedding width; writing its name in a
prompt puts those N vectors where the name's tokens were. Files are read through ``diffstudio.io``
(safetensors, or pickles with ``torch.load(weights_only=True)`` only). Layouts recognised:

* A1111 ``.pt``: ``{"string_to_param": {"*": (N, C)}, "string_to_token": ..., "name": ..., ...}``
  (older files hold ``string_to_param`` as an ``nn.ParameterDict``, read without importing it);
* ``.safetensors`` with ``emb_params`` (N, C) (kohya and later A1111 trainers);
* diffusers ``.bin`` / ``.safetensors``: ``{"<token>": (C,) or (N, C)}``, one tensor;
* SDXL (and SD3's CLIPs): ``{"clip_l": (N, 768), "clip_g": (N, 1280)}``.

The name used in prompts is the file stem. Embeddings belong to a loaded model
(``Models.embeddings``, filled by ``Models.add_embedding``, which calls :func:`load_embeddings`);
the encoding functions take them as an explicit ``embeddings`` mapping, so two models never see each
other's. The vectors are chosen by the encoder's width (SDXL files: ``clip_l`` for the 768-wide
encoder, ``clip_g`` for the 1280-wide one). A width that no vector set has raises
:class:`EmbeddingMismatchError` when the name is used, never when it is added (an SD 1.x embedding
added to an SDXL model does not stop it from running until a prompt names it).

Injection (:func:`inject`) replaces rows of the token-embedding *output* with a forward hook for
the duration of one encoder call: the encoder's weights are never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffstudio.errors import CorruptFileError, EmbeddingMismatchError, InvalidInputError, UnsupportedFormatError

EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")
_SDXL_KEYS = ("clip_l", "clip_g")


@dataclass(frozen=True, eq=False)  # compared by identity: it holds tensors
class Embedding:
    """A textual-inversion embedding: ``vectors`` maps an encoder key to an (N, C) float32 tensor.

    The key is ``""`` for single-encoder files (SD 1.x / 2.x) and ``"clip_l"`` / ``"clip_g"`` for
    SDXL files. Every set has the same N.
    """

    name: str
    vectors: Mapping[str, torch.Tensor]
    path: str = ""

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def widths(self) -> dict[str, int]:
        return {key: v.shape[1] for key, v in self.vectors.items()}

    def vectors_for(self, width: int) -> torch.Tensor:
        """The (N, width) vectors for an encoder whose token embeddings are ``width`` wide."""
        fitting = [v for v in self.vectors.values() if v.shape[1] == width]
        if len(fitting) == 1:
            return fitting[0]
        have = ", ".join(f"{key or 'vectors'} {w}" for key, w in self.widths.items())
        if not fitting:
            raise EmbeddingMismatchError(
                f"the embedding {self.name!r} ({self.path or 'in memory'}) has widths {have}, but this text encoder's "
                f"token embeddings are {width} wide: it was trained for another model family (768: SD 1.x / "
                "CLIP-L, 1024: SD 2.x, 768 + 1280: SDXL). Use an embedding made for this model, or leave its "
                "name out of the prompt.")
        raise EmbeddingMismatchError(
            f"the embedding {self.name!r} has several vector sets of width {width} ({have}): cannot tell which one "
            "this encoder needs.")


def load_embedding(path: str | Path, name: str | None = None) -> Embedding:
    """Read one embedding file (any layout in the module docstring); ``name`` defaults to the file stem."""
    from diffstudio.io.state_dict import read_state_dict

    path = Path(path).expanduser()
    state_dict = read_state_dict(path)
    vectors = _find_vectors(state_dict, path)
    counts = {v.shape[0] for v in vectors.values()}
    if len(counts) != 1 or 0 in counts:
        raise CorruptFileError(f"{path}: the embedding's vector sets have {sorted(counts)} vectors; every set "
                               "needs the same, non-zero count")
    return Embedding(name or path.stem, vectors, str(path))


def _find_vectors(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    floats = {k: v for k, v in sd.items() if v.is_floating_point()}
    params = {k: v for k, v in floats.items() if k.startswith("string_to_param.")}
    if params:  # A1111 .pt
        chosen = params.get("string_to_param.*", next(iter(params.values())))
        return {"": _as_matrix(chosen, path)}
    if "emb_params" in floats:
        return {"": _as_matrix(floats["emb_params"], path)}
    if any(k in floats for k in _SDXL_KEYS):
        return {k: _as_matrix(floats[k], path) for k in _SDXL_KEYS if k in floats}
    if len(floats) == 1:  # diffusers: {"<token>": tensor}
        return {"": _as_matrix(next(iter(floats.values())), path)}
    shown = ", ".join(list(sd)[:6]) + (" ..." if len(sd) > 6 else "")
    raise UnsupportedFormatError(
        f"{path}: not a textual-inversion embedding diffstudio recognises (keys: {shown or 'none'}); expected "
        "string_to_param (A1111 .pt), emb_params, clip_l/clip_g (SDXL) or one {token: tensor} entry (diffusers)")


def _as_matrix(tensor: torch.Tensor, path: Path) -> torch.Tensor:
    """(C,) or (N, C) (or (1, N, C)) -> a contiguous float32 (N, C) tensor on the CPU."""
    if tensor.ndim == 1:
        tensor = tensor[None]
    while tensor.ndim > 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 2:
        raise CorruptFileError(f"{path}: embedding vectors of shape {tuple(tensor.shape)}; expected (N, width)")
    return tensor.detach().to("cpu", torch.float32).contiguous()


def load_embeddings(path_or_folder: str | Path, name: str | None = None) -> list[Embedding]:
    """An embedding file, or every ``.safetensors`` / ``.pt`` / ``.bin`` file under a folder (sorted).

    Each is named by its file stem, or ``name`` for a single file. Raises on a file that is not an
    embedding (a folder must hold embeddings only).
    """
    from diffstudio.io.folders import existing_path

    path = existing_path(path_or_folder, "embedding")
    if path.is_dir():
        if name is not None:
            raise InvalidInputError(f"{path} is a folder: its embeddings are named by their files; drop name=")
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in EMBEDDING_EXTENSIONS)
        return [load_embedding(f) for f in files]
    return [load_embedding(path, name)]


# --------------------------------------------------------------------------------------------- injection


@dataclass(frozen=True)
class EmbeddingSlot:
    """Where an embedding's vectors go: row ``row`` of the encoder batch, positions ``start``..start+N-1."""

    row: int
    start: int
    embedding: Embedding


@contextlib.contextmanager
def inject(text_encoder: torch.nn.Module, slots: Sequence[EmbeddingSlot]) -> Iterator[None]:
    """While active, the encoder's token-embedding layer outputs the slots' vectors at their positions.

    Every slot's width is checked (:class:`EmbeddingMismatchError`) before anything is hooked.
    """
    if not slots:
        yield
        return
    layer = text_encoder.get_input_embeddings()
    width = layer.weight.shape[1]
    resolved = [(s.row, s.start, s.embedding.vectors_for(width)) for s in slots]

    def replace_rows(_module, _args, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()  # (rows, tokens, C); never write into the layer's own result
        for row, start, vectors in resolved:
            output[row, start : start + vectors.shape[0]] = vectors.to(output.device, output.dtype)
        return output

    handle = layer.register_forward_hook(replace_rows)
    try:
        yield
    finally:
        handle.remove()
