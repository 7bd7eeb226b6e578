"""`diffstudio generate` on the demo model with and without another busy process on the same cores.

Each run is a fresh process, as a user would start it:

    python -c "import sys; from diffstudio.cli import main; sys.exit(main())" generate "a red circle" -o OUT.png

(the demo model, 64x64, its default 20 steps), run from each checkout given, so the code before a
change and after it are timed the same way, their runs alternating. "hog" starts
``python -c "while True: pass"`` pinned to the same cores for the length of the run (then killed).
Printed per condition: the wall time of the whole command and the generation time the image's
recipe records (``extra.seconds``: sampling + decode), as medians with the range; a run that
outlasts --timeout is counted as such.

    python benchmarks/threads_loaded.py                                  # this checkout, 3 runs
    python benchmarks/threads_loaded.py before=../old after=. one-thread=.@1 --runs 5 --json runs.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMAND = "import sys; from diffstudio.cli import main; sys.exit(main())"


def _pin(cores: set[int] | None):
    return (lambda: os.sched_setaffinity(0, cores)) if cores else None


def _recorded_seconds(image: Path) -> float | None:
    from PIL import Image

    with Image.open(image) as im:
        im.load()
        recipe = json.loads(im.text["diffstudio"])
    return recipe.get("extra", {}).get("seconds")


def one_run(tree: Path, out: Path, cores: set[int] | None, hog: bool, timeout: float, env: dict,
            threads: str | None = None) -> dict:
    hog_process = None
    if hog:
        hog_process = subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=_pin(cores))
        time.sleep(0.5)  # it is running before the command starts
    started = time.perf_counter()
    try:
        options = ["--threads", threads] if threads else []
        done = subprocess.run([sys.executable, "-c", COMMAND, *options, "generate", "a red circle", "-o", str(out)],
                              cwd=tree, env=env, preexec_fn=_pin(cores), capture_output=True, text=True,
                              timeout=timeout)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}
        return {"wall": round(wall, 2), "generation": _recorded_seconds(out)}
    except subprocess.TimeoutExpired:
        return {"timeout": timeout}
    finally:
        if hog_process is not None:
            hog_process.kill()
            hog_process.wait()


def summary(runs: list[dict], key: str) -> str:
    values = [r[key] for r in runs if r.get(key) is not None]
    timeouts = sum("timeout" in r for r in runs)
    if not values:
        return f"{timeouts} timeouts" if timeouts else "no result"
    text = f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"
    return text + (f", {timeouts} timeouts" if timeouts else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="*", default=["."], metavar="LABEL=TREE[@THREADS]",
                        help="checkouts whose diffstudio is run, runs alternating between them (default: this one); "
                             "@N adds --threads N")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cores", help="pin the command and the hog to these cores, e.g. 0,1 (default: no pinning)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a run is given up")
    parser.add_argument("--json", help="also write the runs here")
    args = parser.parse_args()
    trees = dict(t.split("=", 1) if "=" in t else (t, t) for t in args.trees)
    cores = {int(c) for c in args.cores.split(",")} if args.cores else None
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    results = {(label, condition): [] for label in trees for condition in ("idle", "hog")}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(args.runs):  # alternating, so that other processes' load hits every tree alike
            for condition in ("idle", "hog"):
                for label, tree in trees.items():
                    tree, _, threads = tree.partition("@")
                    run = one_run(Path(tree), Path(scratch) / f"{label}{condition}{i}.png", cores,
                                  condition == "hog", args.timeout, env, threads or None)
                    results[(label, condition)].append(run)
                    print(f"  run {i} {label} {condition}: {run}", flush=True)
            loads.append(os.getloadavg()[0])
    print(f"load average (1 min) during the runs: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs")
    for (label, condition), runs in results.items():
        print(f"{label:>8s} {condition:4s}: command {summary(runs, 'wall')}, generation {summary(runs, 'generation')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": args.cores, "cpus": os.cpu_count(), "load": loads,
                                               "results": {f"{k[0]} {k[1]}": v for k, v in results.items()}},
                                              indent=1))


if __name__ == "__main__":
    main()
