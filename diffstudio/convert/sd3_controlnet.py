"""SD3 ControlNet state dicts: diffusers' SD3ControlNetModel layout <-> ours (models/sd3_controlnet.py).

The embedders and joint blocks map as the MMDiT's do (``diffstudio.convert.mmdit``: fused qkv, ``joint_blocks.i``
<-> ``transformer_blocks.i``), except that no block's text stream is pre-only. The single-stream blocks of the SD3.5
ControlNets map like one stream of a joint block (``adaLN_modulation.1`` <-> ``norm1.linear``, fused qkv, ``proj``
<-> ``to_out.0``, ``mlp.fc1/fc2`` <-> ``ff.net.0.proj / ff.net.2``). ``pos_embed_input`` and ``controlnet_blocks``
keep their names.

Stability's own SD3.5 files (``sd3.5_large_controlnet_canny.safetensors``) hold those single-stream blocks in our
names already and their embedders in diffusers' names (as diffusers' conversion script for them reads them); both
spellings are read, diffusers' is written. Their ``control_type`` entry is not a weight and is left out.

Both directions end in the conversion check against our model built on the meta device.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffstudio.convert.mmdit import attention_rules, embedder_rules, joint_block_rules
from diffstudio.convert.rules import Rule, from_canonical, rule, to_canonical
from diffstudio.detect.sd3_controlnet import derive_sd3_controlnet_config
from diffstudio.detect.vae import count_indices
from diffstudio.errors import ConversionError
from diffstudio.models.sd3_controlnet import SD3ControlNet, SD3ControlNetConfig

NOT_WEIGHTS = ("control_type",)  # in Stability's SD3.5 files: which control the file was trained for


def single_block_rules(i: int) -> list[Rule]:
    """One single-stream block; theirs (diffusers' SD3SingleTransformerBlock) and ours share ``transformer_blocks.i``.
    The read-only rules accept Stability's files, whose blocks carry our names."""
    b = f"transformer_blocks.{i}"
    out = [rule(f"{b}.adaLN_modulation.1", f"{b}.norm1.linear")]
    out += attention_rules(f"{b}.attn", f"{b}.attn", ("to_q", "to_k", "to_v"), "to_out.0", None)
    out += [rule(f"{b}.mlp.fc1", f"{b}.ff.net.0.proj"), rule(f"{b}.mlp.fc2", f"{b}.ff.net.2")]
    return out + [rule(f"{b}.{name}", f"{b}.{name}", read_only=True)
                  for name in ("adaLN_modulation", "attn.qkv", "attn.proj", "mlp")]


def rules(depth: int, joint: bool, own_embedding: bool, dual_layers, qk_norm: bool) -> list[Rule]:
    """The rules of an SD3 ControlNet of this structure (canonical module <-> diffusers module(s))."""
    out = embedder_rules(has_y=True, patch_embed=own_embedding, context=joint)
    for i in range(depth):
        out += (joint_block_rules(f"joint_blocks.{i}", f"transformer_blocks.{i}", False, i in dual_layers, qk_norm)
                if joint else single_block_rules(i))
    return out + [rule("pos_embed_input.proj", "pos_embed_input.proj")] + [
        rule(f"controlnet_blocks.{i}", f"controlnet_blocks.{i}") for i in range(depth)]


def meta_state_dict(config: SD3ControlNetConfig) -> dict[str, torch.Tensor]:
    """Our model's names and shapes (meta tensors, nothing allocated)."""
    with torch.device("meta"):
        return SD3ControlNet(config).state_dict()


def sd3_controlnet_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers SD3ControlNetModel state dict (or a Stability SD3.5 ControlNet file) -> ours."""
    sd = {k: v for k, v in sd.items() if k not in NOT_WEIGHTS}
    depth = count_indices(sd, "transformer_blocks")
    if depth == 0 or "pos_embed_input.proj.weight" not in sd:
        raise ConversionError("no transformer_blocks.N / pos_embed_input.proj keys: this is not a diffusers "
                              "SD3ControlNetModel state dict (is it already in diffstudio's layout?)")
    joint = "transformer_blocks.0.attn.add_q_proj.weight" in sd
    dual = {i for i in range(depth) if f"transformer_blocks.{i}.attn2.to_q.weight" in sd}
    qk_norm = "transformer_blocks.0.attn.norm_q.weight" in sd
    structure = rules(depth, joint, "pos_embed.proj.weight" in sd, dual, qk_norm)
    # Without QK-norm the head count changes no name or shape (one head always divides the width).
    return to_canonical("diffusers -> diffstudio SD3 ControlNet", sd, structure,
                        lambda out: meta_state_dict(derive_sd3_controlnet_config(out, {} if qk_norm else
                                                                                 {"num_heads": 1})))


def sd3_controlnet_to_diffusers(sd: Mapping[str, torch.Tensor], config: SD3ControlNetConfig) -> dict[str, torch.Tensor]:
    """Ours -> diffusers SD3ControlNetModel state dict."""
    structure = rules(config.depth, config.joint, config.own_embedding, set(config.dual_attention_layers),
                      config.qk_norm is not None)
    return from_canonical("diffstudio -> diffusers SD3 ControlNet", sd, structure, meta_state_dict(config))
