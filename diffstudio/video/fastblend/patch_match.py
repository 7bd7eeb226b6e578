"""Guided patch matching on an image pyramid (FastBlend, arXiv 2311.09265, Sec. 3.1).

For a batch of (source frame, target frame) pairs we look for a nearest-neighbour field (NNF) from
every target patch to a source patch. The patch distance has two terms:

    guide term   guide_weight * |G_src(patch') - G_tgt(patch)|^2   (the original video: structure)
    style term                  |S_src(patch') - T(patch)|^2       (coherence with the estimate T)

where T is the current estimate of the target in the source's style: the given stylised target
frame at the start, then the voting remap of the source through the current NNF (``remap.py``).
In "consensus" mode (the accurate blending mode) T is instead the mean of the target's own style
frame and the remaps of *all* sources in the batch, so every source is matched against the
window's consensus.

The search is PatchMatch (Barnes et al. 2009) made data-parallel. The coarsest pyramid level is
small, so it is searched exhaustively within a radius (exact); then every level runs ``num_iter``
iterations of propagation (try the neighbours' matches, in four directions), optional tracking
(try the match of the neighbouring pair on the same track: the same source/target offset at the
next or previous frame) and random search (try the current match plus a random offset per tile,
with a shrinking radius), followed by a new T. Every candidate field is scored for all pixels at
once: one gather, a squared difference and a box filter (``nnf.box_sum``). The field found at one
level, doubled and corrected by one pixel, starts the next.

All random numbers come from a CPU ``torch.Generator`` per pair, seeded from the caller's seed and
the pair's frame indices, so a seed gives the same result on every device and for any batching.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffstudio.errors import InvalidInputError, InvalidSizeError
from diffstudio.video.fastblend.frames import as_unit_float
from diffstudio.video.fastblend.nnf import (
    box_sum,
    clamp_coords,
    displacement,
    pixel_grid,
    replicate_pad,
    tile_offsets,
    upsample_coords,
)
from diffstudio.video.fastblend.remap import VotingSource, to_uint8

# Search schedule. The coarsest level keeps at least COARSEST_PATCHES patches along its shorter
# side and is searched exhaustively within a quarter of that side. Finer levels only correct the
# doubled field, whose error is about a pixel: a jump just past the patch radius (it replaces an
# isolated wrong match by its neighbour's without dragging the wrong one into the same window), a
# one-pixel jump, and small random radii.
COARSEST_PATCHES = 4
FINE_RADII = (2, 1)


@dataclass(frozen=True)
class MatchConfig:
    """Parameters of the patch matcher (names follow FastBlend's options)."""

    patch_size: int = 5  # the paper's minimum_patch_size: odd side of the square patches
    num_iter: int = 5  # search iterations per pyramid level
    guide_weight: float = 10.0  # weight of the guide term against the style term
    tracking_window_size: int = 0  # pairs this far apart on a track share candidates; 0 = off

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise InvalidInputError(f"minimum_patch_size must be odd (a patch has a centre pixel) and positive, "
                                    f"got {self.patch_size}: use e.g. 3, 5 or 7")
        if self.num_iter < 1:
            raise InvalidInputError(f"num_iter must be at least 1, got {self.num_iter}")
        if not self.guide_weight >= 0:
            raise InvalidInputError(f"guide_weight must be 0 or more, got {self.guide_weight}")
        if self.tracking_window_size < 0:
            raise InvalidInputError(f"tracking_window_size must be 0 (off) or more, got {self.tracking_window_size}")


def pyramid_sizes(height: int, width: int, patch_size: int) -> list[tuple[int, int]]:
    """Image sizes from finest (the input) to coarsest; each level halves the previous one."""
    if min(height, width) < patch_size:
        raise InvalidSizeError(
            f"frames of {width}x{height} are smaller than one {patch_size}x{patch_size} patch: "
            "use larger frames or a smaller minimum_patch_size")
    levels = 1 + max(0, int(math.floor(math.log2(min(height, width) / (COARSEST_PATCHES * patch_size)))))
    sizes = [(height, width)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def _downsample(images: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Average-pooling pyramid of (B, C, H, W) images, one entry per level in ``sizes``.

    uint8 images give uint8 levels (rounded), a quarter of the memory of floats: the matcher
    converts one chunk of one level at a time.
    """
    pyramid = [images]
    for _ in sizes[1:]:
        level = F.avg_pool2d(as_unit_float(pyramid[-1]), 2, ceil_mode=True)
        pyramid.append(to_uint8(level) if images.dtype == torch.uint8 else level)
    return pyramid


def pair_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for one pair from the user's seed and the pair's frame indices (splitmix64)."""
    mask = 0xFFFFFFFFFFFFFFFF
    x = seed & mask
    for key in keys:
        x = ((x ^ (key & mask)) + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class _Chunk:
    """The search state of a few pairs at one pyramid level.

    ``features``: source guide and style, channels last, flattened to (b*H*W, 6) for gathering.
    ``coords``: the current NNF (b, 2, H, W); ``error``: per-pixel error under it (b, H, W);
    ``distance``: box-filtered error, the patch distance (b, H, W).
    """

    def __init__(self, guide: torch.Tensor, style: torch.Tensor, coords: torch.Tensor, patch_size: int,
                 generators: list[torch.Generator], tracks: torch.Tensor):
        batch, _, height, width = guide.shape
        self.batch, self.height, self.width = batch, height, width
        self.features = torch.cat((guide, style), 1).permute(0, 2, 3, 1).reshape(-1, 6).contiguous()
        self.voting = VotingSource(style, patch_size)
        self.coords = coords
        self.generators = generators
        self.tracks = tracks
        offsets = torch.arange(batch, dtype=torch.int32, device=coords.device) * (height * width)
        self.base = offsets.view(-1, 1, 1)  # flat index of each pair's first pixel
        self.error: torch.Tensor | None = None
        self.distance: torch.Tensor | None = None


class PatchMatcher:
    """Matches batches of frame pairs; see the module docstring for the algorithm."""

    def __init__(self, config: MatchConfig):
        self.config = config

    def match(self, src_guide: torch.Tensor, src_style: torch.Tensor, tgt_guide: torch.Tensor,
              tgt_style: torch.Tensor | None, seeds: Sequence[int], *, tracks: Sequence[int] | None = None,
              consensus: bool = False, chunk_size: int | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Match B sources to their targets and remap them.

        Images are (B, 3, H, W) uint8, or floats in [0, 1]:
        src_guide, src_style: the B sources.
        tgt_guide: (B, 3, H, W), or (1, 3, H, W) for one target shared by all sources.
        tgt_style: like tgt_guide, or None when the target's style is unknown (interpolation): the
            first iteration then matches on the guide alone.
        seeds: one integer per pair. tracks: one id per pair; neighbours in the batch with equal
            ids are consecutive frames of one track (used by tracking). Default: no tracks.
        consensus: the accurate mode. Needs a shared target; T is the mean of tgt_style and all
            remapped sources, and that mean (1, 3, H, W) is returned as the remap.
        chunk_size: pairs searched at once (bounds the temporary memory); default all.
        Returns (remapped (B or 1, 3, H, W) floats in [0, 1], displacement field (B, 2, H, W) int32).
        """
        cfg = self.config
        batch, _, height, width = src_guide.shape
        if len(seeds) != batch:
            raise ValueError(f"need one seed per pair: {batch} pairs, {len(seeds)} seeds")
        if consensus and (tgt_guide.shape[0] != 1 or tgt_style is None):
            raise ValueError("consensus matching needs one shared target guide and style, (1, 3, H, W)")
        sizes = pyramid_sizes(height, width, cfg.patch_size)
        device = src_guide.device
        chunk_size = chunk_size or batch
        src_guides, src_styles = _downsample(src_guide, sizes), _downsample(src_style, sizes)
        tgt_guides = _downsample(tgt_guide, sizes)
        tgt_styles = _downsample(tgt_style, sizes) if tgt_style is not None else None
        track_ids = torch.tensor(list(tracks) if tracks is not None else range(batch), dtype=torch.int64)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        starts = list(range(0, batch, chunk_size))

        fields: list[torch.Tensor] | None = None
        result = None
        for level in range(len(sizes) - 1, -1, -1):
            h, w = sizes[level]
            coarsest = fields is None
            chunks = []
            for k, start in enumerate(starts):
                stop = min(start + chunk_size, batch)
                if coarsest:
                    coords = pixel_grid(h, w, device).repeat(stop - start, 1, 1, 1)
                else:
                    coords = upsample_coords(fields[k], h, w)
                chunks.append(_Chunk(as_unit_float(src_guides[level][start:stop]),
                                     as_unit_float(src_styles[level][start:stop]), coords,
                                     cfg.patch_size, generators[start:stop], track_ids[start:stop]))
            anchor = as_unit_float(tgt_styles[level]) if consensus else None
            # T: the given target style at the coarsest level, afterwards the remap (or consensus).
            if coarsest and tgt_styles is None:
                estimate = None
            elif coarsest:
                estimate = as_unit_float(tgt_styles[level]).permute(0, 2, 3, 1)
            else:
                estimate = self._estimate(chunks, anchor)
            targets = self._targets(as_unit_float(tgt_guides[level]), estimate)
            weights = self._weights(estimate is not None, device)
            coarse_radius = max(2, min(h, w) // 4)
            reach = cfg.patch_size // 2 + 1
            radii = _halving(coarse_radius) if coarsest else FINE_RADII
            jumps = (2 * reach, reach, 1) if coarsest else (reach, 1)
            for chunk, start in zip(chunks, starts):
                tgt = _chunk_rows(targets, start, chunk.batch)
                if coarsest:
                    self._exhaustive(chunk, tgt, weights, coarse_radius)
                else:
                    self._refine(chunk, tgt, weights)
            for it in range(cfg.num_iter):
                for chunk, start in zip(chunks, starts):
                    self._search(chunk, _chunk_rows(targets, start, chunk.batch), weights, jumps, radii)
                last = it == cfg.num_iter - 1
                if last and level > 0:
                    break  # the next level starts from the doubled field and a fresh T
                estimate = self._estimate(chunks, anchor)
                if last:
                    result = estimate
                    break
                targets = self._targets(as_unit_float(tgt_guides[level]), estimate)
                weights = self._weights(True, device)
                for chunk in chunks:
                    chunk.error = None  # T changed: the next search recomputes the errors
            fields = [chunk.coords for chunk in chunks]
        remapped = result.permute(0, 3, 1, 2).contiguous()
        return remapped, displacement(torch.cat(fields, 0))

    # -- the pieces -------------------------------------------------------------------------------

    def _weights(self, with_style: bool, device: torch.device) -> torch.Tensor:
        g = self.config.guide_weight
        s = 1.0 if with_style else 0.0
        return torch.tensor([g, g, g, s, s, s], dtype=torch.float32, device=device)

    @staticmethod
    def _targets(guide: torch.Tensor, estimate: torch.Tensor | None) -> torch.Tensor:
        """Target features (Bt, H*W, 6): guide then style estimate, channels last."""
        guide = guide.permute(0, 2, 3, 1)
        if estimate is None:
            estimate = torch.zeros_like(guide)
        elif estimate.shape[0] != guide.shape[0]:
            guide = guide.expand(estimate.shape[0], -1, -1, -1)
        batch, height, width, _ = guide.shape
        return torch.cat((guide, estimate), -1).reshape(batch, height * width, 6)

    @staticmethod
    def _estimate(chunks: list[_Chunk], anchor: torch.Tensor | None) -> torch.Tensor:
        """Remap every source through its field -> (B, H, W, 3); with an anchor, the consensus.

        The consensus is the mean of the target's own style ``anchor`` (1, 3, H, W) and all the
        sources' remaps -> (1, H, W, 3).
        """
        if anchor is None:
            return torch.cat([chunk.voting.vote(chunk.coords) for chunk in chunks], 0)
        total = anchor.permute(0, 2, 3, 1).clone()
        count = 1
        for chunk in chunks:
            total += chunk.voting.vote(chunk.coords).sum(0, keepdim=True)
            count += chunk.batch
        return total.div_(count)

    def _pixel_error(self, chunk: _Chunk, coords: torch.Tensor, targets: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
        """Weighted squared difference of every target pixel and its match -> (b, H, W)."""
        index = coords[:, 0] * chunk.width + coords[:, 1] + chunk.base
        gathered = chunk.features.index_select(0, index.reshape(-1)).view(chunk.batch, -1, 6)
        diff = gathered.sub_(targets).square_()
        return (diff.view(-1, 6) @ weights).view(chunk.batch, chunk.height, chunk.width)

    def _try(self, chunk: _Chunk, candidate: torch.Tensor, targets: torch.Tensor,
             weights: torch.Tensor) -> None:
        """Keep the candidate match wherever its patch distance is strictly smaller."""
        candidate = clamp_coords(candidate, chunk.height, chunk.width)
        error = self._pixel_error(chunk, candidate, targets, weights)
        better = box_sum(error, self.config.patch_size) < chunk.distance
        chunk.coords = torch.where(better.unsqueeze(1), candidate, chunk.coords)
        chunk.error = torch.where(better, error, chunk.error)
        chunk.distance = box_sum(chunk.error, self.config.patch_size)

    def _ensure_distance(self, chunk: _Chunk, targets: torch.Tensor, weights: torch.Tensor) -> None:
        if chunk.error is None:
            chunk.error = self._pixel_error(chunk, chunk.coords, targets, weights)
            chunk.distance = box_sum(chunk.error, self.config.patch_size)

    def _exhaustive(self, chunk: _Chunk, targets: torch.Tensor, weights: torch.Tensor, radius: int) -> None:
        """Exact search of every displacement within ``radius`` at the (small) coarsest level.

        A constant displacement field is a translation everywhere, so its box-filtered error is the
        exact patch distance: this gives PatchMatch a correct start where random sampling per tile
        would need many tries. Source coordinates outside the image are clamped (replicate pad).
        """
        self._ensure_distance(chunk, targets, weights)
        b, h, w, r = chunk.batch, chunk.height, chunk.width, radius
        image = chunk.features.view(b, h, w, 6).permute(0, 3, 1, 2)
        padded = replicate_pad(image, r)
        target_image = targets.reshape(-1, h, w, 6).permute(0, 3, 1, 2)
        channel_weights = weights.view(1, 6, 1, 1)
        best = torch.zeros(b, 2, h, w, dtype=torch.int32, device=chunk.coords.device)
        improved = torch.zeros(b, h, w, dtype=torch.bool, device=chunk.coords.device)
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                shifted = padded[:, :, r + dy:r + dy + h, r + dx:r + dx + w]
                error = (shifted - target_image).square_().mul_(channel_weights).sum(1)
                distance = box_sum(error, self.config.patch_size)
                better = distance < chunk.distance
                chunk.distance = torch.where(better, distance, chunk.distance)
                best[:, 0].masked_fill_(better, dy)
                best[:, 1].masked_fill_(better, dx)
                improved |= better
        # Pixels whose best constant displacement beat their start take it.
        found = clamp_coords(best + pixel_grid(h, w, best.device), h, w)
        chunk.coords = torch.where(improved.unsqueeze(1), found, chunk.coords)
        chunk.error = self._pixel_error(chunk, chunk.coords, targets, weights)
        chunk.distance = box_sum(chunk.error, self.config.patch_size)

    def _refine(self, chunk: _Chunk, targets: torch.Tensor, weights: torch.Tensor) -> None:
        """After doubling a coarse field: try the eight one-pixel corrections of every match."""
        self._ensure_distance(chunk, targets, weights)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    step = torch.tensor([dy, dx], dtype=torch.int32, device=chunk.coords.device)
                    self._try(chunk, chunk.coords + step.view(1, 2, 1, 1), targets, weights)

    def _search(self, chunk: _Chunk, targets: torch.Tensor, weights: torch.Tensor,
                jumps: Sequence[int], radii: Sequence[int]) -> None:
        """One PatchMatch iteration: propagation, tracking, random search."""
        self._ensure_distance(chunk, targets, weights)
        device = chunk.coords.device
        # Propagation: the match of the pixel s steps away along an axis, moved by s (its
        # displacement): candidate(q) = coords(q - s*e) + s*e.
        for step in jumps:
            for shift, dim in ((step, 2), (-step, 2), (step, 3), (-step, 3)):
                move = torch.zeros(1, 2, 1, 1, dtype=torch.int32, device=device)
                move[0, dim - 2] = shift
                self._try(chunk, torch.roll(chunk.coords, shift, dim) + move, targets, weights)
        # Tracking: the match found for a neighbouring pair on the same track.
        for step in range(1, self.config.tracking_window_size + 1):
            for sign in (1, -1):
                neighbour = _track_neighbours(chunk.tracks, sign * step)
                if neighbour is not None:
                    self._try(chunk, chunk.coords.index_select(0, neighbour.to(device)), targets, weights)
        # Random search around the current match, radius halving down to one pixel.
        for radius in radii:
            offsets = torch.stack([tile_offsets(g, chunk.height, chunk.width, self.config.patch_size, radius)
                                   for g in chunk.generators])
            self._try(chunk, chunk.coords + offsets.to(device), targets, weights)


def _track_neighbours(tracks: torch.Tensor, step: int) -> torch.Tensor | None:
    """Batch index of the pair ``step`` places away on the same track (itself where none)."""
    batch = tracks.shape[0]
    own = torch.arange(batch)
    other = own + step
    valid = (other >= 0) & (other < batch)
    other = other.clamp(0, batch - 1)
    valid &= tracks[other] == tracks
    if not bool(valid.any()):
        return None
    return torch.where(valid, other, own)


def _chunk_rows(targets: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """The target rows of one chunk; a shared target (one row) serves every chunk."""
    return targets if targets.shape[0] == 1 else targets[start:start + count]


def _halving(radius: int) -> tuple[int, ...]:
    """radius, radius/2, ..., 1."""
    radii = []
    while radius >= 1:
        radii.append(radius)
        radius //= 2
    return tuple(radii) or (1,)
