"""CogVideoX transformer state dicts: DiffSynth-Studio's ``CogDiT`` layout <-> ours (diffusers' names).

The released folders use diffusers' names, which are canonical here. DiffSynth-Studio renames the modules of
its own CogVideoX-5B class (``CogDiT``), and files trained on it - such as the ExVideo-CogVideoX LoRA, a peft
LoRA on ``blocks.N.attn1.to_q`` ... - use those names. The rules below are generated from the block count; the
one tensor that changes shape is the patch projection, a Conv3d with a (1, p, p) kernel there (a 2D conv here).
DiffSynth's class holds the 1.0 layout only (no learned position table, no "ofs" embedding).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffstudio.convert.rules import Rule, from_canonical, rule, same, to_canonical
from diffstudio.errors import ConversionError


class Conv3dFrame:
    """Ours is a 2D conv weight (O, I, p, p); theirs a 3D conv over one frame (O, I, 1, p, p)."""

    def to_ours(self, parts: list[torch.Tensor]) -> torch.Tensor:
        t = parts[0]
        return t[:, :, 0] if t.ndim == 5 else t

    def to_theirs(self, tensor: torch.Tensor, n: int) -> list[torch.Tensor]:
        return [tensor.unsqueeze(2) if tensor.ndim == 4 else tensor]


def diffsynth_rules(num_layers: int) -> list[Rule]:
    out = [rule("patch_embed.proj.weight", "patchify.proj.weight", Conv3dFrame()),
           rule("patch_embed.proj.bias", "patchify.proj.bias"),
           rule("patch_embed.text_proj", "context_embedder"),
           rule("time_embedding.linear_1", "time_embedder.timestep_embedder.0"),
           rule("time_embedding.linear_2", "time_embedder.timestep_embedder.2"),
           *same("norm_final", "norm_out", "proj_out")]
    for i in range(num_layers):
        ours, theirs = f"transformer_blocks.{i}", f"blocks.{i}"
        out += [rule(f"{ours}.{m}", f"{theirs}.{m}") for m in
                ("norm1", "norm2", "attn1.to_q", "attn1.to_k", "attn1.to_v")]
        out += [rule(f"{ours}.attn1.to_out.0", f"{theirs}.attn1.to_out"),
                rule(f"{ours}.attn1.norm_q", f"{theirs}.norm_q"), rule(f"{ours}.attn1.norm_k", f"{theirs}.norm_k"),
                rule(f"{ours}.ff.net.0.proj", f"{theirs}.ff.0"), rule(f"{ours}.ff.net.2", f"{theirs}.ff.2")]
    return out


def _count_blocks(keys, prefix: str) -> int:
    from diffstudio.detect.vae import count_indices

    return count_indices(list(keys), prefix)


def _meta_state_dict(config) -> dict:
    from diffstudio.models.cogvideo import CogVideoTransformer

    with torch.device("meta"):
        return CogVideoTransformer(config).state_dict()


def cogvideo_from_diffsynth(sd: Mapping) -> dict[str, torch.Tensor]:
    """DiffSynth ``CogDiT`` state dict -> ours (checked against our model at the config derived from it)."""
    from diffstudio.detect.cogvideo import derive_cogvideo_config

    if "patchify.proj.weight" not in sd:
        raise ConversionError("not a CogVideoX transformer in DiffSynth-Studio's layout: no patchify.proj.weight")
    return to_canonical("CogVideoX DiffSynth -> diffusers names", sd, diffsynth_rules(_count_blocks(sd, "blocks")),
                        lambda out: _meta_state_dict(derive_cogvideo_config(out)))


def cogvideo_to_diffsynth(sd: Mapping, config) -> dict[str, torch.Tensor]:
    """Ours -> DiffSynth's ``CogDiT`` names (1.0 layouts only)."""
    if config.use_learned_positional_embeddings or config.ofs_embed_dim or config.patch_size_t:
        raise ConversionError("DiffSynth-Studio's CogDiT layout has no learned position table, ofs embedding or "
                              "temporal patches")
    return from_canonical("CogVideoX diffusers names -> DiffSynth", sd, diffsynth_rules(config.num_layers),
                          _meta_state_dict(config))
