"""The one rule engine behind the state-dict converters (diffusers <-> the original releases).

A converter is a list of `Rule`s generated from the model's structure (its config, or block counts read
from the keys). A rule pairs one module or parameter of our canonical layout with its counterpart(s) in
the other layout, and says how the tensors change on the way (`Copy`, `Fuse`, `SwapHalves`, `Conv1x1`).
The same list serves both directions, so the two cannot drift apart.

A key belongs to the rule with the longest matching prefix (whole dotted components), and the rest of the
key carries over unchanged: a rule ``img_in <-> x_embedder`` renames ``img_in.weight`` and ``img_in.bias``,
and a rule ``blocks.0.norm1 <-> blocks.0.norm1.norm`` coexists with ``blocks.0.default_modulation.1 <->
blocks.0.norm1.linear``. A rule may also name one parameter exactly (``...query_norm.scale <->
...norm_q.weight``).

Every conversion ends in `check_conversion`: every input key consumed, every expected key produced, every
shape equal (`to_canonical` / `from_canonical` below).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from diffstudio.convert.check import check_conversion
from diffstudio.errors import ConversionError

StateDict = dict[str, torch.Tensor]


class Copy:
    """The same tensor object under another name (nothing is copied; callers may rely on identity)."""

    def to_ours(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0]

    def to_theirs(self, tensor: torch.Tensor, n: int) -> list[torch.Tensor]:
        return [tensor]


@dataclass(frozen=True)
class Fuse:
    """Ours is their tensors stacked along dim 0 (a fused qkv projection is [to_q; to_k; to_v]).

    ``sizes``: the rows of each part when they differ (FLUX's single block fuses q, k, v and the MLP
    input); None splits into equal parts. Split parts are views of the fused tensor (no copy, whatever its
    size); copy them before writing them with safetensors, which refuses tensors that share storage.
    """

    sizes: tuple[int, ...] | None = None

    def to_ours(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts, dim=0)

    def to_theirs(self, tensor: torch.Tensor, n: int) -> list[torch.Tensor]:
        rows = tensor.shape[0] if tensor.ndim else 0
        sizes = self.sizes or ([rows // n] * n if rows % n == 0 else None)
        if sizes is None or sum(sizes) != rows:
            want = f"parts of {list(self.sizes)} rows" if self.sizes else f"{n} equal parts"
            raise ConversionError(f"{rows} rows do not split into {want}")
        return list(torch.split(tensor, list(sizes), dim=0))


class SwapHalves:
    """The two row halves trade places: an adaLN linear that emits (shift, scale) in one layout and
    (scale, shift) in the other (diffusers' AdaLayerNormContinuous). An exchange, so it is its own inverse."""

    @staticmethod
    def _swap(t: torch.Tensor) -> torch.Tensor:
        first, second = t.chunk(2, dim=0)
        return torch.cat((second, first), dim=0)

    def to_ours(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return self._swap(parts[0])

    def to_theirs(self, tensor: torch.Tensor, n: int) -> list[torch.Tensor]:
        return [self._swap(tensor)]


class Conv1x1:
    """Ours is a 1x1 convolution (C_out, C_in, 1, 1) where theirs is a Linear (C_out, C_in); biases and
    files that already store 4-D weights pass unchanged."""

    def to_ours(self, parts: list[torch.Tensor]) -> torch.Tensor:
        t = parts[0]
        return t[:, :, None, None] if t.ndim == 2 else t

    def to_theirs(self, tensor: torch.Tensor, n: int) -> list[torch.Tensor]:
        return [tensor[:, :, 0, 0] if tensor.ndim == 4 else tensor]


COPY, SWAP_HALVES, CONV_1X1 = Copy(), SwapHalves(), Conv1x1()


@dataclass(frozen=True)
class Rule:
    """``ours`` (a canonical module or parameter) <-> ``theirs`` (one name, or the parts ``how`` fuses).

    ``read_only``: an older spelling of the other layout, accepted when reading and never written.
    """

    ours: str
    theirs: tuple[str, ...]
    how: Copy | Fuse | SwapHalves | Conv1x1 = COPY
    read_only: bool = False


def rule(ours: str, theirs: str | tuple[str, ...], how=COPY, read_only: bool = False) -> Rule:
    return Rule(ours, (theirs,) if isinstance(theirs, str) else tuple(theirs), how, read_only)


def same(*names: str) -> list[Rule]:
    """Modules that keep their names in both layouts."""
    return [rule(n, n) for n in names]


def _longest_prefix(key: str, table: Mapping) -> tuple[str, str] | None:
    """(the longest prefix of ``key`` in ``table``, cut at a dot or the whole key; the rest of the key)."""
    cut = len(key)
    while cut > 0:
        if key[:cut] in table:
            return key[:cut], key[cut:]
        cut = key.rfind(".", 0, cut)
    return None


@dataclass
class Applied:
    out: StateDict
    consumed: list[str]
    problems: list[str]


def apply_to_ours(sd: Mapping, rules: Iterable[Rule]) -> Applied:
    """Their layout -> ours. A fused tensor is produced only when all its parts are there."""
    by_theirs = {name: (r, i) for r in rules for i, name in enumerate(r.theirs)}
    groups: dict[str, tuple[Rule, str, dict[int, str]]] = {}  # our key -> (rule, rest, part index -> their key)
    for key in sd:
        found = _longest_prefix(key, by_theirs)
        if found is not None:
            prefix, rest = found
            r, i = by_theirs[prefix]
            groups.setdefault(r.ours + rest, (r, rest, {}))[2][i] = key
    out: StateDict = {}
    consumed: list[str] = []
    problems: list[str] = []
    for ours, (r, rest, parts) in groups.items():
        if len(parts) < len(r.theirs):
            absent = [name + rest for i, name in enumerate(r.theirs) if i not in parts]
            problems.append(f"{ours} needs {', '.join(absent)}, which the input lacks")
            continue
        out[ours] = r.how.to_ours([sd[parts[i]] for i in range(len(r.theirs))])
        consumed.extend(parts.values())
    return Applied(out, consumed, problems)


def apply_to_theirs(sd: Mapping, rules: Iterable[Rule]) -> Applied:
    """Ours -> their layout (current names only: read-only spellings are never written)."""
    by_ours = {r.ours: r for r in rules if not r.read_only}
    out: StateDict = {}
    consumed: list[str] = []
    problems: list[str] = []
    for key, tensor in sd.items():
        found = _longest_prefix(key, by_ours)
        if found is None:
            continue
        prefix, rest = found
        r = by_ours[prefix]
        try:
            parts = r.how.to_theirs(tensor, len(r.theirs))
        except ConversionError as err:
            problems.append(f"{key}: {err}")
            continue
        out.update((name + rest, part) for name, part in zip(r.theirs, parts, strict=True))
        consumed.append(key)
    return Applied(out, consumed, problems)


def to_canonical(what: str, sd: Mapping, rules: Iterable[Rule],
                 expected: Mapping | Callable[[StateDict], Mapping] | None) -> StateDict:
    """Their layout -> ours, checked. ``expected``: our layout's keys and tensors (or shapes), or a function
    that builds them from the converted state dict (a model built on the meta device at the config derived
    from it); that function is called only once every input key has matched a rule."""
    done = apply_to_ours(sd, rules)
    if callable(expected):
        check_conversion(what, sd.keys(), done.consumed, done.out, None, done.problems)
        expected = expected(done.out)
    check_conversion(what, sd.keys(), done.consumed, done.out, expected, done.problems)
    return done.out


def from_canonical(what: str, sd: Mapping, rules: Iterable[Rule], expected_ours: Mapping) -> StateDict:
    """Ours -> their layout, checked against ``expected_ours`` (our model on the meta device) converted by
    the same rules: the input must hold exactly our model's keys with its shapes."""
    rules = list(rules)
    done = apply_to_theirs(sd, rules)
    expected = apply_to_theirs(expected_ours, rules)
    if expected.problems or len(expected.consumed) != len(expected_ours):
        raise ConversionError(f"{what}: the rules do not cover the model they were generated for "
                              f"({'; '.join(expected.problems[:3])}); this is a diffstudio bug, please report it")
    check_conversion(what, sd.keys(), done.consumed, done.out, expected.out, done.problems)
    return done.out
