"""ExVideo's extension of the SVD UNet to long clips (128 frames).

Reference: Duan et al. 2024, "ExVideo: Extending Video Diffusion Models via Parameter-Efficient Post-Tuning"
(arXiv:2406.14130), section 3.2: every temporal transformer block of SVD gets

* a trainable position-embedding table of ``positions`` rows that replaces the fixed sinusoid of the frame
  index; row i starts as the sinusoid of ``pingpong_positions`` (i) (frames past the trained 25 walk back and
  forth through positions already seen), so a fresh table reproduces the base model on any clip length run
  with those positions;
* a 3x3x3 convolution over (frames, height, width) with reflect padding on the temporal branch's input
  (tokens + position embedding), initialised to the identity (centre tap = I, bias 0).

`ExVideoPositions` is that pair for one block; `SpatialVideoTransformer` (models/svd_blocks.py) uses it when one
is grafted onto it (its ``exvideo`` attribute). `attach_exvideo` gives a UNet fresh, identity-initialised ones
(the start of training); ``diffstudio/exvideo_loading.py`` grafts a released extension file.
"""

from __future__ import annotations

import torch
from torch import nn

from diffstudio.errors import InvalidInputError
from diffstudio.models.layers import timestep_embedding
from diffstudio.models.svd_blocks import FRAME_EMBED_PERIOD

# ExVideo's PositionalID defaults: the base model's trained length and the half-period of the walk back.
BASE_FRAMES = 25
REPEAT_LENGTH = 20


def pingpong_position(frame: int, base_frames: int = BASE_FRAMES, repeat_length: int = REPEAT_LENGTH) -> int:
    """ExVideo's frame -> position map: frames < base_frames keep their index; later ones walk down from
    base_frames - 2 for ``repeat_length`` steps, then back up, and so on (25 -> 23, 44 -> 4, 45 -> 5, 64 -> 24,
    65 -> 23 for the defaults): every position stays inside the trained range."""
    if frame < base_frames:
        return frame
    step = (frame - base_frames) % (2 * repeat_length)
    if step < repeat_length:
        return base_frames - 2 - step
    return base_frames - 2 * repeat_length + step


def pingpong_positions(num_frames: int, base_frames: int = BASE_FRAMES,
                       repeat_length: int = REPEAT_LENGTH) -> torch.Tensor:
    """(num_frames,) long: `pingpong_position` of 0..num_frames-1."""
    return torch.tensor([pingpong_position(i, base_frames, repeat_length) for i in range(num_frames)],
                        dtype=torch.long)


class ExVideoPositions(nn.Module):
    """One temporal block's ExVideo parameters: ``embeddings`` (positions, C) and ``conv`` (C, C, 3, 3, 3)."""

    def __init__(self, channels: int, positions: int):
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(positions, channels))
        self.conv = nn.Conv3d(channels, channels, 3, padding=1, padding_mode="reflect")

    @torch.no_grad()
    def reset_to_identity(self, base_frames: int = BASE_FRAMES, repeat_length: int = REPEAT_LENGTH) -> None:
        """ExVideo's initialisation: table row i = sinusoid(pingpong(i)), convolution = identity."""
        positions, channels = self.embeddings.shape
        ids = pingpong_positions(positions, base_frames, repeat_length).to(self.embeddings.device)
        self.embeddings.copy_(timestep_embedding(ids, channels, max_period=FRAME_EMBED_PERIOD))
        self.conv.weight.zero_()
        self.conv.weight[:, :, 1, 1, 1] = torch.eye(channels)
        self.conv.bias.zero_()

    def position_vectors(self, position_ids: torch.Tensor) -> torch.Tensor:
        """(T,) frame positions -> (T, C) rows of the table."""
        rows = self.embeddings.shape[0]
        if int(position_ids.max()) >= rows or int(position_ids.min()) < 0:
            raise InvalidInputError(f"this ExVideo extension has position tables of {rows} frames; a clip of "
                                    f"{len(position_ids)} frames (positions up to {int(position_ids.max())}) is "
                                    f"longer. Generate at most {rows} frames.")
        return self.embeddings[position_ids.to(self.embeddings.device)]

    def convolve(self, tokens: torch.Tensor, num_frames: int, height: int, width: int) -> torch.Tensor:
        """(B*T, H*W, C) -> the 3x3x3 convolution over (T, H, W) of each video, same shape."""
        if min(num_frames, height, width) < 2:
            raise InvalidInputError(f"ExVideo's reflect-padded convolution needs at least 2 frames and a 2x2 "
                                    f"feature map; got {num_frames} frames at {height}x{width}")
        bt, n, c = tokens.shape
        video = tokens.view(bt // num_frames, num_frames, height, width, c).permute(0, 4, 1, 2, 3)
        out = self.conv(video.to(self.conv.weight.dtype))                  # (B, C, T, H, W)
        return out.permute(0, 2, 3, 4, 1).reshape(bt, n, c).to(tokens.dtype)


def attach_exvideo(unet: nn.Module, positions: int = 128, base_frames: int = BASE_FRAMES) -> nn.Module:
    """Give every SpatialVideoTransformer of an SVD UNet a fresh, identity-initialised `ExVideoPositions`
    (ExVideo's starting point: the UNet then computes what the base computes with ping-pong positions)."""
    transformers = unet.video_transformers()
    weight = transformers[0].time_pos_embed[0].weight
    for block in transformers:
        patch = ExVideoPositions(block.time_pos_embed[0].in_features, positions).to(weight.device)
        patch.reset_to_identity(base_frames)
        block.exvideo = patch.to(weight.dtype)
    return unet
