"""What the side-by-side benchmarks share: the command line, the machine line, building a pair of
models on the same tensors, and the timed race between them.

A race runs each side once to warm up (allocator, oneDNN / cuDNN kernel selection; the outputs give
the agreement), then alternates which side goes first, so that load from other processes hits both
alike. It reports medians of wall time and of this process's CPU time: on a shared CPU machine the
CPU time is the steadier of the two; on a GPU only the wall time means anything.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def arguments(doc: str, *, dtypes=("fp32", "bf16"), repeats: int = 1, tiny: str = "a small width (smoke test)"):
    """The options every benchmark takes; a script adds its own to the returned parser."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=list(dtypes), choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs per model (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help=tiny)
    return parser


def start(args) -> callable:
    """Apply --threads, quiet diffusers, print the machine line; returns the device's sync function."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the ".to(dtype)" advice is meant for from_pretrained
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"torch {torch.__version__}, device {args.device} ({name}), threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    return torch.cuda.synchronize if cuda else (lambda: None)


def same_weights(reference: torch.nn.Module, ours_from_config, convert) -> torch.nn.Module:
    """Our module holding the reference's tensors (renamed by ``convert``, shared, not copied)."""
    with torch.device("meta"):
        ours = ours_from_config(dict(reference.config))
    ours.load_state_dict(convert(reference.state_dict()), assign=True)
    return ours.eval().requires_grad_(False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@dataclass
class Race:
    ours_wall: float
    ref_wall: float
    ours_cpu: float
    ref_cpu: float
    rel_err: float

    @property
    def ratio(self) -> float:
        """ours / reference, wall time (< 1 = we are faster)."""
        return self.ours_wall / self.ref_wall


def race(run_ours, run_ref, repeats: int, sync) -> Race:
    """Warm up both (their outputs give the agreement), then time ``repeats`` alternating runs."""

    def timed(fn) -> tuple[float, float]:
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        return time.perf_counter() - wall, time.process_time() - cpu

    with torch.inference_mode():
        err = rel_err(run_ours(), run_ref())
        ours, ref = [], []
        for i in range(repeats):
            order = ((ours, run_ours), (ref, run_ref)) if i % 2 == 0 else ((ref, run_ref), (ours, run_ours))
            for times, fn in order:
                times.append(timed(fn))
    med = statistics.median
    return Race(med(t[0] for t in ours), med(t[0] for t in ref), med(t[1] for t in ours), med(t[1] for t in ref),
                err)
