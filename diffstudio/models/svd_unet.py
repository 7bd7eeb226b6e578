"""The spatio-temporal UNet of Stable Video Diffusion (SVD, SVD-XT, SVD 1.1; generative-models' ``VideoUNet``).

Reference: Blattmann et al. 2023, "Stable Video Diffusion" (arXiv:2311.15127), section 3 and appendix D: the
SD 2.1 UNet with a temporal layer after every spatial one (``models/svd_blocks.py``), conditioned on a CLIP
image embedding through cross-attention (one token, ViT-H/14's 1024 wide) and on three "added time ids"
(fps - 1, motion bucket id, noise-augmentation strength) embedded like timesteps and fed through
``label_emb``. The input is the noisy latent concatenated with the (noise-augmented) latent of the
conditioning image on every frame: 8 channels in, 4 out.

Parameter names are the release's (``svd.safetensors`` / ``svd_xt.safetensors`` under
``model.diffusion_model.``): ``input_blocks.1.0.time_stack...``, ``input_blocks.1.0.time_mixer.mix_factor``,
``input_blocks.1.1.time_pos_embed...``, ``input_blocks.1.1.time_stack.0...``, ``label_emb.0.0...``.

Call (diffusers' ``UNetSpatioTemporalConditionModel`` signature, which the SVD pipeline uses)::

    unet(sample, timestep, encoder_hidden_states, added_time_ids) -> (B, T, out_channels, H, W)

    sample                 (B, T, in_channels, H, W) latents of T frames per video
    timestep               tensor (B,) or a scalar: the network's noise input; for SVD's EDM
                           preconditioning that is c_noise = 0.25 * ln(sigma)
    encoder_hidden_states  (B, L, context_dim): the CLIP image embedding, (B, 1, 1024) for SVD
    added_time_ids         (B, 3): fps - 1, motion_bucket_id, noise_aug_strength
    image_only_indicator   optional (B, T) bool: frames to treat as lone images (temporal layers bypassed)
    position_ids           optional (T,) long: the frame positions of the temporal position embedding
                           (0..T-1 by default; models/exvideo.py maps long clips back into the trained range)

How many frames a checkpoint was trained on (14 for SVD, 25 for SVD-XT) is not visible in its weights:
``SVDUNetConfig.num_frames`` records it (from a config.json or stored metadata; 25 otherwise) as the default
a pipeline offers, and the UNet itself runs any T >= 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffstudio.errors import InvalidInputError
from diffstudio.models.layers import timestep_embedding
from diffstudio.models.svd_blocks import Frames, SpatialVideoTransformer, VideoResBlock
from diffstudio.models.unet import Downsample, Upsample, add_embedding_layers, embed_conditioning, group_norm, silu_


@dataclass
class SVDUNetConfig:
    """Constructor arguments of `SVDUNet` (generative-models' ``network_config.params`` for SVD).

    ``transformer_depth`` is per level (0 = no attention there: SVD's last level). Heads are
    ``num_head_channels`` wide (64 in the release). ``addition_time_embed_dim`` is the sinusoid width of each
    added time id (256), so ``label_emb`` takes ``num_added_time_ids * addition_time_embed_dim`` (768).
    ``num_frames``: the frame count the checkpoint was trained for (metadata only, see the module docstring).
    """

    in_channels: int = 8
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    transformer_depth: list[int] = field(default_factory=lambda: [1, 1, 1, 0])
    transformer_depth_middle: int = 1
    context_dim: int = 1024
    num_head_channels: int = 64
    addition_time_embed_dim: int = 256
    num_added_time_ids: int = 3
    norm_groups: int = 32
    num_frames: int = 25

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        if isinstance(self.num_res_blocks, int):
            self.num_res_blocks = [self.num_res_blocks] * levels
        if isinstance(self.transformer_depth, int):
            self.transformer_depth = [self.transformer_depth] * levels
        self.channel_mult, self.num_res_blocks = list(self.channel_mult), list(self.num_res_blocks)
        self.transformer_depth = list(self.transformer_depth)
        if not (len(self.num_res_blocks) == len(self.transformer_depth) == levels):
            raise ValueError("SVDUNetConfig: channel_mult, num_res_blocks and transformer_depth need one entry per "
                             f"level; got {self.channel_mult}, {self.num_res_blocks}, {self.transformer_depth}")
        widths = [m * self.model_channels for m, d in zip(self.channel_mult, self.transformer_depth) if d]
        widths.append(self.channel_mult[-1] * self.model_channels)
        if any(w % self.num_head_channels for w in widths):
            raise ValueError(f"SVDUNetConfig: transformer widths {widths} do not split into heads of "
                             f"{self.num_head_channels} channels")
        if self.transformer_depth_middle < 1:
            raise ValueError("SVDUNetConfig: transformer_depth_middle must be >= 1 (the middle block always has a "
                             f"SpatialVideoTransformer); got {self.transformer_depth_middle}")

    # The names `add_embedding_layers` / `embed_conditioning` (models/unet.py) read.
    @property
    def adm_in_channels(self) -> int:
        return self.num_added_time_ids * self.addition_time_embed_dim

    @property
    def encoder_hid_dim(self) -> None:
        return None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SVDUNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"SVDUNetConfig: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


class VideoBlock(nn.Sequential):
    """One entry of input_blocks / middle_block / output_blocks: hands each layer what it takes."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, frames: Frames,
                out_size: Sequence[int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, VideoResBlock):
                x = layer(x, emb, frames)
            elif isinstance(layer, SpatialVideoTransformer):
                x = layer(x, context, frames)
            elif isinstance(layer, Upsample):
                x = layer(x, out_size)
            else:
                x = layer(x)
        return x


class SVDUNet(nn.Module):
    """The SVD UNet; see the module docstring for the call. ``gradient_checkpointing = True`` recomputes each
    block in the backward pass (training)."""

    def __init__(self, config: SVDUNetConfig):
        super().__init__()
        self.config = c = config
        self.gradient_checkpointing = False
        mc, g = c.model_channels, c.norm_groups
        emb_dim = mc * 4
        add_embedding_layers(self, c)  # time_embed, label_emb

        def transformer(ch: int, depth: int) -> SpatialVideoTransformer:
            return SpatialVideoTransformer(ch, ch // c.num_head_channels, c.num_head_channels, depth,
                                           c.context_dim, g)

        blocks = [VideoBlock(nn.Conv2d(c.in_channels, mc, 3, padding=1))]
        skips, ch = [mc], mc
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks[level]):
                layers: list[nn.Module] = [VideoResBlock(ch, emb_dim, mult * mc, g)]
                ch = mult * mc
                if c.transformer_depth[level]:
                    layers.append(transformer(ch, c.transformer_depth[level]))
                blocks.append(VideoBlock(*layers))
                skips.append(ch)
            if level != len(c.channel_mult) - 1:
                blocks.append(VideoBlock(Downsample(ch)))
                skips.append(ch)
        self.input_blocks = nn.ModuleList(blocks)

        self.middle_block = VideoBlock(VideoResBlock(ch, emb_dim, ch, g), transformer(ch, c.transformer_depth_middle),
                                       VideoResBlock(ch, emb_dim, ch, g))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks[level] + 1):
                layers = [VideoResBlock(ch + skips.pop(), emb_dim, mult * mc, g)]
                ch = mult * mc
                if c.transformer_depth[level]:
                    layers.append(transformer(ch, c.transformer_depth[level]))
                if level and i == c.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                self.output_blocks.append(VideoBlock(*layers))

        self.out = nn.Sequential(nn.GroupNorm(g, ch, eps=1e-5), nn.SiLU(), nn.Conv2d(mc, c.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def video_transformers(self) -> list[SpatialVideoTransformer]:
        """Every SpatialVideoTransformer in model order (input blocks, middle, output blocks)."""
        return [m for m in self.modules() if isinstance(m, SpatialVideoTransformer)]

    def _run(self, block: VideoBlock, h, emb, context, frames, out_size=None) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, frames, out_size, use_reentrant=False)
        return block(h, emb, context, frames, out_size)

    def _check(self, sample, encoder_hidden_states, added_time_ids, position_ids) -> None:
        c = self.config
        if sample.ndim != 5 or sample.shape[2] != c.in_channels:
            raise InvalidInputError(f"the SVD UNet takes sample (batch, frames, {c.in_channels}, height, width); "
                                    f"got shape {tuple(sample.shape)}")
        b, t = sample.shape[:2]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b \
                or encoder_hidden_states.shape[2] != c.context_dim:
            raise InvalidInputError(f"encoder_hidden_states must be ({b}, tokens, {c.context_dim}) (the CLIP image "
                                    f"embedding); got {tuple(encoder_hidden_states.shape)}")
        if tuple(added_time_ids.shape) != (b, c.num_added_time_ids):
            raise InvalidInputError(f"added_time_ids must be ({b}, {c.num_added_time_ids}) (fps - 1, "
                                    f"motion_bucket_id, noise_aug_strength); got {tuple(added_time_ids.shape)}")
        if position_ids is not None and tuple(position_ids.shape) != (t,):
            raise InvalidInputError(f"position_ids must hold one position per frame, shape ({t},); "
                                    f"got {tuple(position_ids.shape)}")

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                added_time_ids: torch.Tensor, image_only_indicator: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **extra) -> torch.Tensor:
        """(B, T, C_in, H, W) -> (B, T, C_out, H, W); see the module docstring. ``extra`` is accepted and unused."""
        self._check(sample, encoder_hidden_states, added_time_ids, position_ids)
        c, dtype = self.config, self.dtype
        b, t, _, hgt, wid = sample.shape
        timesteps = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32)
        timesteps = timesteps.reshape(-1).expand(b) if timesteps.numel() == 1 else timesteps.reshape(b)
        # Each added id -> its own sinusoid, concatenated: (B, 3 * 256) (generative-models' ConcatTimestepEmbedderND).
        y = timestep_embedding(added_time_ids.reshape(-1).float(), c.addition_time_embed_dim).reshape(b, -1)
        emb, _ = embed_conditioning(self, sample, timesteps, None, y)                 # (B, 4*mc)
        emb = emb.repeat_interleave(t, dim=0)                                        # (B*T, 4*mc)
        context = encoder_hidden_states.to(dtype).repeat_interleave(t, dim=0)         # (B*T, L, D)
        if position_ids is None:
            position_ids = torch.arange(t, device=sample.device)
        frames = Frames(t, position_ids.to(sample.device), image_only_indicator)

        h = sample.reshape(b * t, c.in_channels, hgt, wid).to(dtype)
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context, frames)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, frames)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, emb, context, frames, skips[-1].shape[-2:] if skips else None)
        h = self.out[2](silu_(group_norm(self.out[0], h)))
        return h.reshape(b, t, c.out_channels, hgt, wid)
