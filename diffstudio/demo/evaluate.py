"""Measure the demo model with the scorer: does the picture show what the prompt says?

    python -m diffstudio.demo evaluate --pairs 120

Single-shape prompts drawn from the Shapes world's own caption grammar (held-out seeds),
one image per (prompt, seed) pair at the default sampler and steps.
"""

from __future__ import annotations

import random

from diffstudio.demo.shapes import KINDS, POSITIONS, ShapeSpec

SAMPLED_KINDS = ("circle", "square", "triangle", "star")
# Every registered sampler at its usual step count (the sampler check of tests and tools/shapes/eval_variant.py).
USUAL_STEPS = {"euler": 20, "euler_ancestral": 25, "heun": 12, "dpmpp_2m": 15, "dpmpp_2m_sde": 20, "ddim": 20,
               "lcm": 25}


def single_shape_prompts(n: int, seed: int = 12345) -> list[tuple[str, ShapeSpec]]:
    rng = random.Random(seed)
    colors = ("red", "green", "blue", "yellow", "purple", "cyan")
    positions = [p for p in POSITIONS if p]
    out = []
    for _ in range(n):
        spec = ShapeSpec(kind=rng.choice([k for k in SAMPLED_KINDS if k in KINDS]), color=rng.choice(colors),
                         position=rng.choice(positions))
        words = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                 "center": "in the center"}
        out.append((f"a {spec.color} {spec.kind} {words[spec.position]}, white background", spec))
    return out


def scored_pairs(models=None, pairs: int = 120, steps: int | None = None, sampler: str | None = None,
                 seed: int = 1000, progress: bool = True):
    """Yield (asked ShapeSpec, the scorer's result) for each evaluation pair: prompt i drawn with seed + i."""
    import diffstudio
    from diffstudio.demo.score import score_prompt

    pipe = diffstudio.Pipeline(models or diffstudio.load())
    prompts = single_shape_prompts(pairs)
    if progress:
        from tqdm.auto import tqdm

        prompts = tqdm(prompts, desc="evaluate")
    for i, (prompt, spec) in enumerate(prompts):
        image = pipe(prompt, seed=seed + i, steps=steps, sampler=sampler, progress=False)[0]
        yield spec, score_prompt(image, prompt)


def evaluate(models=None, pairs: int = 120, steps: int | None = None, sampler: str | None = None,
             seed: int = 1000, progress: bool = True) -> dict:
    totals = {"color_ok": 0, "kind_ok": 0, "position_ok": 0, "all_ok": 0}
    for _, result in scored_pairs(models, pairs, steps, sampler, seed, progress):
        for key in totals:
            totals[key] += bool(result[key])
    return {k: v / pairs for k, v in totals.items()} | {"pairs": pairs}
