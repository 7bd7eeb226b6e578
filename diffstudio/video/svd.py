"""``SVDPipeline``: Stable Video Diffusion image-to-video (docs/svd.md).

    models = load_svd("svd_xt.safetensors")                    # diffstudio.video.svd_loading
    frames = SVDPipeline(models)(image="photo.png", num_frames=25, seed=1)
    SVDPipeline(models)(image="photo.png", output="out.mp4", fps=7, motion_bucket_id=127)

A run (Blattmann et al. 2023, sec. 4; the reference is generative-models' ``simple_video_sample.py`` and
diffusers' ``StableVideoDiffusionPipeline``):

1. the image's CLIP embedding, its noise-augmented VAE latent and the added time ids (video/svd_conditioning.py);
2. a latent (1, T, 4, h, w) started at sqrt(1 + sigma_max^2) * N(0, I) (the references' starting scale), or, for
   video-to-video, the input video's latents noised to the level ``strength`` starts at;
3. one of our samplers over EDM sigmas (Karras' schedule from 0.002 to 700 by default) with the denoiser of
   ``sampling.prediction.EDMV`` (v-prediction, c_noise = ln(sigma) / 4);
4. classifier-free guidance per frame: the scale rises linearly from ``min_cfg`` at the first frame to ``max_cfg``
   at the last (the unconditional branch sees a zero embedding and a zero first-frame latent);
5. optionally (``post_normalize``, ``contrast``: DiffSynth-Studio's post-processing, part of ExVideo's recipe) each
   frame's latent is standardised to the mean and std of the whole clip, and the latents are scaled by ``contrast``;
6. the temporal VAE decodes ``decode_chunk_size`` frames at a time, and each chunk is written out before the next
   is decoded, so decoding memory does not grow with the number of frames.

All noise comes from one CPU generator seeded with ``seed``, drawn in the references' order (the augmentation
noise, then the start), so a seed gives the same video on any device, and the same one as diffusers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from diffstudio.errors import InvalidInputError, InvalidSizeError
from diffstudio.families.svd import SVD, SVD_DEFAULTS
from diffstudio.pipeline.modules import Wrapper
from diffstudio.sampling import get_sampler, get_sigmas, sigmas_for_strength, validate_sigmas
from diffstudio.sampling.denoisers import Denoiser
from diffstudio.sampling.prediction import prediction_for
from diffstudio.video.svd_conditioning import added_time_ids, clip_image_embedding

# ExVideo-SVD-128f-v1's released inference recipe (DiffSynth-Studio, examples/ExVideo/ExVideo_svd_test.py): 128
# frames at 512 x 512, 50 steps, fps 30, guidance 2 on every frame, motion bucket 127, its pipeline's latent
# post-normalisation and contrast 1.2. Needs an extension with position tables of at least 128 rows.
EXVIDEO_128F = dict(num_frames=128, width=512, height=512, steps=50, fps=30, motion_bucket_id=127, min_cfg=2.0,
                    max_cfg=2.0, post_normalize=True, contrast=1.2)


def post_process(latents: torch.Tensor, post_normalize: bool, contrast: float) -> torch.Tensor:
    """(B, T, C, h, w): with ``post_normalize`` each frame standardised to the clip's mean and std (std with
    Bessel's correction, as torch.std), then everything times ``contrast``."""
    if post_normalize:
        mean, std = latents.mean(), latents.std()
        frame_mean = latents.mean(dim=(2, 3, 4), keepdim=True)
        frame_std = latents.std(dim=(2, 3, 4), keepdim=True)
        latents = (latents - frame_mean) / frame_std * std + mean
    return latents * contrast


