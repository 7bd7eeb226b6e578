"""Attention-mode region prompts: one pass, every prompt's text tokens in one context, and an
attention bias that lets each image token see only the prompts that hold it.

The models take the bias through their conditioning kwargs (docs/regions.md, "Model hook"):

* cross-attention models (the LDM UNet; Hunyuan-DiT), ``region_attention = "cross"``:
  ``context_bias = {image_tokens: (1, 1, image_tokens, text_tokens)}``, one additive bias per
  token grid the model's cross-attention layers run at (a UNet has one per level), looked up by
  the number of image tokens and passed to ``layers.attention(mask=...)``;
* joint-attention models (SD3 MMDiT, FLUX), ``region_attention = "joint"``:
  ``joint_bias``: one (1, 1, T + N, T + N) additive bias over the joint sequence, text tokens first.

A model also gives its token grids for a latent size (``region_token_grids(h, w)``). The text
entries of the conditioning are found by shape (``text_keys``): 3-D float tensors (B, T, D) are
token sequences, 2-D integer/bool tensors (B, T) their masks; their axis 1 is concatenated prompt
by prompt, and the 3-D ones, in the conditioning's order, make the attention's text axis (the
order in which the model concatenates them; a model may name them in ``region_text_keys``).
Every other entry (pooled vectors, guidance, size conditions) is the global prompt's.
"""

from __future__ import annotations

import torch

from diffstudio.errors import RegionError
from diffstudio.pipeline.region_masks import token_grid_weights

HOOK_KWARG = {"cross": "context_bias", "joint": "joint_bias"}


def region_hook(net) -> str:
    """The attention kind a denoiser network declares ("cross" or "joint"), or RegionError."""
    kind = getattr(net, "region_attention", None)
    if kind not in HOOK_KWARG:
        raise RegionError(f"the {type(net).__name__} denoiser has no region-attention hook, so region_mode="
                          "'attention' cannot run on it; use region_mode='latent' (works for every model)")
    return kind


def text_keys(net, cond: dict) -> tuple[str, ...]:
    """The conditioning entries whose axis 1 is a text token axis: the model's ``region_text_keys``
    if it names them, else 3-D float tensors (token sequences) and 2-D integer/bool tensors (masks)."""
    named = getattr(net, "region_text_keys", None)
    if named:
        return tuple(named)

    def is_text(v) -> bool:
        return isinstance(v, torch.Tensor) and (v.ndim == 3 and v.is_floating_point()
                                                or v.ndim == 2 and not v.is_floating_point())

    return tuple(k for k, v in cond.items() if is_text(v))


def merge_conditioning(conds: list[dict], text_keys: tuple[str, ...]) -> tuple[dict, list[int]]:
    """Per-prompt conditionings (global first) -> one conditioning whose text entries hold every
    prompt's tokens in turn, and the group (prompt index) of each token of the attention's text axis."""
    merged = dict(conds[0])
    groups: list[torch.Tensor] = []
    for key in text_keys:
        if key not in conds[0]:
            raise RegionError(f"the model says its text tokens are in {key!r}, but the conditioning has "
                              f"only {sorted(conds[0])}")
        parts = [c[key] for c in conds]
        merged[key] = torch.cat(parts, dim=1)
        if parts[0].ndim == 3:  # a token sequence (B, T, D); 2-D entries are its masks
            groups += [torch.full((p.shape[1],), g, dtype=torch.long) for g, p in enumerate(parts)]
    return merged, torch.cat(groups).tolist()


def _log(weights: torch.Tensor) -> torch.Tensor:
    """log of weights in [0, 1]; exactly -inf where a weight is 0 (the token gets no attention)."""
    return torch.where(weights > 0, weights.clamp(min=1e-30).log(), torch.tensor(float("-inf")))


def cross_attention_bias(weights: torch.Tensor, groups: list[int], grids: list[tuple[int, int]]) -> dict:
    """(G, h, w) blending weights -> {image tokens: (1, 1, image tokens, text tokens)} for each grid.

    The bias of text token k for image token q is log W[group(k), q]: softmax then gives each
    prompt's tokens its attention mass times W, and a prompt with W = 0 none at all.
    """
    index = torch.tensor(groups)
    out = {}
    for grid in grids:
        log_w = _log(token_grid_weights(weights, grid))                   # (G, N)
        out[grid[0] * grid[1]] = log_w[index].T[None, None].contiguous()  # (1, 1, N, T)
    return out


def joint_attention_bias(weights: torch.Tensor, groups: list[int], grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1, T + N, T + N) bias for joint attention over [text tokens, image tokens].

    image -> text: log W (as in cross-attention); text -> text: only within the same prompt;
    text -> image: a prompt's tokens see the image tokens where its weight is > 0; image -> image: all.
    """
    index = torch.tensor(groups)
    w = token_grid_weights(weights, grid)[index]                           # (T, N)
    t, n = w.shape
    bias = torch.zeros(t + n, t + n)
    same = index[:, None] == index[None, :]
    bias[:t, :t] = torch.where(same, 0.0, float("-inf"))
    bias[:t, t:] = torch.where(w > 0, 0.0, float("-inf"))
    bias[t:, :t] = _log(w).T
    return bias[None, None]


def attention_conditioning(net, conds: list[dict], unconds: list[dict], weights: torch.Tensor,
                           latent_hw: tuple[int, int]) -> tuple[dict, dict]:
    """The one-pass conditioning (cond, uncond): merged text tokens, plus the bias the network's hook
    takes (one object, shared by both branches: the prompts and their negatives were encoded in one
    batch, so their token groups line up)."""
    kind = region_hook(net)
    keys = text_keys(net, conds[0])
    cond, groups = merge_conditioning(conds, keys)
    uncond, uncond_groups = merge_conditioning(unconds, keys)
    if groups != uncond_groups:
        raise RegionError("the prompts and negative prompts of the regions encode to different token "
                          "lengths; attention mode needs them alike (use region_mode='latent')")
    grids = list(net.region_token_grids(*latent_hw))
    if kind == "cross":
        bias = cross_attention_bias(weights, groups, grids)
    else:
        bias = joint_attention_bias(weights, groups, grids[0])
    cond[HOOK_KWARG[kind]] = uncond[HOOK_KWARG[kind]] = bias
    return cond, uncond
