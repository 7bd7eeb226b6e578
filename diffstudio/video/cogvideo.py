"""``CogVideoPipeline``: CogVideoX text-to-video and video-to-video (docs/cogvideox.md).

    models = diffstudio.load("CogVideoX-5b/")                      # a diffusers folder
    frames = CogVideoPipeline(models)("a panda playing guitar", num_frames=49, output="panda.mp4")

    models.apply_lora("ExVideo-CogVideoX-LoRA-129f-v1.safetensors")  # PEFT layout, docs/cogvideox.md
    CogVideoPipeline(models)(prompt, **EXVIDEO_129F)                # 129 frames, cfg 7, 100 steps, 8 fps

The run follows the release: T5-XXL over 226 tokens for the prompt and the negative prompt; latents
(1, F, 16, H/8, W/8) with F = (num_frames - 1) / 4 + 1, drawn on the CPU from ``seed``; classifier-free guidance
on the transformer's v-prediction (optionally "dynamic", the release's cosine ramp); DDIM or DPM-Solver++(2M)
over the zero-terminal-SNR schedule (sampling/zero_snr.py); the 3D VAE decodes latents / scaling factor.
Latents on the device stay small (13 x 16 x 60 x 90 floats for 49 frames at 720x480); the transformer's
attention over all of them is what costs (docs/cogvideox.md, "Memory").
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffstudio.errors import FrameCountError, InvalidInputError, InvalidSizeError, ModelNotFoundError
from diffstudio.sampling.zero_snr import get_sampler_v, noise_to, timesteps_for_strength, trailing_timesteps

TEMPORAL_COMPRESSION = 4  # video frames per latent frame after the first
DEFAULT_FPS = 8.0  # CogVideoX renders 8 frames a second (49 frames = 6 s)

# ExVideo-CogVideoX-LoRA-129f (DiffSynth-Studio, examples/ExVideo): 129 frames (33 latent frames) at 720x480.
EXVIDEO_129F = dict(num_frames=129, width=720, height=480, cfg_scale=7.0, steps=100, fps=8.0)


def latent_frames(num_frames: int) -> int:
    """4k + 1 video frames -> k + 1 latent frames; anything else raises FrameCountError."""
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1 \
            or (num_frames - 1) % TEMPORAL_COMPRESSION:
        below = max(1, (int(num_frames) - 1) // TEMPORAL_COMPRESSION * TEMPORAL_COMPRESSION + 1) \
            if isinstance(num_frames, int) else 49
        raise FrameCountError(f"CogVideoX renders 4k + 1 frames (1, 5, ..., 49, ..., 129), got {num_frames!r}; "
                              f"try {below} or {below + TEMPORAL_COMPRESSION}")
    return (num_frames - 1) // TEMPORAL_COMPRESSION + 1


def dynamic_cfg_scale(cfg_scale: float, t: int, steps: int) -> float:
    """The release's "dynamic CFG": 1 + w (1 - cos(pi ((steps - t) / steps)^5)) / 2, with t the training timestep
    of the step (as diffusers' CogVideoXPipeline computes it)."""
    return 1 + cfg_scale * (1 - math.cos(math.pi * ((steps - t) / steps) ** 5.0)) / 2


class CogVideoPipeline:
    """``CogVideoPipeline(models)(prompt, ...) -> list of PIL frames`` (or the path of ``output``, or the latents
    with ``output_type="latent"``)."""

    def __init__(self, models):
        if models.family.name != "cogvideox":
            raise InvalidInputError(f"CogVideoPipeline runs CogVideoX models; this one is {models.family.name}")
        self.models = models
        config = models.configs[models.family.denoiser_role]
        if config.in_channels != models.family.latent.channels or config.ofs_embed_dim:
            variant = getattr(models.detection, "variant", None)
            raise InvalidInputError(f"this is a CogVideoX image-to-video model ({variant}); CogVideoPipeline runs "
                                    "the text-to-video models (2B, 5B, 1.5) only so far")

    # -- pieces ---------------------------------------------------------------------------------------
    @property
    def transformer(self):
        return self.models.components[self.models.family.denoiser_role]

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            cond = self.models.family.make_conditioning(self.models, prompts)
        return cond["context"]

    def _check_size(self, width: int, height: int) -> tuple[int, int]:
        multiple = 8 * self.transformer.config.patch_size
        if width % multiple or height % multiple or width <= 0 or height <= 0:
            raise InvalidSizeError(f"CogVideoX video sides must be positive multiples of {multiple}, got "
                                   f"{width}x{height}")
        return height // 8, width // 8

    def _vae(self):
        vae = self.models.components.get("vae")
        if vae is None:
            raise ModelNotFoundError("this CogVideoX model has no VAE: add the vae/ folder (or file) after the model, "
                                     "or pass output_type='latent'")
        return vae

    def encode_video(self, video, width: int, height: int) -> torch.Tensor:
        """Frames (a path, or a list of images/arrays, 4k + 1 of them) -> model latents (1, F, 16, h, w)."""
        if isinstance(video, (str, Path)):
            from diffstudio.video.video_io import read_frames

            video = read_frames(str(video))
        frames = [np.asarray(Image.fromarray(np.asarray(f)[..., :3]).resize((width, height), Image.LANCZOS))
                  if (np.asarray(f).shape[1], np.asarray(f).shape[0]) != (width, height) else np.asarray(f)[..., :3]
                  for f in video]
        latent_frames(len(frames))
        pixels = torch.from_numpy(np.stack(frames)).float().div(127.5).sub(1)  # (T, H, W, 3) in [-1, 1]
        vae = self._vae()
        param = next(vae.parameters())
        pixels = pixels.permute(3, 0, 1, 2)[None].to(device=param.device, dtype=param.dtype)  # (1, 3, T, H, W)
        with torch.no_grad():
            out = vae.encode(pixels)
        mean = out.latent_dist.mean if hasattr(out, "latent_dist") else out  # diffusers' VAE or ours
        return (mean.float() * self.models.family.latent.scale).permute(0, 2, 1, 3, 4).cpu()

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Model latents (1, F, 16, h, w) -> 4(F - 1) + 1 PIL frames."""
        vae = self._vae()
        param = next(vae.parameters())
        z = (latents / self.models.family.latent.scale).permute(0, 2, 1, 3, 4)
        with torch.no_grad():
            out = vae.decode(z.to(device=param.device, dtype=param.dtype))
        video = out.sample if hasattr(out, "sample") else out  # (1, 3, T, H, W) in [-1, 1]
        arrays = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
        return [Image.fromarray(a) for a in arrays]

    # -- the run --------------------------------------------------------------------------------------
    def __call__(self, prompt: str, negative_prompt: str = "", *, num_frames: int = 49, width: int = 720,
                 height: int = 480, steps: int = 50, cfg_scale: float = 6.0, seed: int = 0,
                 use_dynamic_cfg: bool = False, sampler: str = "ddim", init_video=None, strength: float | None = None,
                 output: str | None = None, fps: float = DEFAULT_FPS, output_type: str = "pil", latents=None,
                 callback=None):
        """``latents``: the starting noise (1, F, 16, h, w) instead of drawing it from ``seed``."""
        f = latent_frames(num_frames)
        h, w = self._check_size(width, height)
        sample = get_sampler_v(sampler)
        if output_type not in ("pil", "latent"):
            raise InvalidInputError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
        if (init_video is None) != (strength is None):
            raise InvalidInputError("video-to-video needs both init_video= and strength= (text-to-video: neither)")
        self.models.activate()
        family = self.models.family
        abar = family.schedule.alphas_cumprod()
        timesteps = trailing_timesteps(steps, family.schedule.num_steps)

        guided = cfg_scale > 1.0
        context = self.encode_prompts([negative_prompt, prompt] if guided else [prompt])
        shape = (1, f, family.latent.channels, h, w)
        if latents is None:
            noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)))
        else:
            noise = torch.as_tensor(latents, dtype=torch.float32).cpu()
            if tuple(noise.shape) != shape:
                raise InvalidInputError(f"latents of shape {tuple(noise.shape)}; this run needs {shape}")
        x = noise
        if init_video is not None:
            timesteps = timesteps_for_strength(timesteps, strength)
            clean = self.encode_video(init_video, width, height)
            if clean.shape != x.shape:
                raise FrameCountError(f"init_video gives {clean.shape[1]} latent frames, the run {f} "
                                      f"(num_frames={num_frames}): pass as many frames as num_frames")
            x = noise_to(float(abar[timesteps[0]]), clean, noise)

        net = self.transformer
        param = next(net.parameters())
        device, dtype = param.device, self.models.dtype

        def v_model(x_t: torch.Tensor, t: int, i: int) -> torch.Tensor:
            batch = torch.cat([x_t, x_t]) if guided else x_t
            t_in = torch.full((batch.shape[0],), t, device=device, dtype=torch.long)
            with torch.no_grad():
                v = family.call_denoiser(net, batch.to(device=device, dtype=dtype), t_in,
                                         {"context": context.to(device=device, dtype=dtype)}).float().cpu()
            if not torch.isfinite(v).all():
                from diffstudio.errors import NaNError

                raise NaNError(f"the transformer produced NaN/inf at step {i + 1} (timestep {t}); try float32 or "
                               "bfloat16 instead of float16")
            if not guided:
                return v
            scale = dynamic_cfg_scale(cfg_scale, t, steps) if use_dynamic_cfg else cfg_scale
            uncond, cond = v.chunk(2)
            return uncond + scale * (cond - uncond)

        x = sample(v_model, x, timesteps, abar, callback=callback, stride=family.schedule.num_steps // steps)
        if output_type == "latent":
            return x
        frames = self.decode(x)
        if output is None:
            return frames
        from diffstudio.video.video_io import write_frames

        write_frames(str(output), frames, fps=fps)
        return str(output)
