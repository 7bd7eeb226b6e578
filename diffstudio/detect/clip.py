"""CLIP text encoder: derive a ``transformers.CLIPTextConfig`` from key names and tensor shapes.

Reference: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision" (CLIP), section 2.4: the text encoder is a GPT-2 style pre-LN Transformer with
causal attention over at most 77 tokens, head width 64, lower-cased byte-pair encoding with
a 49,152 merge vocabulary (+ 256 byte tokens + 2 specials = 49,408 ids), and the feature
at the end-of-text token as the pooled text embedding.

Input: a state dict in the *canonical* layout, the released Hugging Face layout WITH the
``text_model.`` level (``diffstudio.convert.clip.canonical_clip_keys`` produces it from every
other layout). Only names and shapes are read, so meta tensors work.

What shapes reveal:
    vocab_size                 rows of ``embeddings.token_embedding.weight``      (V, C)
    hidden_size                its columns C
    max_position_embeddings    rows of ``embeddings.position_embedding.weight``   (77, C)
    intermediate_size          rows of ``encoder.layers.0.mlp.fc1.weight``        (4C, C)
    num_hidden_layers          count of ``encoder.layers.N``
    projection_dim             rows of ``text_projection.weight`` (P, C), when present; the config's
                               ``architectures`` then names CLIPTextModelWithProjection

What shapes cannot reveal, and where it comes from instead (``hints``, supplied by the family
record or a config stored with the weights):
    num_attention_heads        CLIP convention: head width 64, so C / 64 (CLIP-L 12, ViT-H 16,
                               bigG 20). A width that is not a multiple of 64 (tiny test
                               models) has no convention: the hint is then required.
    hidden_act                 default "quick_gelu" (OpenAI CLIP, the SD 1.x text encoder);
                               OpenCLIP ViT-H / bigG (SD 2.x, SDXL's second encoder) use "gelu"
                               and their family records must say so.
    layer_norm_eps             default 1e-5 (both OpenAI CLIP and OpenCLIP).
    bos/eos/pad token ids      defaults of the CLIP vocabulary: 49406 / 49407 / 49407.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from transformers import CLIPTextConfig

from diffstudio.errors import UnknownModelError

# Canonical keys that identify a CLIP text encoder (relative to the component).
CLIP_SENTINELS: tuple[str, ...] = (
    "text_model.embeddings.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight",
    "text_model.encoder.layers.0.self_attn.q_proj.weight",
    "text_model.final_layer_norm.weight",
)

# The same encoder in OpenCLIP's layout (SD 2.x ``cond_stage_model.model.``, SDXL
# ``conditioner.embedders.1.model.``, the refiner's ``conditioner.embedders.0.model.``);
# ``diffstudio.convert.clip.canonical_clip_keys`` converts it.
OPENCLIP_SENTINELS: tuple[str, ...] = (
    "token_embedding.weight",
    "positional_embedding",
    "transformer.resblocks.0.attn.in_proj_weight",
    "ln_final.weight",
)

# transformers' class name for an encoder with a text projection. A config carries it in
# ``architectures`` (as HF folders' config.json do) because the projection's presence is a fact
# of the weights that the class must agree with: ``build_clip_text_model`` reads it.
WITH_PROJECTION = "CLIPTextModelWithProjection"

# Special ids of the CLIP BPE vocabulary (diffstudio/data/tokenizers/clip/vocab.json).
CLIP_BOS_ID = 49406  # <|startoftext|>
CLIP_EOS_ID = 49407  # <|endoftext|>
CLIP_PAD_ID = 49407  # SD 1.x pads with <|endoftext|>; SD 2.x's tokenizer pads with "!" (id 0)

CLIP_HEAD_WIDTH = 64
DEFAULT_HIDDEN_ACT = "quick_gelu"

# Hyper-parameters a hint may supply: exactly those that shapes cannot reveal.
HINTABLE = frozenset(
    {"num_attention_heads", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id"}
)

_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")


def count_clip_layers(sd: Mapping[str, Any]) -> int:
    """Number of transformer blocks; the indices must run 0..N-1 without gaps."""
    indices = {int(m.group(1)) for key in sd if (m := _LAYER.match(key))}
    if not indices:
        raise UnknownModelError(
            "CLIP text encoder state dict has no 'text_model.encoder.layers.N.*' keys; "
            "pass it through diffstudio.convert.clip.canonical_clip_keys first."
        )
    if indices != set(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise UnknownModelError(f"CLIP text encoder layers are not contiguous: layers {missing} are missing.")
    return len(indices)


def derive_clip_config(sd: Mapping[str, Any], hints: Mapping[str, Any] | None = None) -> CLIPTextConfig:
    """A ``CLIPTextConfig`` from a canonical CLIP text state dict (names and shapes only).

    ``hints`` (optional) may set only the fields in ``HINTABLE``; see the module docstring.
    """
    hints = dict(hints or {})
    unknown = set(hints) - HINTABLE
    if unknown:
        raise ValueError(
            f"derive_clip_config: hints {sorted(unknown)} are not allowed; shapes decide those. "
            f"Allowed hints: {sorted(HINTABLE)}."
        )
    missing = [k for k in CLIP_SENTINELS if k not in sd]
    if missing:
        raise UnknownModelError(
            f"Not a canonical CLIP text encoder state dict: missing {missing}. "
            "Normalise it with diffstudio.convert.clip.canonical_clip_keys (it reads the HF, "
            "transformers-5, LDM and OpenCLIP layouts)."
        )

    vocab_size, hidden = _shape(sd, "text_model.embeddings.token_embedding.weight")
    max_positions, _ = _shape(sd, "text_model.embeddings.position_embedding.weight")
    intermediate, _ = _shape(sd, "text_model.encoder.layers.0.mlp.fc1.weight")
    layers = count_clip_layers(sd)

    heads = hints.get("num_attention_heads")
    if heads is None:
        if hidden % CLIP_HEAD_WIDTH:
            raise UnknownModelError(
                f"CLIP text width {hidden} is not a multiple of the conventional head width "
                f"{CLIP_HEAD_WIDTH}, so the number of attention heads cannot be derived. Pass "
                "hints={'num_attention_heads': N} (from the config stored with the weights)."
            )
        heads = hidden // CLIP_HEAD_WIDTH
    if heads <= 0 or hidden % heads:
        raise UnknownModelError(f"num_attention_heads={heads} does not divide the CLIP text width {hidden}.")

    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": max_positions,
        "hidden_act": hints.get("hidden_act", DEFAULT_HIDDEN_ACT),
        "layer_norm_eps": hints.get("layer_norm_eps", 1e-5),
        "bos_token_id": hints.get("bos_token_id", CLIP_BOS_ID),
        "eos_token_id": hints.get("eos_token_id", CLIP_EOS_ID),
        "pad_token_id": hints.get("pad_token_id", CLIP_PAD_ID),
    }
    if "text_projection.weight" in sd:
        # nn.Linear(C, P, bias=False): weight is (P, C).
        projection_dim, proj_in = _shape(sd, "text_projection.weight")
        if proj_in != hidden:
            raise UnknownModelError(
                f"text_projection.weight takes width {proj_in}, the encoder gives {hidden}."
            )
        fields["projection_dim"] = projection_dim
        fields["architectures"] = [WITH_PROJECTION]
    return CLIPTextConfig(**fields)


def has_text_projection(sd: Mapping[str, Any]) -> bool:
    """True when the encoder carries a projection (build a CLIPTextModelWithProjection)."""
    return "text_projection.weight" in sd


def config_wants_projection(config: CLIPTextConfig) -> bool:
    """True when ``config`` describes a CLIPTextModelWithProjection (see ``WITH_PROJECTION``)."""
    return WITH_PROJECTION in (getattr(config, "architectures", None) or ())


def clip_config_from_dict(data: Mapping[str, Any]) -> CLIPTextConfig:
    """A config.json dict (HF folder) or our stored metadata -> CLIPTextConfig, keeping the
    projection marker (``architectures``) that decides which transformers class is built."""
    from diffstudio.families.base import clip_config_from_json

    config = clip_config_from_json(dict(data))
    if WITH_PROJECTION in (data.get("architectures") or ()):
        config.architectures = [WITH_PROJECTION]
    return config


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return tuple(int(d) for d in sd[key].shape)
