"""FastBlend's inference modes (arXiv 2311.09265, Sec. 3.2-3.3), streamed in frame order.

Blending (deflickering): every output frame is the mean of the stylised frames of a sliding window
[j - w, j + w], each remapped into frame j by guided patch matching.

    balanced  remaps every frame of the window into the target: 2w remaps per frame.
    fast      remaps blocks of frames of a binary-indexed tree (``tree.py``): O(log w) remaps per
              frame plus one per block built, O(n log n) in all.
    accurate  matches all window frames into the target together, each against the window's
              consensus (``PatchMatcher.match(consensus=True)``), then averages.

Interpolation: frames between keyframes are rendered from the two nearest keyframes, remapped and
weighted linearly by distance; frames outside the keyframes' span (or every frame, in the
single-keyframe mode) come from the nearest keyframe alone. Keyframes are reproduced exactly.

Each mode is a generator of (frame index, (3, H, W) float tensor in [0, 1]) in frame order, and
holds only the frames of the current window (``FrameCache.keep``), so memory does not grow with the
video's length.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from diffstudio.video.fastblend import tree
from diffstudio.video.fastblend.frames import FrameCache, as_unit_float
from diffstudio.video.fastblend.remapper import Remapper

# Seed tags: one per kind of remap, so that no two remaps share a random stream.
_BALANCED, _ACCURATE, _MERGE, _QUERY, _INTERPOLATE = 1, 2, 3, 4, 5

Output = Iterator[tuple[int, torch.Tensor]]


def _window(j: int, window: int, count: int) -> range:
    return range(max(0, j - window), min(count, j + window + 1))


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def blend_balanced(styles: FrameCache, guides: FrameCache, remapper: Remapper, window: int,
                   batch_size: int) -> Output:
    """Balanced mode: all 2w pairs of each window, ``batch_size`` targets at a time."""
    count = len(styles)
    for first in range(0, count, batch_size):
        last = min(count, first + batch_size)
        styles.keep(first - window, last + window)
        guides.keep(first - window, last + window)
        sums = {j: styles.floats([j])[0] for j in range(first, last)}
        counts = dict.fromkeys(sums, 1)
        # Sorted by offset then target, so pairs on one track (same offset) are batch neighbours.
        pairs = sorted((i - j, j, i) for j in range(first, last) for i in _window(j, window, count) if i != j)
        for batch in _batches(pairs, batch_size):
            sources = [i for _, _, i in batch]
            targets = [j for _, j, _ in batch]
            keys = [(_BALANCED, i, j) for i, j in zip(sources, targets)]
            remapped = remapper.pairs(guides.stack(sources), styles.stack(sources), guides.stack(targets),
                                      styles.stack(targets), keys, tracks=[offset for offset, _, _ in batch])
            for k, j in enumerate(targets):
                sums[j] += remapped[k]
                counts[j] += 1
        for j in range(first, last):
            yield j, sums[j] / counts[j]


def blend_accurate(styles: FrameCache, guides: FrameCache, remapper: Remapper, window: int) -> Output:
    """Accurate mode: per target, all window frames matched together against their consensus."""
    count = len(styles)
    for j in range(count):
        styles.keep(j - window, j + window + 1)
        guides.keep(j - window, j + window + 1)
        sources = [i for i in _window(j, window, count) if i != j]
        if not sources:
            yield j, styles.floats([j])[0]
            continue
        result = remapper.consensus(guides.stack(sources), styles.stack(sources), guides.stack([j]),
                                    styles.stack([j]), [(_ACCURATE, i, j) for i in sources],
                                    tracks=[0] * len(sources))
        yield j, result[0]


class _BlockStore:
    """Block means of the fast mode, keyed by (side, level, index), stored as ``dtype`` tensors.

    Level-0 blocks are the style frames themselves and are not stored. 8-bit storage (the default)
    costs nothing in accuracy, since the remap quantises its source to 8 bits anyway.
    """

    def __init__(self, styles: FrameCache, dtype: torch.dtype):
        self.styles, self.dtype = styles, dtype
        self.blocks: dict[tuple[int, int, int], torch.Tensor] = {}

    def stored(self, side: int, level: int, index: int) -> torch.Tensor:
        """The block's mean style in its anchor frame, (3, H, W), as stored (uint8 or float)."""
        if level == 0:
            return self.styles.get(index)
        return self.blocks[(side, level, index)]

    def batch(self, blocks: list[tuple[int, int, int]]) -> torch.Tensor:
        """Stored values of (side, level, index) blocks as one (B, 3, H, W) batch; uint8 when all
        are 8-bit (frames are), else floats in [0, 1]."""
        values = [self.stored(*block) for block in blocks]
        if all(value.dtype == torch.uint8 for value in values):
            return torch.stack(values)
        return torch.stack([as_unit_float(value) for value in values])

    def value(self, side: int, level: int, index: int) -> torch.Tensor:
        """The block's mean style in its anchor frame, (3, H, W) float in [0, 1]."""
        return as_unit_float(self.stored(side, level, index))

    def put(self, key: tuple[int, int, int], mean: torch.Tensor) -> None:
        if self.dtype == torch.uint8:
            self.blocks[key] = mean.mul(255).round_().clamp_(0, 255).to(torch.uint8)
        else:
            self.blocks[key] = mean.to(self.dtype)

    def evict(self, left_start: int, right_start: int) -> None:
        """Drop left blocks starting before ``left_start`` and right ones before ``right_start``."""
        for key in list(self.blocks):
            side, level, index = key
            if tree.block_span(level, index)[0] < (left_start if side == tree.LEFT else right_start):
                del self.blocks[key]