class SVDNetwork:
    """The UNet as a network ``F(c_in x, c_noise, **cond)``: the first-frame latent is concatenated to every frame's
    channels. The UNet has diffusers' call: ``unet(sample (B, T, 8, h, w), timestep, encoder_hidden_states
    (B, 1, P), added_time_ids (B, 3)) -> (B, T, 4, h, w)`` (or an output object with ``.sample``)."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, x_in, t, *, image_latents, image_embeds, time_ids):
        param = next(self.unet.parameters())
        sample = torch.cat([x_in, image_latents.to(x_in)], dim=2)
        with torch.inference_mode():
            out = self.unet(sample.to(param), t.to(param.device), encoder_hidden_states=image_embeds.to(param),
                            added_time_ids=time_ids.to(param))
        out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
        return out.float()


class FrameGuidance(Wrapper):
    """CFG (Ho & Salimans 2022) with one scale per frame: D = D_u + s_f (D_c - D_u), both branches in one batch.

    ``cond`` / ``uncond``: the network's keyword inputs of each branch (batch 1). As D is affine in the network
    output, guiding x0 is guiding v."""

    def __init__(self, inner, cond: dict, uncond: dict, scales: torch.Tensor):
        super().__init__(inner)
        self.both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        self.scales = scales  # (T,)

    def __call__(self, x: torch.Tensor, sigma, **_) -> torch.Tensor:
        sigma = torch.as_tensor(sigma).reshape(-1).expand(x.shape[0])
        x0_u, x0_c = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), **self.both).chunk(2)
        scale = self.scales.to(x).view(1, -1, *([1] * (x.ndim - 2)))
        return x0_u + scale * (x0_c - x0_u)


def _image_tensor(image, width: int, height: int) -> torch.Tensor:
    """An image source -> (1, 3, height, width) in [-1, 1] (Lanczos-resized when its size differs)."""
    from diffstudio.io.images import images_to_tensor, load_image

    picture = load_image(image)
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.LANCZOS)
    return images_to_tensor(picture)


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(n, 3, H, W) in [-1, 1] -> (n, H, W, 3) uint8."""
    pixels = ((frames.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


class SVDPipeline:
    """``SVDPipeline(models)(image=...) -> list of PIL frames`` (or the path of ``output``, or tensors).

    ``models`` has ``unet``, ``vae`` (the temporal VAE) and ``image_encoder`` (a CLIPVisionModelWithProjection):
    ``video.svd_loading.SVDModels`` or a ``diffstudio.load`` result of the ``svd`` family.
    """

    def __init__(self, models):
        self.models = models
        self.family = getattr(models, "family", None) or SVD

    def __call__(self, image=None, *, num_frames: int | None = None, width: int | None = None,
                 height: int | None = None, fps: float | None = None, motion_bucket_id: int | None = None,
                 noise_aug_strength: float | None = None, min_cfg: float | None = None, max_cfg: float | None = None,
                 steps: int | None = None, seed: int = 0, sampler: str | None = None, scheduler: str | None = None,
                 sigmas=None, init_video=None, strength: float | None = None, decode_chunk_size: int | None = None,
                 output: str | None = None, output_type: str = "pil", progress: bool = False,
                 callback: Callable | None = None, post_normalize: bool = False, contrast: float = 1.0):
        """``output_type``: "pil" (a list of PIL images), "pt" (a float tensor (T, 3, H, W) in [0, 1]) or "latent"
        (the sampled latents (1, T, 4, h, w), not decoded). With ``output`` (a video file or a folder for PNGs) the
        frames are written there as they are decoded and its path is returned. ``post_normalize`` / ``contrast``:
        the latents' post-processing (``post_process``), before decoding or returning them."""
        d, fam = SVD_DEFAULTS, self.family.defaults
        width, height = width or fam.width, height or fam.height
        fps = d.fps if fps is None else fps
        motion_bucket_id = d.motion_bucket_id if motion_bucket_id is None else motion_bucket_id
        noise_aug = d.noise_aug_strength if noise_aug_strength is None else float(noise_aug_strength)
        min_cfg = d.min_cfg if min_cfg is None else float(min_cfg)
        max_cfg = d.max_cfg if max_cfg is None else float(max_cfg)
        chunk = d.decode_chunk_size if decode_chunk_size is None else int(decode_chunk_size)
        if image is None:
            raise InvalidInputError("SVD animates an image: pass image= (a path, PIL image, array or tensor)")
        if output_type not in ("pil", "pt", "latent"):
            raise InvalidInputError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
        if chunk < 1:
            raise InvalidInputError(f"decode_chunk_size must be at least 1, got {chunk}")
        if output is not None:
            from diffstudio.video.video_io import check_output
            check_output(output)
        vae = self.models.vae
        f = vae.downscale_factor
        if width % f or height % f or width < f or height < f:
            raise InvalidSizeError(f"width and height must be positive multiples of {f}, got {width}x{height}")
        video = self._input_video(init_video, num_frames, width, height)
        num_frames = len(video) if video is not None and num_frames is None else num_frames or d.num_frames
        if num_frames < 1:
            raise InvalidInputError(f"num_frames must be at least 1, got {num_frames}")

        generator = torch.Generator("cpu").manual_seed(int(seed))
        picture = _image_tensor(image, width, height)
        aug_noise = torch.randn(picture.shape, generator=generator)
        latent_shape = (1, num_frames, self.family.latent.channels, height // f, width // f)
        start_noise = torch.randn(latent_shape, generator=generator)

        embeds = clip_image_embedding(self.models.image_encoder, picture)  # (1, 1, P)
        with torch.inference_mode():
            first = vae.encode(picture + noise_aug * aug_noise).float().cpu()  # (1, 4, h, w), unscaled
        first = first[:, None].expand(latent_shape).contiguous()
        time_ids = added_time_ids(fps, motion_bucket_id, noise_aug)
        cond = {"image_latents": first, "image_embeds": embeds.float().cpu(), "time_ids": time_ids}

        prediction = prediction_for(self.family)
        denoiser = Denoiser(SVDNetwork(self.models.unet), prediction)
        if max_cfg > 1.0:
            uncond = {"image_latents": torch.zeros_like(first), "image_embeds": torch.zeros_like(cond["image_embeds"]),
                      "time_ids": time_ids}
            denoiser = FrameGuidance(denoiser, cond, uncond, torch.linspace(min_cfg, max_cfg, num_frames))
            extra = {}
        else:
            extra = cond
        if sigmas is not None:
            schedule = validate_sigmas(sigmas)
        else:
            schedule = get_sigmas(scheduler or fam.scheduler, prediction, steps or fam.steps).float()
        if video is not None:
            if strength is None:
                raise InvalidInputError("init_video needs a strength in (0, 1]: how far to repaint it")
            schedule = sigmas_for_strength(schedule, strength)
            clean = self._encode_video(video[:num_frames], num_frames)
            x = prediction.noise_scaling(schedule[0], start_noise, clean) if len(schedule) > 1 else clean
        else:
            x = start_noise * (1.0 + schedule[0].double() ** 2).sqrt().float()

        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(schedule) - 1, desc="svd")

        def step_done(i, total, x_now, denoised):
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(i, total, x_now, denoised)

        noise = lambda: torch.randn(latent_shape, generator=generator)  # noqa: E731 - stochastic samplers' draws
        latents = get_sampler(sampler or fam.sampler)(denoiser, x, schedule, extra=extra, callback=step_done,
                                                      noise=noise) if len(schedule) > 1 else x
        if bar is not None:
            bar.close()
        if post_normalize or contrast != 1.0:
            latents = post_process(latents, post_normalize, float(contrast))
        if output_type == "latent":
            return latents
        return self._decode(latents, chunk, output, fps, output_type)

    # -- input video ---------------------------------------------------------------------------------------
    def _input_video(self, init_video, num_frames, width, height) -> list | None:
        if init_video is None:
            return None
        from diffstudio.video.video_io import check_source, iter_frames

        if isinstance(init_video, str):
            check_source(init_video, "init video")
            frames = []
            for frame in iter_frames(init_video, "init video"):
                frames.append(_image_tensor(frame, width, height))
                if num_frames is not None and len(frames) == num_frames:
                    break
        else:
            frames = [_image_tensor(frame, width, height) for frame in list(init_video)[:num_frames]]
        if not frames:
            raise InvalidInputError("the init video has no frames")
        if num_frames is not None and len(frames) < num_frames:
            raise InvalidInputError(f"the init video has {len(frames)} frames, fewer than num_frames={num_frames}")
        return frames

    def _encode_video(self, frames: list, num_frames: int) -> torch.Tensor:
        """Frames (each (1, 3, H, W) in [-1, 1]) -> scaled latents (1, T, 4, h, w), one frame at a time."""
        with torch.inference_mode():
            latents = [self.family.latent.to_model(self.models.vae.encode(frame).float().cpu()) for frame in frames]
        return torch.cat(latents)[None]

    # -- decoding -------------------------------------------------------------------------------------------
    def _decode(self, latents: torch.Tensor, chunk: int, output, fps, output_type):
        vae = self.models.vae
        z = self.family.latent.from_model(latents[0])  # (T, 4, h, w), the VAE's scale
        chunks = _inference(vae.decode_chunks, z, chunk)
        if output is not None:
            from diffstudio.video.video_io import VideoWriter

            with VideoWriter(output, fps=float(fps)) as writer:
                for frames in chunks:
                    for frame in _to_uint8(frames):
                        writer.write(frame)
            return output
        if output_type == "pt":
            return torch.cat([(frames / 2 + 0.5).clamp(0, 1) for frames in chunks])
        return [Image.fromarray(frame) for frames in chunks for frame in _to_uint8(frames)]


def _inference(decode_chunks, z, chunk):
    """Iterate a decoding generator with autograd off (a generator does not keep an outer inference_mode)."""
    iterator = decode_chunks(z, chunk)
    while True:
        with torch.inference_mode():
            frames = next(iterator, None)
        if frames is None:
            return
        yield frames


__all__ = ["EXVIDEO_128F", "FrameGuidance", "SVDNetwork", "SVDPipeline", "post_process"]
