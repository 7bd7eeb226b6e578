"""The check every converter ends with: every key consumed, none missing, every shape equal."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from diffstudio.errors import ConversionError

_SHOWN = 8  # keys listed per problem in an error message


def _some(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def check_conversion(what: str, source_keys: Iterable[str], consumed: Iterable[str],
                     produced: Mapping, expected: Mapping | None = None, found: Iterable[str] = ()) -> None:
    """Raise ConversionError unless the conversion `what` was complete and exact.

    source_keys: every key of the input state dict; consumed: those the map used.
    produced: the output state dict (key -> tensor, or key -> shape).
    expected: key -> tensor or shape of the target layout (e.g. a model built on the meta
    device); when given, the output must have exactly these keys with these shapes.
    found: what the map itself found wrong (a fused tensor with a part absent, rows that do not split).
    """
    problems = []
    found = list(found)
    if found:
        more = f" ... (+{len(found) - _SHOWN} more)" if len(found) > _SHOWN else ""
        problems.append("; ".join(found[:_SHOWN]) + more)
    unconsumed = set(source_keys) - set(consumed)
    if unconsumed:
        problems.append(f"{len(unconsumed)} input key(s) matched no rule: {_some(unconsumed)}")
    if expected is not None:
        missing = set(expected) - set(produced)
        extra = set(produced) - set(expected)
        if missing:
            problems.append(f"{len(missing)} expected key(s) missing: {_some(missing)}")
        if extra:
            problems.append(f"{len(extra)} key(s) the target layout does not have: {_some(extra)}")
        wrong = [f"{k} {_shape(produced[k])} != {_shape(expected[k])}"
                 for k in sorted(set(produced) & set(expected)) if _shape(produced[k]) != _shape(expected[k])]
        if wrong:
            problems.append(f"{len(wrong)} shape mismatch(es): {'; '.join(wrong[:_SHOWN])}")
    if problems:
        raise ConversionError(f"{what}: " + " | ".join(problems) +
                              ". The file is probably a different architecture or variant than assumed "
                              "(check the model type), or is truncated.")