def blend_fast(styles: FrameCache, guides: FrameCache, remapper: Remapper, window: int, batch_size: int,
               block_dtype: torch.dtype = torch.uint8) -> Output:
    """Fast mode: window sums from aligned blocks (``tree.py``), ``batch_size`` targets at a time.

    For target j the window's left part [j - w, j) and right part (j, j + w] are split into aligned
    blocks; each block's mean, held in its anchor frame, is remapped into j and weighted by its
    size. Blocks are built bottom-up when first needed (one remap of one half into the other's
    anchor), cached while a later target can use them, then dropped.
    """
    count = len(styles)
    store = _BlockStore(styles, block_dtype)
    for first in range(0, count, batch_size):
        last = min(count, first + batch_size)
        styles.keep(first - window, last + window)
        guides.keep(first - window, last + window)
        parts = {j: ([(tree.LEFT, *b) for b in tree.aligned_blocks(max(0, j - window), j)]
                     + [(tree.RIGHT, *b) for b in tree.aligned_blocks(j + 1, min(count, j + window + 1))])
                 for j in range(first, last)}
        _build_blocks(store, guides, remapper, {b for blocks in parts.values() for b in blocks}, batch_size)
        sums = {j: styles.floats([j])[0] for j in parts}
        counts = dict.fromkeys(parts, 1)
        queries = [(block, j) for j, blocks in parts.items() for block in blocks]
        for batch in _batches(queries, batch_size):
            anchors = [tree.anchor(*block) for block, _ in batch]
            targets = [j for _, j in batch]
            values = store.batch([block for block, _ in batch])
            remapped = remapper.pairs(guides.stack(anchors), values, guides.stack(targets),
                                      styles.stack(targets), [(_QUERY, *block, j) for block, j in batch])
            for k, (block, j) in enumerate(batch):
                size = 1 << block[1]
                sums[j] += remapped[k] * size
                counts[j] += size
        for j in range(first, last):
            yield j, sums[j] / counts[j]
        # Drop blocks no later target can use: left blocks must start at or after (next j) - w,
        # right blocks must start after the next target.
        store.evict(last - window, last + 1)


