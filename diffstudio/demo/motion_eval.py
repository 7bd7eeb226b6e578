"""Sample a clip with a motion module on a Shapes model and read the motion back: the Shapes motion module's check.

A deliberately small sampler (the video pipeline is ``diffstudio.video``'s job): the F frames are the batch, the
prompt's conditioning is repeated for every frame, the UNet gets ``motion=`` and ``num_frames=`` through its
temporal hook, classifier-free guidance runs the unconditional and the conditional video in one call (two videos
of F frames). Noise is drawn per frame from one seeded CPU generator, or once for every frame (``same_noise``,
as ``VideoPipeline(..., same_noise=True)``): the frames then differ only by what the motion module makes of them.
"""

from __future__ import annotations

import torch

DIRECTION_AXES = {"right": (0, 1), "left": (0, -1), "bottom": (1, 1), "top": (1, -1)}  # (axis of x/y, sign)


@torch.no_grad()
def sample_clip(models, motion, prompt: str, *, frames: int = 16, seed: int = 0, steps: int | None = None,
                cfg: float | None = None, schedule: str = "linear", sampler: str = "euler",
                scheduler: str = "normal", negative: str = "", same_noise: bool = False):
    """``frames`` PIL images of one clip. ``schedule``: the noise schedule the modules were trained on
    (``train.motion.motion_training_info(path)["schedule"]``; "linear" for AnimateDiff's). ``same_noise``: one
    noise draw shared by every frame."""
    from diffstudio.io.images import tensor_to_images
    from diffstudio.pipeline.denoiser import network_fn
    from diffstudio.pipeline.generate import Pipeline
    from diffstudio.sampling import get_sampler
    from diffstudio.sampling.denoisers import Denoiser
    from diffstudio.sampling.schedules import get_sigmas
    from diffstudio.train.conditioning import caption_encoder, collate
    from diffstudio.train.motion import training_prediction

    defaults = {**models.family.defaults.__dict__, **models.defaults}
    steps = steps or defaults["steps"]
    cfg = defaults["cfg_scale"] if cfg is None else cfg
    width, height = defaults["width"], defaults["height"]
    encode = caption_encoder(models)
    cond = collate([encode(negative, (width, height)), encode(prompt, (width, height))])
    cond = {k: v.repeat_interleave(frames, 0) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
    net_fn = network_fn(models)

    def network(x, t, **c):
        return net_fn(x, t, motion=motion, num_frames=frames, **c)

    denoiser = Denoiser(network, training_prediction(models.family, schedule))

    class Guided:  # CFG over the two videos; a denoiser (kind, sigmas ... from the prediction)
        def __getattr__(self, name):
            return getattr(denoiser, name)

        def __call__(self, x, sigma, **_):
            uncond, cond_out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **cond).chunk(2)
            return uncond + cfg * (cond_out - uncond)

    f = models.family.latent
    shape = (frames, f.channels, height // f.downscale, width // f.downscale)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, *shape[1:]), generator=generator).repeat(frames, 1, 1, 1) if same_noise else \
        torch.randn(shape, generator=generator)
    sigmas = get_sigmas(scheduler, denoiser, steps)
    x = denoiser.noise_scaling(sigmas[0], noise, torch.zeros_like(noise))
    z = get_sampler(sampler)(Guided(), x, sigmas)
    return tensor_to_images(Pipeline(models).decode_latents(z, tiled=False))


def track(frames, color: str, kind: str) -> list[tuple[float, float] | None]:
    """Per frame, the centre (x, y) of the largest detected shape of that colour and kind (None: not found)."""
    from diffstudio.demo.score import read_image

    out = []
    for frame in frames:
        found = [s for s in read_image(frame) if s.color == color and s.kind == kind]
        out.append(None if not found else ((found[0].bbox[0] + found[0].bbox[2]) / 2,
                                           (found[0].bbox[1] + found[0].bbox[3]) / 2))
    return out


def motion_score(frames, color: str, kind: str, direction: str, *, min_found: int | None = None,
                 tolerance: float = 0.01, min_travel: float = 0.25) -> dict:
    """Does the clip show a ``color`` ``kind`` moving towards ``direction`` ("right", "left", "top", "bottom")?

    ``found``: frames where the scorer reads such a shape; ``monotonic``: along the direction's axis its centre
    never steps back by more than ``tolerance`` (fraction of the side; the scorer's jitter) from one found frame
    to the next, and travels at least ``min_travel`` in all; ``ok``: at least ``min_found`` (default: all but
    2 of the frames) found, and monotonic."""
    axis, sign = DIRECTION_AXES[direction]
    centres = track(frames, color, kind)
    coords = [sign * c[axis] for c in centres if c is not None]
    steps = [b - a for a, b in zip(coords, coords[1:])]
    monotonic = len(coords) >= 2 and min(steps) >= -tolerance and coords[-1] - coords[0] >= min_travel
    min_found = len(frames) - 2 if min_found is None else min_found
    return {"found": len(coords), "monotonic": bool(monotonic), "ok": bool(monotonic and len(coords) >= min_found),
            "travel": (coords[-1] - coords[0]) if coords else 0.0, "centres": centres}


def evaluate_motion(models, motion, prompt: str = "a red circle moving to the right", *, seeds=range(12),
                    frames: int = 16, schedule: str = "linear", **sample_kwargs) -> dict:
    """Sample one clip per seed and score each (``motion_score``); the prompt names colour, kind and direction
    in the Shapes vocabulary."""
    from diffstudio.demo.score import parse_caption

    shape = parse_caption(prompt)[0]
    direction = next(d for d in DIRECTION_AXES if f"moving to the {d}" in prompt)
    per_seed = []
    for seed in seeds:
        clip = sample_clip(models, motion, prompt, frames=frames, seed=seed, schedule=schedule, **sample_kwargs)
        score = motion_score(clip, shape.color, shape.kind, direction)
        per_seed.append({"seed": seed, **{k: v for k, v in score.items() if k != "centres"}})
    return {"prompt": prompt, "frames": frames, "seeds": len(per_seed),
            "ok": sum(s["ok"] for s in per_seed), "monotonic": sum(s["monotonic"] for s in per_seed),
            "found_mean": sum(s["found"] for s in per_seed) / len(per_seed), "per_seed": per_seed}


def long_render_score(frames, color: str, kind: str, direction: str, *, length: int = 16, stride: int = 8,
                      span: int = 4, tolerance: float = 0.01) -> dict:
    """Does a render longer than one context window keep moving, without a jump where windows meet?

    The scorer reads centres to the pixel, and a slow shape moves less than a pixel a frame, so motion is measured
    over ``span`` frames: ``steps[i]`` is the centre's advance from frame i to i + span along the direction.
    ``border_ratio``: the largest step across a window border (a frame where a window of
    ``video.context.context_windows`` starts or ends; undilated windows, whatever the render used) over the median
    step; ``monotonic``: no frame-to-frame step back beyond ``tolerance`` (``back_step``: the largest);
    ``keeps_moving``: monotonic, no step under half the median step (no stall), and the border ratio under 2 (no
    jump)."""
    from diffstudio.video.context import context_windows

    axis, sign = DIRECTION_AXES[direction]
    centres = track(frames, color, kind)
    coord = [None if c is None else sign * c[axis] for c in centres]
    steps = {i: coord[i + span] - coord[i] for i in range(len(coord) - span)
             if coord[i] is not None and coord[i + span] is not None}
    found = [c for c in coord if c is not None]
    back = max((a - b for a, b in zip(found, found[1:])), default=0.0)
    monotonic = len(found) >= 2 and back <= tolerance
    windows = context_windows(len(frames), length, stride)
    borders = sorted({w[0] for w in windows[1:]} | {w[-1] + 1 for w in windows[:-1]})
    across = [steps[b - span // 2] for b in borders if b - span // 2 in steps]
    median = float(sorted(steps.values())[len(steps) // 2]) if steps else 0.0
    ratio = max(across) / median if across and median > 0 else float("inf")
    return {"found": len(found), "monotonic": bool(monotonic), "back_step": max(back, 0.0),
            "travel": found[-1] - found[0] if found else 0.0,
            "median_step": median, "border_ratio": ratio, "min_step": min(steps.values(), default=0.0),
            "keeps_moving": bool(monotonic and steps and min(steps.values()) >= median / 2 > 0 and ratio < 2),
            "centres": centres}


def evaluate_long_render(models, prompt: str = "a red circle moving slowly to the right", *, seeds=range(3),
                         frames: int = 48, length: int = 16, stride: int = 8, **pipe_kwargs) -> dict:
    """``VideoPipeline`` renders of ``frames`` frames in context windows, one per seed, scored by
    ``long_render_score``; the models hold the motion module."""
    from diffstudio.demo.score import parse_caption
    from diffstudio.video.render import VideoPipeline

    shape = parse_caption(prompt)[0]
    direction = next(d for d in DIRECTION_AXES if f"to the {d}" in prompt)
    pipe, per_seed = VideoPipeline(models), []
    for seed in seeds:
        clip = pipe(prompt, num_frames=frames, seed=seed, context_length=length, context_stride=stride,
                    progress=False, **pipe_kwargs)
        score = long_render_score(clip, shape.color, shape.kind, direction, length=length, stride=stride)
        per_seed.append({"seed": seed, **score})
    return {"prompt": prompt, "frames": frames, "keeps_moving": sum(s["keeps_moving"] for s in per_seed),
            "per_seed": per_seed}
