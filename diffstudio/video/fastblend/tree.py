"""Block bookkeeping of the fast blending mode (FastBlend, arXiv 2311.09265, Sec. 3.2).

The fast mode never remaps every frame of a window to the target. Frames are grouped into aligned
power-of-two blocks, as in a binary-indexed (Fenwick) tree: block (level k, index a) holds frames
[a * 2^k, (a + 1) * 2^k). Any run of frames [start, stop) is a disjoint union of O(log n) such
blocks (``aligned_blocks``), so a target's window costs O(log w) remaps instead of O(w), and each
block is built once from its two halves with one remap, O(n) in all: O(n log n) overall.

Every block carries the mean of its frames' styles, remapped into one of its frames, its *anchor*:
the last frame for blocks left of a target (``LEFT``), the first frame for blocks right of it
(``RIGHT``), so that the anchor is the block's frame nearest to every target that uses it.
"""

from __future__ import annotations

LEFT, RIGHT = 0, 1


def block_span(level: int, index: int) -> tuple[int, int]:
    """Frames [start, stop) of block (level, index)."""
    size = 1 << level
    return index * size, (index + 1) * size


def anchor(side: int, level: int, index: int) -> int:
    """The frame a block's mean is remapped into: its last (LEFT) or first (RIGHT) frame."""
    start, stop = block_span(level, index)
    return stop - 1 if side == LEFT else start


def children(level: int, index: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two halves (level - 1) of a block of level >= 1, in frame order."""
    return (level - 1, 2 * index), (level - 1, 2 * index + 1)


def aligned_blocks(start: int, stop: int) -> list[tuple[int, int]]:
    """Split [start, stop) into the fewest aligned blocks, greedily from the left.

    At each step take the largest block that starts at ``start`` (so its size divides ``start``)
    and ends by ``stop``. At most about 2 * log2(stop - start) blocks.
    """
    blocks = []
    while start < stop:
        level = 0
        while start % (2 << level) == 0 and start + (2 << level) <= stop:
            level += 1
        blocks.append((level, start >> level))
        start += 1 << level
    return blocks


def with_descendants(blocks, built=frozenset()) -> set[tuple[int, int]]:
    """The blocks and all their halves, recursively, down to level 1 (level 0 is a frame),
    leaving out blocks in ``built`` and everything below them."""
    todo, seen = list(blocks), set()
    while todo:
        level, index = todo.pop()
        if level == 0 or (level, index) in seen or (level, index) in built:
            continue
        seen.add((level, index))
        todo.extend(children(level, index))
    return seen
