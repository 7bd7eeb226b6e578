"""Latent-mode region prompts: one denoiser pass per prompt, x0 predictions blended by weight maps.

Every pass (the global prompt, then each region) is an ordinary classifier-free-guided
prediction with its own conditioning and its own negative; the passes' x0 are blended with
per-pixel weights that sum to 1 (``region_masks.blend_weights``). The wrapper only calls the
denoiser, so it works for every family. All branches run in as few network calls as the
``max_batch`` limit allows, stacked along the batch axis.
"""

from __future__ import annotations

import torch


def _tensor_shapes(cond: dict) -> tuple:
    return tuple(sorted((k, tuple(v.shape[1:]), v.dtype) for k, v in cond.items() if isinstance(v, torch.Tensor)))


def _same_call(a: dict, b: dict) -> bool:
    """Can two branches share one network call: same keys, same tensor shapes past the batch axis,
    the very same non-tensor entries (e.g. an attention-bias dict)?"""
    if a.keys() != b.keys() or _tensor_shapes(a) != _tensor_shapes(b):
        return False
    return all(a[k] is b[k] for k in a if not isinstance(a[k], torch.Tensor))


def stack_branches(branches: list[dict]) -> dict:
    """Branch conditionings (each with the batch's rows) -> one conditioning along the batch axis."""
    first = branches[0]
    return {k: torch.cat([b[k] for b in branches]) if isinstance(v, torch.Tensor) else v for k, v in first.items()}


def plan_calls(branches: list[dict], rows: int, max_batch: int | None) -> list[list[int]]:
    """Branch indices per network call: consecutive branches that can share a call, at most
    ``max_batch`` latent rows per call (a branch of ``rows`` rows is never split)."""
    per_call = len(branches) if max_batch is None else max(1, max_batch // rows)
    calls: list[list[int]] = []
    for i, branch in enumerate(branches):
        if calls and len(calls[-1]) < per_call and _same_call(branches[calls[-1][0]], branch):
            calls[-1].append(i)
        else:
            calls.append([i])
    return calls


class RegionLatentDenoiser:
    """x0 = sum_p W_p * (u_p + s (c_p - u_p)) over the passes p (global first, then the regions).

    passes: [(cond, uncond)] with tensors of the batch's rows; weights: (P, h, w) summing to 1.
    With s == 1 the unconditional branches are skipped.
    """

    def __init__(self, inner, passes: list[tuple[dict, dict]], weights: torch.Tensor, scale: float,
                 max_batch: int | None = None):
        self.inner, self.passes, self.scale, self.max_batch = inner, passes, float(scale), max_batch
        self.weights = weights[:, None, None]                              # (P, 1, 1, h, w)
        self.kind = inner.kind
        self.network_calls = 0  # counted for benchmarks

    def __getattr__(self, name):  # sigma_min, sigma_max, noise_scaling, ... of the wrapped denoiser
        return getattr(self.__dict__["inner"], name)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(n)
        branches = [c for c, _ in self.passes]
        if self.scale != 1.0:
            branches += [u for _, u in self.passes]
        outs: list[torch.Tensor | None] = [None] * len(branches)
        for call in plan_calls(branches, n, self.max_batch):
            k = len(call)
            out = self.inner(x.repeat(k, *([1] * (x.ndim - 1))), sigma.repeat(k),
                             **stack_branches([branches[i] for i in call]), **extra)
            self.network_calls += 1
            for i, chunk in zip(call, out.chunk(k)):
                outs[i] = chunk
        p_count = len(self.passes)
        weights = self.weights.to(x)
        if extra.get("tile") is not None:  # tiled diffusion: this call covers one tile of the latent
            top, left, th, tw = extra["tile"]
            weights = weights[..., top:top + th, left:left + tw]
        x0 = torch.zeros_like(x)
        for p in range(p_count):
            pred = outs[p] if self.scale == 1.0 else outs[p_count + p] + self.scale * (outs[p] - outs[p_count + p])
            x0 += weights[p] * pred
        return x0
