"""Time to image, cold: a fresh process that imports, loads a single file, encodes the prompt, samples N steps,
decodes and saves a PNG -- diffstudio against diffusers (``StableDiffusionPipeline.from_single_file``).

One SD 1.5-size single file (original layout, random weights, 4.3 GB in fp32; or SDXL-size with ``--kind sdxl``,
13.9 GB) is written once to a temporary folder, with the diffusers config folder its ``from_single_file`` needs
offline. Each run is a new Python
process (so imports and page-cache misses count as they do for a user); runs alternate ours / diffusers.
Every child reports per phase its wall time and the peak resident memory so far (``ru_maxrss``), and the
load's peak above the memory held before it, against the file's weight bytes: with memory-mapped, zero-copy
loading that ratio stays near 1.0 (the bar: <= 1.1).

    python benchmarks/time_to_image.py                       # SD 1.5 size, 256x256, 2 steps, 2 runs each
    python benchmarks/time_to_image.py --size 512 --steps 4 --runs 3 --keep /tmp/sd15-random
    python benchmarks/time_to_image.py --tiny                # a seconds-long smoke run
    python benchmarks/time_to_image.py --kind sdxl --dtype bf16 --size 512 --keep /tmp/sdxl-random   # SDXL size

It also measures ``import diffstudio`` and the imports a generation needs (``python -X importtime`` in a
subprocess, best of three).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a red circle on a blue square"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # this checkout's diffstudio, wherever the script is started from
from diffstudio.threads import WAIT_POLICY  # noqa: E402  (no torch: safe before the children start)


# -- the file: SD 1.5 layout, random weights ---------------------------------------------------------------------
def _configs(kind: str, tiny: bool) -> tuple[dict, dict, list[dict]]:
    """(UNet, VAE, [text encoders]) diffusers/transformers configs of an SD 1.5- or SDXL-size model."""
    from diffstudio.release_configs import CLIP_G, CLIP_L, SD15_UNET, SD15_VAE, SDXL_UNET, SDXL_VAE

    unet, vae, clips = (SD15_UNET, SD15_VAE, [CLIP_L]) if kind == "sd15" else (SDXL_UNET, SDXL_VAE, [CLIP_L, CLIP_G])
    if not tiny:
        return unet, vae, clips
    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    clips = [{**clip, **small, "projection_dim": 64} for clip in clips]
    if kind == "sd15":
        unet = {**unet, "block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 64, "attention_head_dim": 8}
    else:  # two 64-wide encoders: context 128; pooled 64 + 6 size values of 256
        unet = {**unet, "block_out_channels": (32, 64, 64), "cross_attention_dim": 128, "attention_head_dim": 8,
                "transformer_layers_per_block": (1, 1, 1), "projection_class_embeddings_input_dim": 64 + 6 * 256}
    return unet, {**vae, "block_out_channels": (32, 32, 32, 32)}, clips


# per model kind: the single file's prefixes of the text encoders, diffusers' pipeline and its folder names
TEXT_PREFIXES = {"sd15": ["cond_stage_model.transformer."],
                 "sdxl": ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."]}
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def write_model(folder: Path, tiny: bool, kind: str = "sd15", dtype: str = "fp32") -> Path:
    """``folder/model.safetensors`` (original layout, random weights stored in ``dtype``) and ``folder/config/``
    (diffusers)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffstudio.conditioning.tokenizers import load_clip_tokenizer
    from diffstudio.convert.clip import canonical_clip_keys, clip_to_openclip
    from diffstudio.convert.unet import unet_from_diffusers
    from diffstudio.convert.vae import vae_from_diffusers

    path = folder / "model.safetensors"
    if path.exists():
        return path
    unet_cfg, vae_cfg, clip_cfgs = _configs(kind, tiny)
    config = folder / "config"
    names = ["text_encoder", "text_encoder_2"][:len(clip_cfgs)]
    with torch.device("meta"):  # shapes and names only
        unet, vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg)
        texts = [CLIPTextModel(CLIPTextConfig(**cfg)) if i == 0 else
                 CLIPTextModelWithProjection(CLIPTextConfig(**cfg)) for i, cfg in enumerate(clip_cfgs)]
    unet.save_config(config / "unet")
    vae.save_config(config / "vae")
    index = {"_class_name": PIPELINES[kind], "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    for name, text in zip(names, texts):
        text.config.save_pretrained(config / name)
        load_clip_tokenizer().save_pretrained(config / name.replace("text_encoder", "tokenizer"))
        index[name] = ["transformers", type(text).__name__]
        index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(
        config / "scheduler")
    if kind == "sd15":
        index.update({"safety_checker": [None, None], "feature_extractor": [None, None],
                      "requires_safety_checker": False})
    (config / "model_index.json").write_text(json.dumps(index))

    meta = {}
    meta.update({"model.diffusion_model." + k: v for k, v in unet_from_diffusers(unet.state_dict()).items()})
    meta.update({"first_stage_model." + k: v for k, v in vae_from_diffusers(vae.state_dict()).items()})
    for prefix, text in zip(TEXT_PREFIXES[kind], texts):
        keys = canonical_clip_keys(text.state_dict())
        meta.update({prefix + k: v for k, v in (clip_to_openclip(keys) if prefix.endswith(".model.")
                                                 else keys).items()})
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, m in meta.items():
        if m.dtype == torch.int64:  # position ids
            tensors[name] = torch.arange(m.shape[-1]).expand(m.shape).contiguous()
        elif m.ndim == 1 and name.endswith("weight"):  # norm gains near 1
            tensors[name] = 1 + 0.05 * torch.randn(m.shape, generator=g)
        elif m.ndim == 1:  # biases
            tensors[name] = 0.02 * torch.randn(m.shape, generator=g)
        else:  # fan-in scaled, so activations stay finite through 25 blocks
            tensors[name] = torch.randn(m.shape, generator=g) * (0.7 / max(1, m[0].numel()) ** 0.5)
        tensors[name] = tensors[name].to(getattr(torch, DTYPES[dtype])) if m.is_floating_point() else tensors[name]
    tensors["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    save_file(tensors, str(path))
    return path


def weight_bytes(path: Path) -> int:
    from diffstudio.io.safetensors_file import read_safetensors_header

    infos, _ = read_safetensors_header(path)
    import math

    from diffstudio.io.safetensors_file import SAFETENSORS_DTYPES

    return sum(math.prod(shape) * SAFETENSORS_DTYPES[dtype][0] // 8 for dtype, shape in infos.values())


# -- one cold run (the child) ---------------------------------------------------------------------------------------
def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    """This process's peak resident memory: the address space's high-water mark (VmHWM), which starts anew at exec.
    (``ru_maxrss`` would not do: Linux carries it over fork and exec, so a child would report the parent's peak,
    e.g. that of writing the model file.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Phases:
    def __init__(self):
        self.rows, self.last = [], time.perf_counter()

    def mark(self, name: str, seconds: float | None = None, peak: float | None = None) -> None:
        now = time.perf_counter()
        self.rows.append({"phase": name, "s": seconds if seconds is not None else now - self.last,
                          "peak_mib": _peak_mib() if peak is None else peak, "rss_mib": _rss_mib()})
        self.last = now


def _timed(fn, store: list):
    """``fn`` that appends (seconds, peak RSS MiB so far) of each call to ``store``."""
    def wrapper(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        store.append((time.perf_counter() - t, _peak_mib()))
        return out
    return wrapper


def _before(fn, store: list):
    """``fn`` that appends the peak RSS so far (MiB) to ``store`` before each call."""
    def wrapper(*a, **k):
        store.append(_peak_mib())
        return fn(*a, **k)
    return wrapper


def child_ours(args) -> list[dict]:
    from diffstudio.threads import prepare_threads

    prepare_threads()  # what the command line does before torch starts
    phases = Phases()
    import diffstudio
    import diffstudio.pipeline.generate  # noqa: F401  (what `generate` imports: torch, the loop)
    phases.mark("import")
    before = _rss_mib()
    import torch

    models = diffstudio.load(args.model, dtype=getattr(torch, DTYPES[args.dtype]))
    phases.mark("load")
    load_extra = phases.rows[-1]["peak_mib"] - before
    pipe = diffstudio.Pipeline(models)
    encode_s, decode_s = [], []
    pipe.encode_prompts = _timed(pipe.encode_prompts, encode_s)
    before_decode = []
    pipe.decode_latents = _timed(_before(pipe.decode_latents, before_decode), decode_s)
    t = time.perf_counter()
    images = pipe(PROMPT, steps=args.steps, width=args.size, height=args.size, cfg_scale=7.0, sampler="euler",
                  seed=0, progress=False, modules=args.modules)
    total = time.perf_counter() - t
    phases.mark("encode", encode_s[0][0], encode_s[0][1])
    phases.mark("steps", total - encode_s[0][0] - decode_s[0][0], before_decode[0])
    phases.mark("decode", decode_s[0][0], decode_s[0][1])
    from diffstudio.io.recipe import save_image

    phases.last = time.perf_counter()
    save_image(images[0], Path(args.out) / "ours.png", images[0].info["diffstudio_recipe"])
    phases.mark("save")
    phases.rows[1]["load_peak_above_before_mib"] = load_extra
    return phases.rows


def child_diffusers(args) -> list[dict]:
    phases = Phases()
    import diffusers
    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    phases.mark("import")
    before = _rss_mib()
    config = Path(args.model).parent / "config"
    pipeline = getattr(diffusers, json.loads((config / "model_index.json").read_text())["_class_name"])
    extra = {"safety_checker": None, "requires_safety_checker": False} if pipeline.__name__ == PIPELINES["sd15"] \
        else {}
    pipe = pipeline.from_single_file(args.model, config=str(config), local_files_only=True,
                                     torch_dtype=getattr(torch, DTYPES[args.dtype]), **extra)
    phases.mark("load")
    load_extra = phases.rows[-1]["peak_mib"] - before
    encode_s, decode_s = [], []
    pipe.encode_prompt = _timed(pipe.encode_prompt, encode_s)
    before_decode = []
    pipe.vae.decode = _timed(_before(pipe.vae.decode, before_decode), decode_s)
    pipe.set_progress_bar_config(disable=True)
    t = time.perf_counter()
    with torch.inference_mode():
        image = pipe(PROMPT, num_inference_steps=args.steps, width=args.size, height=args.size, guidance_scale=7.0,
                     generator=torch.Generator().manual_seed(0)).images[0]
    total = time.perf_counter() - t
    phases.mark("encode", encode_s[0][0], encode_s[0][1])
    phases.mark("steps", total - encode_s[0][0] - decode_s[0][0], before_decode[0])
    phases.mark("decode", decode_s[0][0], decode_s[0][1])
    phases.last = time.perf_counter()
    image.save(Path(args.out) / "diffusers.png")
    phases.mark("save")
    phases.rows[1]["load_peak_above_before_mib"] = load_extra
    return phases.rows


# -- the parent -----------------------------------------------------------------------------------------------------
def run_child(side: str, args, model: Path, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--model", str(model), "--out", str(out),
           "--steps", str(args.steps), "--size", str(args.size), "--dtype", args.dtype]
    t = time.perf_counter()
    # both sides get the passive OpenMP wait policy diffstudio's command line sets (diffstudio/threads.py): with
    # spinning threads a loaded machine would measure the other jobs, not the libraries
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **WAIT_POLICY}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"{side} child failed:\n{done.stderr[-4000:]}")
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return {"rows": rows, "process_s": wall, "load": os.getloadavg()[0]}


def import_time(statement: str, repeats: int = 3) -> float:
    """Seconds of imports (``-X importtime``'s cumulative microseconds of the top-level modules), best of N."""
    best = float("inf")
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True,
                              cwd=ROOT)
        total, after_startup = 0, False
        for line in done.stderr.splitlines():
            if not line.startswith("import time:") or "cumulative" in line:
                continue
            _, cumulative_us, name = line.split("|")
            if name.strip() == "site" and not name.startswith("  "):  # the interpreter's own start-up ends here
                after_startup = True
            elif after_startup and not name.startswith("  "):  # top level: its cumulative time holds its children
                total += int(cumulative_us)
        best = min(best, total / 1e6)
    return best


def summarise(side: str, runs: list[dict], weights: int) -> None:
    names = [r["phase"] for r in runs[0]["rows"]]
    med = statistics.median
    loads = ", ".join(f"{r['load']:.1f}" for r in runs)
    print(f"\n{side}: median of {len(runs)} cold runs (load average at their ends: {loads})")
    for i, name in enumerate(names):
        s = med(r["rows"][i]["s"] for r in runs)
        peak = med(r["rows"][i]["peak_mib"] for r in runs)
        print(f"  {name:<7} {s:8.2f} s   peak RSS so far {peak:8.0f} MiB")
    extra = med(r["rows"][1]["load_peak_above_before_mib"] for r in runs)
    print(f"  load peak above the memory before it: {extra:.0f} MiB = {extra * 2**20 / weights:.2f}x the weights "
          f"({weights / 2**20:.0f} MiB)")
    imported = med(r["rows"][0]["peak_mib"] for r in runs)
    run_peak = med(max(row["peak_mib"] for row in r["rows"]) for r in runs)
    print(f"  whole run's peak above the imports: {run_peak - imported:.0f} MiB = "
          f"{(run_peak - imported) * 2**20 / weights:.2f}x the weights (weights + activations; a second copy "
          "would be 2x)")
    print(f"  whole process {med(r['process_s'] for r in runs):.2f} s; "
          f"generate (encode + steps + decode) {med(sum(r['rows'][i]['s'] for i in (2, 3, 4)) for r in runs):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--runs", type=int, default=2, help="cold runs per side, alternating")
    parser.add_argument("--keep", help="write (or reuse) the model in this folder instead of a temporary one")
    parser.add_argument("--tiny", action="store_true", help="tiny widths (smoke test)")
    parser.add_argument("--kind", default="sd15", choices=list(PIPELINES), help="an SD 1.5- or SDXL-size file")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="both sides load the weights so")
    parser.add_argument("--child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.modules = ()
        rows = (child_ours if args.child == "ours" else child_diffusers)(args)
        print(json.dumps(rows))
        return

    print(f"python {sys.version.split()[0]}, cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}",
          flush=True)
    for label, statement in (("import diffstudio", "import diffstudio"),
                             ("import diffstudio + its generate loop (torch)",
                              "import diffstudio, diffstudio.loader, diffstudio.pipeline.generate"),
                             (f"import diffusers' {PIPELINES[args.kind]}",
                              f"from diffusers import {PIPELINES[args.kind]}")):
        print(f"{label}: {import_time(statement):.3f} s (-X importtime, best of 3; load "
              f"{os.getloadavg()[0]:.1f})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        model = write_model(folder, args.tiny, args.kind, args.dtype)
        weights = weight_bytes(model)
        print(f"model: {model} ({weights / 1e9:.2f} GB of weights; ready in {time.perf_counter() - t:.0f} s); "
              f"{args.size}x{args.size}, {args.steps} steps, CFG 7, Euler, {args.dtype}", flush=True)
        out = Path(tmp) / "images"
        out.mkdir(exist_ok=True)
        results = {"ours": [], "diffusers": []}
        for i in range(args.runs):
            order = ("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")
            for side in order:
                r = run_child(side, args, model, out)
                results[side].append(r)
                print(f"  run {i + 1} {side}: {r['process_s']:.1f} s, load {r['load']:.1f}", flush=True)
        for side, runs in results.items():
            summarise(side, runs, weights)
        med = statistics.median
        ratio = med(r["process_s"] for r in results["ours"]) / med(r["process_s"] for r in results["diffusers"])
        print(f"\nratio ours / diffusers, whole cold process: {ratio:.2f}")


if __name__ == "__main__":
    main()
