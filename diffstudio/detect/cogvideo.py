"""Recognise a CogVideoX transformer and derive its ``CogVideoConfig`` from key names and tensor shapes.

Canonical names are diffusers' ``CogVideoXTransformer3DModel`` names (the released ``transformer/`` folders and
single-file transformer weights use them). What shapes reveal:
    inner width, text width     ``patch_embed.text_proj.weight``               (inner, 4096 for T5-XXL)
    head width -> heads         ``transformer_blocks.0.attn1.norm_q.weight``    (head_dim,)
    patching                    ``patch_embed.proj.weight``: 4-D (inner, C, p, p) = 1.0's convolution;
                                2-D (inner, C * p_t * p * p) = 1.5's linear map (p = p_t = 2 by convention)
    out channels                ``proj_out.weight`` rows / (p * p [* p_t])
    time width                  ``time_embedding.linear_1.weight``              (512, inner)
    depth                       count of ``transformer_blocks.N``
    learned position table      ``patch_embed.pos_embedding`` present (5B-I2V)
    "ofs" embedding             ``ofs_embedding.*`` present (1.5 I2V)

What they cannot reveal: whether positions are sinusoids or a 3D RoPE (neither has weights). The released
convention: only the 2B model (inner width 1920) uses sinusoids; every other release (5B, 5B-I2V, 1.5) rotates.
``hints={"use_rotary_positional_embeddings": bool}`` or a stored config (config.json, diffstudio metadata) says
otherwise. The training size (90x60 latents, 49 frames; 1.5: 300x300, 81 frames) comes from the same conventions.
"""

from __future__ import annotations

from collections.abc import Mapping

from diffstudio.detect.vae import count_indices
from diffstudio.errors import UnknownModelError
from diffstudio.models.cogvideo import CogVideoConfig

COGVIDEO_SENTINELS = (
    "patch_embed.proj.weight",
    "patch_embed.text_proj.weight",
    "time_embedding.linear_1.weight",
    "transformer_blocks.0.norm1.linear.weight",
    "transformer_blocks.0.attn1.to_q.weight",
    "norm_final.weight",
    "norm_out.linear.weight",
    "proj_out.weight",
)
# DiffSynth-Studio's CogDiT names (diffstudio.convert.cogvideo).
COGVIDEO_DIFFSYNTH_SENTINELS = (
    "patchify.proj.weight",
    "context_embedder.weight",
    "time_embedder.timestep_embedder.0.weight",
    "blocks.0.attn1.to_q.weight",
    "blocks.0.norm_q.weight",
    "proj_out.weight",
)
WIDTH_2B = 1920  # 30 heads x 64: the one release with sinusoidal positions
HINTABLE = {f for f in CogVideoConfig.__dataclass_fields__}
V15_TRAINING_SIZE = dict(sample_width=300, sample_height=300, sample_frames=81)


def _shape(sd: Mapping, key: str) -> tuple[int, ...]:
    return tuple(int(d) for d in sd[key].shape)


def derive_cogvideo_config(sd: Mapping, hints: Mapping | None = None) -> CogVideoConfig:
    """Canonical state dict (names + shapes only) -> CogVideoConfig."""
    hints = dict(hints or {})
    unknown = set(hints) - HINTABLE
    if unknown:
        raise ValueError(f"derive_cogvideo_config: unknown hints {sorted(unknown)} (allowed: {sorted(HINTABLE)})")
    missing = [k for k in COGVIDEO_SENTINELS if k not in sd]
    if missing:
        raise UnknownModelError(f"not a CogVideoX transformer state dict: missing {missing}")
    inner, text_dim = _shape(sd, "patch_embed.text_proj.weight")
    head_dim = _shape(sd, "transformer_blocks.0.attn1.norm_q.weight")[0]
    if inner % head_dim:
        raise UnknownModelError(f"CogVideoX QK-norm width {head_dim} does not divide the width {inner}")
    proj = _shape(sd, "patch_embed.proj.weight")
    values: dict = {}
    if len(proj) == 4:  # 1.0: Conv2d (inner, C, p, p)
        p, pt, in_channels = proj[2], None, proj[1]
    elif len(proj) == 2:  # 1.5: Linear over (C, p_t, p, p) patches
        p, pt = int(hints.get("patch_size", 2)), int(hints.get("patch_size_t", 2))
        if proj[1] % (p * p * pt):
            raise UnknownModelError(f"CogVideoX 1.5 patch map of width {proj[1]} is not C x {pt} x {p} x {p}")
        in_channels = proj[1] // (p * p * pt)
        values.update(V15_TRAINING_SIZE)
    else:
        raise UnknownModelError(f"patch_embed.proj.weight of shape {proj}: neither a 2D patch convolution nor a "
                                "linear patch map")
    out_rows = _shape(sd, "proj_out.weight")[0]
    ofs = "ofs_embedding.linear_1.weight" in sd
    values.update(
        num_attention_heads=inner // head_dim,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=out_rows // (p * p * (pt or 1)),
        time_embed_dim=_shape(sd, "time_embedding.linear_1.weight")[0],
        ofs_embed_dim=_shape(sd, "ofs_embedding.linear_1.weight")[0] if ofs else None,
        text_embed_dim=text_dim,
        num_layers=count_indices(list(sd), "transformer_blocks"),
        attention_bias="transformer_blocks.0.attn1.to_q.bias" in sd,
        patch_size=p,
        patch_size_t=pt,
        patch_bias=len(proj) == 4 and "patch_embed.proj.bias" in sd,  # 1.5's linear map has a bias regardless
        use_rotary_positional_embeddings=inner != WIDTH_2B,
        use_learned_positional_embeddings="patch_embed.pos_embedding" in sd,
    )
    values.update(hints)
    return CogVideoConfig.from_dict(values)


def config_from_diffusers(config_json: Mapping) -> CogVideoConfig:
    """A diffusers ``CogVideoXTransformer3DModel`` config.json dict (or our stored config) -> CogVideoConfig."""
    class_name = config_json.get("_class_name", "CogVideoXTransformer3DModel")
    if class_name != "CogVideoXTransformer3DModel":  # another family's transformer/ folder
        raise UnknownModelError(f"a {class_name} config, not a CogVideoXTransformer3DModel's")
    cfg = {k: v for k, v in config_json.items() if not k.startswith("_")}
    for name, released in (("activation_fn", "gelu-approximate"), ("timestep_activation_fn", "silu")):
        if cfg.get(name, released) != released:
            raise UnknownModelError(f"CogVideoX transformer with {name}={cfg[name]!r}: every release uses {released!r}")
    if not cfg.get("norm_elementwise_affine", True) or cfg.get("flip_sin_to_cos", True) is not True \
            or cfg.get("freq_shift", 0) != 0:
        raise UnknownModelError("CogVideoX transformer with a time embedding or norm unlike the releases' "
                                "(flip_sin_to_cos, freq_shift, norm_elementwise_affine)")
    return CogVideoConfig.from_dict(cfg)
