"""Fewer network evaluations and less work per evaluation: DeepCache (``deep_cache``), guidance on the first steps
only (``cfg_until``) and token merging (``token_merging``), their speed and their effect on the Shapes demo model's
scores (diffstudio/demo/score.py).

For each evaluation pair (the prompts and seeds of ``python -m diffstudio.demo evaluate``) every variant draws
its image in turn, so load from other processes hits all variants alike; the time per variant is summed over
the pairs and given as a ratio to the plain run.

    python benchmarks/fewer_evaluations.py --pairs 60
    python benchmarks/fewer_evaluations.py --pairs 8 --model /tmp/sd15-random/model.safetensors --size 256
    python benchmarks/fewer_evaluations.py --pairs 48 --variants plain token_merging=0.5 token_merging=0.3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's diffstudio

VARIANTS = {"plain": {}, "deep_cache=1": {"deep_cache": 1}, "deep_cache=2": {"deep_cache": 2},
            "cfg_until=0.5": {"cfg_until": 0.5}, "cfg_until=0.3": {"cfg_until": 0.3},
            "deep_cache=1 + cfg_until=0.5": {"deep_cache": 1, "cfg_until": 0.5},
            "token_merging=0.5": {"token_merging": 0.5}, "token_merging=0.3": {"token_merging": 0.3}}
SCORES = ("color_ok", "kind_ok", "position_ok", "all_ok")


def report(seconds: dict, totals: dict, pairs: int, timed_only: bool) -> None:
    print(f"after {pairs} pairs, load average {os.getloadavg()[0]:.1f}")
    print("| variant | time / plain | " + " | ".join(SCORES) + " |")
    print("|---|---|" + "---|" * len(SCORES))
    for name in VARIANTS:
        scores = " | ".join("-" for _ in SCORES) if timed_only else \
            " | ".join(f"{totals[name][k] / pairs:.3f}" for k in SCORES)
        print(f"| {name} | {seconds[name] / seconds['plain']:.2f} | {scores} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--model", help="another model file (its images are timed, not scored)")
    parser.add_argument("--size", type=int, help="image side (default: the model's)")
    parser.add_argument("--steps", type=int, help="steps (default: the model's)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="run only these (and plain)")
    args = parser.parse_args()
    if args.variants:
        for name in [n for n in VARIANTS if n != "plain" and n not in args.variants]:
            del VARIANTS[name]
    from diffstudio.threads import prepare_threads

    prepare_threads()
    import diffstudio
    from diffstudio.demo.evaluate import single_shape_prompts
    from diffstudio.demo.score import score_prompt

    pipe = diffstudio.Pipeline(diffstudio.load(*([args.model] if args.model else [])))
    size = {"width": args.size, "height": args.size} if args.size else {}
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, {args.pairs} pairs", flush=True)
    seconds = dict.fromkeys(VARIANTS, 0.0)
    totals = {name: dict.fromkeys(SCORES, 0) for name in VARIANTS}
    for i, (prompt, _) in enumerate(single_shape_prompts(args.pairs)):
        names = list(VARIANTS) if i % 2 == 0 else list(reversed(VARIANTS))
        for name in names:
            t = time.perf_counter()
            image = pipe(prompt, seed=1000 + i, steps=args.steps, progress=False, **size, **VARIANTS[name])[0]
            seconds[name] += time.perf_counter() - t
            if not args.model:
                result = score_prompt(image, prompt)
                for key in SCORES:
                    totals[name][key] += bool(result[key])
        if (i + 1) % 8 == 0 and i + 1 < args.pairs:  # a partial table, in case the run is cut short
            report(seconds, totals, i + 1, bool(args.model))
    report(seconds, totals, i + 1, bool(args.model))


if __name__ == "__main__":
    main()