def _build_blocks(store: _BlockStore, guides: FrameCache, remapper: Remapper,
                  needed: set[tuple[int, int, int]], batch_size: int) -> None:
    """Make sure every needed block (and so its halves) is in the store, level by level."""
    missing: dict[int, list[tuple[int, int, int]]] = {}
    for side in (tree.LEFT, tree.RIGHT):
        wanted = [(level, index) for s, level, index in needed if s == side]
        built = {(level, index) for s, level, index in store.blocks if s == side}
        for level, index in tree.with_descendants(wanted, built):
            missing.setdefault(level, []).append((side, level, index))
    for level in sorted(missing):
        # Merging a block: the half away from the anchor is remapped into the anchor's frame.
        jobs = []
        for side, lvl, index in sorted(missing[level]):
            first_half, second_half = tree.children(lvl, index)
            moved, kept = (first_half, second_half) if side == tree.LEFT else (second_half, first_half)
            jobs.append(((side, lvl, index), moved, kept))
        for batch in _batches(jobs, batch_size):
            sources = [tree.anchor(key[0], *moved) for key, moved, _ in batch]
            targets = [tree.anchor(*key) for key, _, _ in batch]
            values = store.batch([(key[0], *moved) for key, moved, _ in batch])
            remapped = remapper.pairs(guides.stack(sources), values, guides.stack(targets),
                                      store.styles.stack(targets), [(_MERGE, *key) for key, _, _ in batch])
            for k, (key, _, kept) in enumerate(batch):
                store.put(key, (remapped[k] + store.value(key[0], *kept)) / 2)


def interpolate_keyframes(keyframes: Mapping[int, torch.Tensor], guides: FrameCache, remapper: Remapper,
                          batch_size: int, single_keyframe: bool = False) -> Output:
    """Render every frame from its nearest keyframes (``keyframes``: index -> (3, H, W) uint8)."""
    count = len(guides)
    keyframe_indices = sorted(keyframes)
    for first in range(0, count, batch_size):
        last = min(count, first + batch_size)
        guides.keep(first, last)
        jobs = []  # (keyframe, target, weight)
        for j in range(first, last):
            if j not in keyframes:
                jobs.extend((k, j, weight) for k, weight in _keyframe_weights(keyframe_indices, j, single_keyframe))
        # Sorted by keyframe then target, so pairs from one keyframe are consecutive (one track).
        jobs.sort()
        outputs: dict[int, torch.Tensor] = {}
        for batch in _batches(jobs, batch_size):
            sources = [k for k, _, _ in batch]
            targets = [j for _, j, _ in batch]
            styles = torch.stack([keyframes[k] for k in sources])
            seed_keys = [(_INTERPOLATE, k, j) for k, j in zip(sources, targets)]
            remapped = remapper.pairs(guides.stack(sources), styles, guides.stack(targets), None, seed_keys,
                                      tracks=sources)
            for k, (_, j, weight) in enumerate(batch):
                outputs[j] = outputs[j] + weight * remapped[k] if j in outputs else weight * remapped[k]
        for j in range(first, last):
            yield j, (keyframes[j].float() / 255) if j in keyframes else outputs[j]


def _keyframe_weights(keys: list[int], j: int, single_keyframe: bool) -> list[tuple[int, float]]:
    """Keyframes rendering frame j and their weights, which sum to 1.

    Between keyframes a < j < b: a with weight (b - j) / (b - a), b with (j - a) / (b - a), so the
    nearer keyframe counts more. Outside the keyframes' span, or in single-keyframe mode, the nearest
    keyframe alone (the earlier one on a tie).
    """
    before = [k for k in keys if k < j]
    after = [k for k in keys if k > j]
    a = before[-1] if before else None
    b = after[0] if after else None
    if a is None or b is None or single_keyframe:
        if a is None:
            return [(b, 1.0)]
        if b is None or j - a <= b - j:
            return [(a, 1.0)]
        return [(b, 1.0)]
    return [(a, (b - j) / (b - a)), (b, (j - a) / (b - a))]
