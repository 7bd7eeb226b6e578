"""The A1111 prompt language: emphasis, escapes, BREAK, <lora:...> tags, and LoRA file lookup.

Expected weights are written from A1111's documentation ("Attention/emphasis" in its wiki and the
examples of its parser's docstring): (x) = x1.1, [x] = /1.1, (x:w) = w, nesting multiplies, an
unclosed group applies to the end, \\( is a literal parenthesis.
"""

from __future__ import annotations

import pytest

from diffstudio.conditioning.lora_tags import requested_loras, resolve_lora, split_lora_tags
from diffstudio.conditioning.prompt_syntax import BREAK, NetworkTag, parse_prompt
from diffstudio.errors import InvalidInputError, LoRANotFoundError

CASES = [
    # plain text, and the wiki's examples
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1**4), (".", 1.1)]),
    # one rule at a time
    ("(word)", [("word", 1.1)]),
    ("((word))", [("word", 1.21)]),
    ("(((word)))", [("word", 1.331)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", 1 / 1.21)]),
    ("(word:1.5)", [("word", 1.5)]),
    ("(word: 1.5 )", [("word", 1.5)]),
    ("(word:.5)", [("word", 0.5)]),
    ("(word:-1)", [("word", -1.0)]),
    ("((word:1.5))", [("word", 1.65)]),
    ("((word):1.5)", [("word", 1.65)]),
    ("[(word)]", [("word", 1.0)]),
    ("a, (b, [c]), d", [("a, ", 1.0), ("b, ", 1.1), ("c, d", 1.0)]),  # c: 1.1 / 1.1 = 1, merged with ", d"
    ("(a (b:2) c)", [("a ", 1.1), ("b", 2.2), (" c", 1.1)]),
    # unbalanced: stray closers are text, unclosed openers apply to the end
    ("a ) b ] c", [("a ) b ] c", 1.0)]),
    ("[unclosed", [("unclosed", 1 / 1.1)]),
    ("a (b [c", [("a ", 1.0), ("b ", 1.1), ("c", 1.0)]),
    ("word:1.5)", [("word:1.5)", 1.0)]),
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),
    ("(a [b) c]", [("a ", 1.1), ("b", 1.0), (" c", 1 / 1.1)]),  # separate stacks for ( and [
    # escapes
    (r"\(a\)", [("(a)", 1.0)]),
    (r"\[a\]", [("[a]", 1.0)]),
    (r"(\(a\))", [("(a)", 1.1)]),
    ("a\\\\b", [("a\\b", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    # colons that end nothing
    ("a: b", [("a: b", 1.0)]),
    # empty
    ("", []),
    ("()", []),
]


def normalised(fragments):
    return [f if f is BREAK else (f.text, f.weight) for f in fragments]


@pytest.mark.parametrize("prompt, expected", CASES, ids=[c[0] or "empty" for c in CASES])
def test_emphasis_table(prompt, expected):
    got = normalised(parse_prompt(prompt).fragments)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.mark.parametrize("prompt, expected", [
    ("a cat BREAK a dog", [("a cat", 1.0), BREAK, ("a dog", 1.0)]),
    ("BREAK a dog", [BREAK, ("a dog", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), BREAK, BREAK, ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # still a BREAK inside brackets
    ("aBREAK b", [("aBREAK b", 1.0)]),  # not a whole word
    ("a break b", [("a break b", 1.0)]),  # upper case only
])
def test_break(prompt, expected):
    got = normalised(parse_prompt(prompt).fragments)
    assert got == expected


def test_prompt_without_syntax_is_one_fragment():
    prompt = "masterpiece, a photo of a cat: on a mat, 8k"
    assert normalised(parse_prompt(prompt).fragments) == [(prompt, 1.0)]


def test_lora_tags_are_removed_and_returned():
    parsed = parse_prompt("<lora:ink style:0.8>a (cat) <lyco:sketch> on <LoRA:grain:-0.25>a mat")
    assert normalised(parsed.fragments) == [("a ", 1.0), ("cat", 1.1), ("  on a mat", 1.0)]
    assert parsed.loras == [("ink style", 0.8), ("sketch", 1.0), ("grain", -0.25)]
    assert parsed.tags[1] == NetworkTag("lora", "sketch", 1.0, (), "<lyco:sketch>")


def test_other_tags_and_extra_fields():
    parsed = parse_prompt("x <hypernet:h:0.5> <lora:a:0.5:0.25:dyn=8>")
    assert parsed.loras == [("a", 0.5)]
    assert [(t.kind, t.name, t.weight, t.args) for t in parsed.tags] == [
        ("hypernet", "h", 0.5, ()), ("lora", "a", 0.5, ("0.25", "dyn=8"))]
    with pytest.raises(InvalidInputError, match="not a number"):
        parse_prompt("<lora:a:strong>")


def test_batch_tag_requests():
    texts, tags = split_lora_tags(["<lora:a:0.5> x", "y <lora:b>", "<lora:a:0.5>", "<lora:c:0.5:0.25>",
                                   "<lyco:d:unet=0.3:te=0.2>"])
    assert texts == [" x", "y ", "", "", ""]
    # (name, text-encoder strength, UNet strength): A1111's <lora:name:te:unet> and te= / unet= forms
    assert requested_loras(tags) == (("a", 0.5, 0.5), ("b", 1.0, 1.0), ("c", 0.5, 0.25), ("d", 0.2, 0.3))
    for prompts, message in [(["<lora:a:0.5>", "<lora:a:0.7>"], "one weight"),
                             (["<hypernet:h>"], "not supported"),
                             (["<lora:a:0.5:0.2:8>"], "not supported"),
                             (["<lora:a:0.5:dyn=8>"], "dyn= not supported"),
                             (["<lora:a:0.5:unet=x>"], "not a number")]:
        with pytest.raises(InvalidInputError, match=message):
            requested_loras(split_lora_tags(prompts)[1])


def test_resolve_lora(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    (first / "styles").mkdir(parents=True)
    second.mkdir()
    (first / "ink.pt").write_bytes(b"x")
    (second / "ink.safetensors").write_bytes(b"x")  # .safetensors wins over an earlier folder's .pt
    (first / "styles" / "grain.safetensors").write_bytes(b"x")
    (first / "styles" / "pencil.ckpt").write_bytes(b"x")
    assert resolve_lora("ink", [first, second]) == second / "ink.safetensors"
    assert resolve_lora("styles/grain", [first]) == first / "styles" / "grain.safetensors"
    assert resolve_lora("grain", [first]) == first / "styles" / "grain.safetensors"  # found below the folder
    assert resolve_lora("pencil", [second, first]) == first / "styles" / "pencil.ckpt"
    assert resolve_lora(str(first / "ink.pt"), []) == first / "ink.pt"  # a path is taken as is
    (second / "styles").mkdir()
    (second / "styles" / "x.safetensors").write_bytes(b"x")
    (second / "more").mkdir()
    (second / "more" / "x.safetensors").write_bytes(b"x")
    with pytest.raises(InvalidInputError, match="several files"):
        resolve_lora("x", [second])
    with pytest.raises(LoRANotFoundError, match="missing"):
        resolve_lora("missing", [first, second])
