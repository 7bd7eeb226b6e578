"""``CogVideoPipeline``: CogVideoX text-to-video, video-to-video and image-to-video (docs/cogvideox.md).

    models = diffstudio.load("CogVideoX-5b/")                      # a diffusers folder
    frames = CogVideoPipeline(models)("a panda playing guitar", num_frames=49, output="panda.mp4")
    CogVideoPipeline(diffstudio.load("CogVideoX-5b-I2V/"))("the panda starts to play", image="first.png")

    models.apply_lora("ExVideo-CogVideoX-LoRA-129f-v1.safetensors")  # PEFT layout, docs/cogvideox.md
    CogVideoPipeline(models)(prompt, **EXVIDEO_129F)                # 129 frames, cfg 7, 100 steps, 8 fps

The run follows the release: T5-XXL over 226 tokens for the prompt and the negative prompt; latents
(1, F, 16, H/8, W/8) with F = (num_frames - 1) / 4 + 1, drawn on the CPU from ``seed``; classifier-free guidance
on the transformer's v-prediction (optionally "dynamic", the release's cosine ramp); DDIM or DPM-Solver++(2M)
over the zero-terminal-SNR schedule (sampling/zero_snr.py); the 3D VAE decodes latents / scaling factor.
The image-to-video models (5B-I2V, 1.5-I2V) take 32 channels: the noisy latents, then the first frame's latents
followed by zeros (``image_latents``), the same at every step; 1.5-I2V also takes the "ofs" input, 2.0.
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

# CogVideoX1.5-5B-I2V's "ofs" input: the constant its release (and diffusers) passes.
I2V_OFS = 2.0

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
        # The I2V transformers take the image latents as 16 more input channels (check_dit allows 16 or 32).
        self.image_to_video = config.in_channels == 2 * models.family.latent.channels

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
        return self._vae_mean(video, width, height) * self.models.family.latent.scale

    def encode_image(self, image, width: int, height: int, frames: int) -> torch.Tensor:
        """The I2V condition: the image (a path, a PIL image or an array), resized to width x height, encoded as a
        1-frame video, scaled, then zero latents up to ``frames`` latent frames -> (1, frames, 16, h, w).

        The scaling: x scaling factor (5B-I2V), but / scaling factor for CogVideoX 1.5 (its VAE config's
        ``invert_scale_latents``: the release was trained so, and diffusers keeps it)."""
        if isinstance(image, (str, Path)):
            image = Image.open(image)
        if isinstance(image, Image.Image):
            image = image.convert("RGB")  # grey, palette or RGBA files
        first = self._vae_mean([np.asarray(image)], width, height)
        scale = self.models.family.latent.scale
        first = first / scale if self._inverts_image_scale() else first * scale
        padding = first.new_zeros((1, frames - 1, *first.shape[2:]))
        return torch.cat([first, padding], dim=1)

    def _inverts_image_scale(self) -> bool:
        vae_config = getattr(self._vae(), "config", None)
        flag = getattr(vae_config, "invert_scale_latents", None)  # diffusers' VAE carries it
        if flag is not None:
            return bool(flag)
        return self.transformer.config.patch_size_t is not None  # the 1.5 release sets it; 1.0 does not

    def _vae_mean(self, video, width: int, height: int) -> torch.Tensor:
        """Frames -> the VAE's unscaled posterior mean (1, F, 16, h, w) on the CPU, in float32."""
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
        return mean.float().permute(0, 2, 1, 3, 4).cpu()

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
                 callback=None, image=None):
        """``latents``: the starting noise (1, F, 16, h, w) instead of drawing it from ``seed``. ``image``: the
        first frame, for the image-to-video models (required there, refused by the text-to-video ones).

        CogVideoX 1.5 patches 2 latent frames into one token: an odd latent frame count (the release's usual 81
        frames give 21) runs with ``pad`` more latent frames in front, dropped after sampling, as the release's
        pipeline does; F then counts them (``latents`` has F = frames + pad)."""
        f = latent_frames(num_frames)
        patch_t = self.transformer.config.patch_size_t
        pad = (-f) % patch_t if patch_t else 0
        h, w = self._check_size(width, height)
        sample = get_sampler_v(sampler)
        if output_type not in ("pil", "latent"):
            raise InvalidInputError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
        if (init_video is None) != (strength is None):
            raise InvalidInputError("video-to-video needs both init_video= and strength= (text-to-video: neither)")
        variant = getattr(self.models.detection, "variant", None)
        if self.image_to_video and image is None:
            raise InvalidInputError(f"this is a CogVideoX image-to-video model ({variant}): pass image= (the first "
                                    "frame; CLI: --image)")
        if image is not None and not self.image_to_video:
            raise InvalidInputError(f"image= is for the CogVideoX image-to-video models (5b-i2v, 1.5-i2v); this is "
                                    f"the text-to-video model {variant}")
        self.models.activate()
        family = self.models.family
        abar = family.schedule.alphas_cumprod()
        timesteps = trailing_timesteps(steps, family.schedule.num_steps)

        guided = cfg_scale > 1.0
        context = self.encode_prompts([negative_prompt, prompt] if guided else [prompt])
        shape = (1, f + pad, family.latent.channels, h, w)
        if latents is None:
            noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)))
        else:
            noise = torch.as_tensor(latents, dtype=torch.float32).cpu()
            if tuple(noise.shape) != shape:
                raise InvalidInputError(f"latents of shape {tuple(noise.shape)}; this run needs {shape}")
        x = noise
        if init_video is not None:
            if pad:
                raise FrameCountError(f"video-to-video with CogVideoX 1.5 takes an even latent frame count (num_frames "
                                      f"= 8k + 5: 5, 13, ..., 85), got {num_frames} frames ({f} latent frames)")
            timesteps = timesteps_for_strength(timesteps, strength)
            clean = self.encode_video(init_video, width, height)
            if clean.shape != x.shape:
                raise FrameCountError(f"init_video gives {clean.shape[1]} latent frames, the run {f} "
                                      f"(num_frames={num_frames}): pass as many frames as num_frames")
            x = noise_to(float(abar[timesteps[0]]), clean, noise)

        net = self.transformer
        param = next(net.parameters())
        device, dtype = param.device, self.models.dtype
        inputs = {"context": context.to(device=device, dtype=dtype)}
        if net.config.ofs_embed_dim:
            inputs["ofs"] = I2V_OFS
        # Computed once per run: the first frame's latents, zeros after it (channels 16..31 of every step's input).
        image_latents = self.encode_image(image, width, height, f + pad) if image is not None else None

        def v_model(x_t: torch.Tensor, t: int, i: int) -> torch.Tensor:
            x_in = x_t if image_latents is None else torch.cat([x_t, image_latents.to(x_t.dtype)], dim=2)
            batch = torch.cat([x_in, x_in]) if guided else x_in
            t_in = torch.full((batch.shape[0],), t, device=device, dtype=torch.long)
            with torch.no_grad():
                v = family.call_denoiser(net, batch.to(device=device, dtype=dtype), t_in, inputs).float().cpu()
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
        x = x[:, pad:]
        if output_type == "latent":
            return x
        frames = self.decode(x)
        if output is None:
            return frames
        from diffstudio.video.video_io import write_frames

        write_frames(str(output), frames, fps=fps)
        return str(output)
