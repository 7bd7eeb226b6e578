r"""The prompt language of the AUTOMATIC1111 web UI: emphasis, BREAK, extra-network tags.

Pure Python (no torch): a prompt string becomes weighted text fragments, BREAK markers and the
``<lora:...>`` tags it named. Tokenising and encoding happen elsewhere (``prompt_tokens``,
``clip_encode``). The semantics follow A1111's wiki ("Attention/emphasis", "BREAK", "Extra
networks") and its observable behaviour; the code is our own.

Grammar (informal; characters not named here are plain text)::

    prompt     := ( tag | escape | open | close | weight_end | break | text )*
    tag        := "<" word ":" field ( ":" field )* ">"       removed first, anywhere in the prompt
    escape     := "\(" | "\)" | "\[" | "\]" | "\\"            the character itself, as plain text
    open       := "(" | "["                                   starts a group
    close      := ")"                                         ends the innermost open "(" group: x 1.1
                | "]"                                         ends the innermost open "[" group: / 1.1
    weight_end := ":" ws number ws ")"                        ends the innermost "(" group: x number
    break      := ws "BREAK" ws                               (upper case, a whole word) a new chunk
    number     := [+-]? [0-9.]+                               must parse as a float

Semantics:

* A fragment's weight is the product of the factors of the groups around it: ``(a)`` 1.1,
  ``((a))`` 1.21, ``[a]`` 1/1.1, ``(a:1.5)`` 1.5, ``((a:1.5))`` 1.65, ``([a])`` 1.0.
  ``(`` and ``[`` groups are counted on two separate stacks (as in A1111), so a ``)`` closes the
  innermost ``(`` even across an open ``[``: ``(a [b) c]`` gives a 1.1, b 1.0, c 1/1.1.
* Unbalanced brackets, as in A1111: a ``)`` or ``]`` with no open group of its kind is plain
  text; a group still open at the end of the prompt applies its default factor (1.1 or 1/1.1)
  to everything after its opening bracket. ``:1.5)`` outside a ``(`` group is plain text, and so
  is a number that is not a float (``(a:1.2.3)`` is the text ``a:1.2.3`` at 1.1; A1111 raises).
* A backslash not followed by one of ``( ) [ ] \`` is dropped (as in A1111), and the character
  after it is read as usual: ``a\b`` is ``ab``. A ``:`` that does not end a group is plain text.
* Adjacent fragments with equal weights are merged; empty fragments are dropped, so a prompt
  without syntax parses to itself as one fragment of weight 1.0 (and ``""`` to no fragments).
* ``BREAK`` (with the whitespace around it) becomes a :data:`BREAK` marker: the tokenizer closes
  the current 75-token chunk there. Unlike A1111 (whose marker picks up the weights of enclosing
  groups and then stops being a BREAK), a BREAK inside brackets is still a BREAK.
* Extra-network tags ``<kind:name[:weight][:more...]>`` are cut out of the text before anything
  else (the text around them is kept as is). ``<lora:...>`` and ``<lyco:...>`` both give kind
  ``"lora"``; other kinds (``<hypernet:...>``) are returned with their own kind, so the caller can
  refuse them by name instead of sending the tag's text to the encoder. ``<lora:name>`` has weight
  1.0. Further fields (A1111's ``<lora:name:te:unet>``, ``te=``, ``unet=``, ``dyn=``) are kept in
  :attr:`NetworkTag.args`. A weight that is not a number raises :class:`InvalidInputError`.

Not handled here (yet): prompt editing ``[a:b:0.5]`` and alternation ``[a|b]``, whose text is read
with the rules above (``[a:b:0.5]`` is the text ``a:b:0.5`` at 1/1.1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from diffstudio.errors import InvalidInputError

ROUND_FACTOR = 1.1  # "(word)"
SQUARE_FACTOR = 1 / 1.1  # "[word]"

_TAG = re.compile(r"<(\w+):([^>]+)>")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_WEIGHT_END = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_ESCAPES = {"\\(": "(", "\\)": ")", "\\[": "[", "\\]": "]", "\\\\": "\\"}
_LORA_KINDS = ("lora", "lyco")


class Fragment(NamedTuple):
    """A run of prompt text and its emphasis weight (1.0 = as written)."""

    text: str
    weight: float


class Break:
    """The BREAK marker: start a new chunk here. Use the module constant :data:`BREAK`."""

    _instance: Break | None = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "BREAK"


BREAK = Break()


@dataclass(frozen=True)
class NetworkTag:
    """An extra-network tag such as ``<lora:name:0.8>``, removed from the prompt text."""

    kind: str  # "lora" (for <lora:...> and <lyco:...>), else the tag's word in lower case
    name: str
    weight: float = 1.0
    args: tuple[str, ...] = ()  # fields after the weight, verbatim
    text: str = ""  # the tag as written


@dataclass(frozen=True)
class ParsedPrompt:
    """:func:`parse_prompt`'s result: the text as fragments and BREAKs, and the tags it named."""

    fragments: tuple[Fragment | Break, ...]
    tags: tuple[NetworkTag, ...] = ()

    @property
    def loras(self) -> list[tuple[str, float]]:
        """``[(name, weight), ...]`` of the ``<lora:...>`` / ``<lyco:...>`` tags, in prompt order."""
        return [(t.name, t.weight) for t in self.tags if t.kind == "lora"]

    @property
    def text(self) -> str:
        """The fragments' text without weights (BREAKs as " BREAK ")."""
        return "".join(" BREAK " if f is BREAK else f.text for f in self.fragments)

    @property
    def has_break(self) -> bool:
        return any(f is BREAK for f in self.fragments)

    @property
    def chunks(self) -> list[list[Fragment]]:
        """The fragments split at each BREAK, one list per part, by CLIP's chunk rule: a BREAK always
        closes a part (``BREAK x`` starts with an empty one), the last part is dropped when it is empty
        and not the only one (``x BREAK`` is one part)."""
        parts: list[list[Fragment]] = [[]]
        for fragment in self.fragments:
            if fragment is BREAK:
                parts.append([])
            else:
                parts[-1].append(fragment)
        return parts[:-1] if len(parts) > 1 and not parts[-1] else parts

    @classmethod
    def literal(cls, text: str) -> ParsedPrompt:
        """``text`` as written, one fragment at weight 1 (no syntax read, no tags removed)."""
        return cls((Fragment(text, 1.0),))


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Parse one prompt (see the module docstring for the grammar)."""
    text, tags = extract_network_tags(prompt)
    return ParsedPrompt(tuple(parse_emphasis(text)), tuple(tags))


def extract_network_tags(prompt: str) -> tuple[str, list[NetworkTag]]:
    """``(prompt without its <kind:...> tags, the tags)``; nothing else in the text changes."""
    tags = [_make_tag(m) for m in _TAG.finditer(prompt)]
    return (_TAG.sub("", prompt) if tags else prompt), tags


def _make_tag(match: re.Match) -> NetworkTag:
    kind = match.group(1).lower()
    name, *fields = match.group(2).split(":")
    positional = [f for f in fields if "=" not in f]
    named = tuple(f for f in fields if "=" in f)
    weight = 1.0
    if positional:
        try:
            weight = float(positional[0])
        except ValueError:
            raise InvalidInputError(
                f"{match.group(0)!r}: the weight {positional[0]!r} is not a number; write "
                f"<{match.group(1)}:{name}:0.8> (or <{match.group(1)}:{name}> for 1.0)") from None
    kind = "lora" if kind in _LORA_KINDS else kind
    return NetworkTag(kind, name.strip(), weight, tuple(positional[1:]) + named, match.group(0))


def parse_emphasis(text: str) -> list[Fragment | Break]:
    """The emphasis/BREAK part of the grammar (tags already removed) -> merged fragments and BREAKs."""
    items: list[list | Break] = []  # [text, weight] (weights are scaled in place) or BREAK
    round_open: list[int] = []  # index into items where each open "(" group starts
    square_open: list[int] = []
    pending: list[str] = []  # plain characters not yet added

    def flush() -> None:
        for i, part in enumerate(_BREAK.split("".join(pending))):
            if i:
                items.append(BREAK)
            if part:
                items.append([part, 1.0])
        pending.clear()

    def scale(start: int, factor: float) -> None:
        for item in items[start:]:
            if item is not BREAK:
                item[1] *= factor

    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            pair = text[i : i + 2]
            if pair in _ESCAPES:
                pending.append(_ESCAPES[pair])
            i += 2 if pair in _ESCAPES else 1  # a lone backslash is dropped
            continue
        if char in "([":
            flush()
            (round_open if char == "(" else square_open).append(len(items))
            i += 1
            continue
        if char == ":" and round_open:
            match = _WEIGHT_END.match(text, i)
            weight = _float_or_none(match.group(1)) if match else None
            if weight is not None:
                flush()
                scale(round_open.pop(), weight)
                i = match.end()
                continue
        if (char == ")" and round_open) or (char == "]" and square_open):
            flush()
            if char == ")":
                scale(round_open.pop(), ROUND_FACTOR)
            else:
                scale(square_open.pop(), SQUARE_FACTOR)
            i += 1
            continue
        pending.append(char)
        i += 1
    flush()
    for start in round_open:  # unclosed groups still apply (A1111)
        scale(start, ROUND_FACTOR)
    for start in square_open:
        scale(start, SQUARE_FACTOR)
    return _merge(items)


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _merge(items: list[list | Break]) -> list[Fragment | Break]:
    out: list[Fragment | Break] = []
    for item in items:
        if item is BREAK:
            out.append(BREAK)
        elif out and out[-1] is not BREAK and out[-1].weight == item[1]:
            out[-1] = Fragment(out[-1].text + item[0], item[1])
        else:
            out.append(Fragment(item[0], item[1]))
    return out
