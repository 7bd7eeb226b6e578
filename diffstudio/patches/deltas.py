"""Weight deltas of the adapter formats, as pure functions of their factors (float32 math).

Every function returns ``ΔW`` at strength 1 in float32; the caller reshapes it to the target
weight and multiplies by the user's strength. ``scale`` is the file's own factor (alpha / rank).

* LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3):
  ``ΔW = scale · B A`` with A = ``down`` (r, in[, kh, kw]) and B = ``up`` (out, r[, 1, 1]).
  For a convolution the r filters of ``down`` carry the kernel, ``up`` is 1x1:
  ``ΔW[o, i, y, x] = scale · Σ_r up[o, r] down[r, i, y, x]``. LyCORIS' CP variant (``lora_mid``,
  r x r x kh x kw, with 1x1 ``down``/``up``): ``ΔW[o,i,y,x] = scale · Σ_ab up[o,a] mid[a,b,y,x] down[b,i]``.
* LoHa (Yeh et al. 2023, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
  Evaluation", sec. 3; Hadamard product of two low-rank matrices after FedPara):
  ``ΔW = scale · (W1a W1b) ⊙ (W2a W2b)``; with CP factors (``hada_t1``/``t2``, r x r x kh x kw) each
  ``Wk[o, i, y, x] = Σ_ab t[a, b, y, x] · wa[a, o] · wb[b, i]`` (there ``wa`` is (r, out), ``wb`` (r, in)).
* LoKr (same paper, Kronecker product): ``ΔW = scale · W1 ⊗ W2``, each factor given whole
  (``lokr_w1``) or low-rank (``lokr_w1_a @ lokr_w1_b``), W2 also in CP form with ``lokr_t2``.
  For a convolution W1 is (a, b) and W2 is (c, d, kh, kw): the product is (a·c, b·d, kh, kw).
* Full difference (LyCORIS "full"/"diff", and norm-layer patches): ``ΔW = diff``.
* DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. 5): the adapted weight
  is ``W' = m · (W + ΔW) / ||W + ΔW||`` with the norm taken per output row (``m`` of shape (out,))
  or per input column (``m`` of shape (in,)), so the delta depends on the base weight:
  ``ΔW_dora = W' - W``.
"""

from __future__ import annotations

import torch

from diffstudio.errors import LoRAMismatchError


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.float()


def lora_delta(down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None = None,
               scale: float = 1.0) -> torch.Tensor:
    """``scale · up @ down`` (Hu et al. 2021); conv kernels ride on ``down`` or on ``mid`` (CP)."""
    down, up = _f(down), _f(up)
    rank = down.shape[0]
    up2 = up.reshape(up.shape[0], -1)                                   # (out, r)
    if mid is None:
        delta = up2 @ down.reshape(rank, -1)                             # (out, in·kh·kw)
        return (delta.reshape(up.shape[0], *down.shape[1:]) * scale)
    mid = _f(mid)                                                        # (r, r, kh, kw)
    down2 = down.reshape(rank, -1)                                      # (r, in) from (r, in, 1, 1)
    delta = torch.einsum("oa,abyx,bi->oiyx", up2, mid, down2)           # (out, in, kh, kw)
    return delta * scale


def cp_factor(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A CP (Tucker-2) factor: ``W[o, i, y, x] = Σ_ab t[a, b, y, x] · wa[a, o] · wb[b, i]``."""
    return torch.einsum("abyx,ao,bi->oiyx", _f(t), _f(wa), _f(wb))


def loha_delta(w1a, w1b, w2a, w2b, t1=None, t2=None, scale: float = 1.0) -> torch.Tensor:
    """``scale · (W1a W1b) ⊙ (W2a W2b)`` (LoHa, Yeh et al. 2023); CP factors when t1/t2 are given."""
    w1 = cp_factor(t1, w1a, w1b) if t1 is not None else _f(w1a) @ _f(w1b)
    w2 = cp_factor(t2, w2a, w2b) if t2 is not None else _f(w2a) @ _f(w2b)
    return w1 * w2 * scale


def lokr_delta(w1=None, w1a=None, w1b=None, w2=None, w2a=None, w2b=None, t2=None,
               scale: float = 1.0) -> torch.Tensor:
    """``scale · W1 ⊗ W2`` (LoKr, Yeh et al. 2023), each factor whole or low-rank."""
    if w1 is None:
        w1 = _f(w1a) @ _f(w1b)
    if w2 is None:
        w2 = cp_factor(t2, w2a, w2b) if t2 is not None else _f(w2a) @ _f(w2b)
    w1, w2 = _f(w1), _f(w2)
    if w2.ndim > w1.ndim:  # conv: (a, b) ⊗ (c, d, kh, kw) -> (a·c, b·d, kh, kw)
        w1 = w1.reshape(*w1.shape, *([1] * (w2.ndim - w1.ndim)))
    return torch.kron(w1.contiguous(), w2.contiguous()) * scale


def dora_delta(base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``m · (W + ΔW) / ||W + ΔW|| - W`` (DoRA, Liu et al. 2024); the norm runs over the axis m does not span."""
    base = _f(base)
    adapted = base + delta
    m = _f(magnitude).flatten()
    rows, cols = adapted.shape[0], adapted.shape[1] if adapted.ndim > 1 else 1
    if m.numel() == rows:        # one magnitude per output row (peft, LyCORIS' default)
        norm = adapted.reshape(rows, -1).norm(dim=1)
        m_shape = (rows,) + (1,) * (adapted.ndim - 1)
        return adapted * (m / norm).reshape(m_shape) - base
    if m.numel() == cols:        # one magnitude per input column
        norm = adapted.transpose(0, 1).reshape(cols, -1).norm(dim=1)
        m_shape = (1, cols) + (1,) * (adapted.ndim - 2)
        return adapted * (m / norm).reshape(m_shape) - base
    raise LoRAMismatchError(f"DoRA magnitude of {m.numel()} values fits neither the {rows} rows nor the "
                            f"{cols} columns of a weight of shape {tuple(adapted.shape)}")
