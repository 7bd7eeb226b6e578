"""The voting remap: build a target frame from a source frame and a nearest-neighbour field.

FastBlend (arXiv 2311.09265, Sec. 3.1) renders the target by letting every matched patch vote: the
patch centred on target pixel p, matched to source pixel p + v(p), proposes source pixel
p + v(p) + d for target pixel p + d. Each target pixel q averages the patch_size^2 votes it gets,
that is, with p = q - d:

    out(q) = mean over d of  S(q + v(q - d)).

Patches centred outside the image (near the border) take the displacement of the nearest patch
inside, so the identity field reproduces the source exactly; source coordinates are clamped, which
is the same as padding the source by replicating its border.

Speed: the source is stored as 8-bit RGB packed into one int32 per pixel, so each of the
patch_size^2 votes is a single 1-D gather (about 4x faster on CPU than gathering rows of three
floats), and votes are summed exactly in integers. Styles are therefore quantised to 8 bits, which
is what the video frames are; a remap of an exact copy is exact.
"""

from __future__ import annotations

import torch

from diffstudio.video.fastblend.nnf import displacement, replicate_pad


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 with rounding (the inverse of ``u8.float() / 255``)."""
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8)


class VotingSource:
    """A source style image prepared for repeated votes: 8-bit, padded by the patch radius, packed.

    ``style``: (B, 3, H, W) floats in [0, 1] (quantised to 8 bits here) or uint8.
    """

    def __init__(self, style: torch.Tensor, patch_size: int):
        self.batch, channels, self.height, self.width = style.shape
        if channels != 3:
            raise ValueError(f"the voting remap takes 3-channel images, got {channels} channels")
        self.patch_size = patch_size
        r = patch_size // 2
        u8 = style if style.dtype == torch.uint8 else to_uint8(style)
        padded = replicate_pad(u8, r)
        self.padded_height, self.padded_width = padded.shape[2], padded.shape[3]
        alpha = torch.zeros_like(padded[:, :1])
        rgba = torch.cat((padded, alpha), 1).permute(0, 2, 3, 1).contiguous()  # (B, Hp, Wp, 4)
        self.packed = rgba.view(torch.int32).reshape(-1)  # one int32 per padded pixel
        # 25 votes of 255 fit int16; larger patches need int32 sums.
        self.sum_dtype = torch.int16 if patch_size * patch_size * 255 < 2 ** 15 else torch.int32

    def vote(self, coords: torch.Tensor) -> torch.Tensor:
        """Voting remap through the field ``coords`` (B, 2, H, W) -> (B, H, W, 3) floats in [0, 1]."""
        r, hp, wp = self.patch_size // 2, self.padded_height, self.padded_width
        batch, height, width = self.batch, self.height, self.width
        # Extend the displacement to the padded grid (replicate), then turn "patch centre p is
        # matched to p + v(p)" into a flat index of the padded source (padded coordinates).
        v = displacement(coords)
        v_pad = replicate_pad(v, r)
        rows = torch.arange(hp, dtype=torch.int32, device=v.device).view(1, hp, 1)
        cols = torch.arange(wp, dtype=torch.int32, device=v.device).view(1, 1, wp)
        base = (torch.arange(batch, dtype=torch.int32, device=v.device) * (hp * wp)).view(batch, 1, 1)
        centre = (rows + v_pad[:, 0]) * wp + (cols + v_pad[:, 1]) + base  # (B, Hp, Wp)
        total = torch.zeros(batch * height * width, 4, dtype=self.sum_dtype, device=v.device)
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                # The patch centred at q - d votes for q with its pixel at offset d.
                index = centre[:, r - dy:r - dy + height, r - dx:r - dx + width] + (dy * wp + dx)
                votes = self.packed.index_select(0, index.reshape(-1))
                total += votes.view(torch.uint8).view(-1, 4)
        mean = total[:, :3].float().div_(self.patch_size * self.patch_size * 255)
        return mean.view(batch, height, width, 3)


def remap(style: torch.Tensor, coords: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Voting remap of ``style`` (B, 3, H, W) through ``coords`` (B, 2, H, W) -> (B, 3, H, W) floats."""
    return VotingSource(style, patch_size).vote(coords).permute(0, 3, 1, 2).contiguous()
