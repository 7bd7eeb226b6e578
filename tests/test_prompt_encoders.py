"""The A1111 prompt language on the non-CLIP text encoders: T5 (SD3, FLUX), mT5 and BERT (Hunyuan-DiT),
ChatGLM (Kolors), at the tiny configs of tests/tiny_*.py with the packaged tokenizers.

References are computed here from the raw model output on the tokenizer's own padded ids
(``tokenize_t5``, ``tokenize_bert``, ``ChatGLMTokenizer.__call__``), independently of the weighted
token rows of ``sequence_tokens``; the weighting formula is written out again below.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from diffstudio.conditioning import PromptSyntaxWarning
from diffstudio.conditioning.bert_encode import encode_bert, tokenize_bert
from diffstudio.conditioning.chatglm_encode import encode_chatglm
from diffstudio.conditioning.embeddings import Embedding
from diffstudio.conditioning.t5_encode import encode_t5, tokenize_t5
from diffstudio.conditioning.tokenizers import load_tokenizer
from tests.tiny_sd15 import randomise

LENGTH = 24  # tokens per sequence in these tests (the releases: 77 to 512)
LONG = "a cat sitting on a mat, " * 12  # past LENGTH: truncated


@dataclass
class Case:
    name: str  # the encoder's name in warnings
    encode: Callable  # (prompts, **kwargs) -> hidden (B, T, C)
    reference: Callable  # (plain prompts) -> (hidden (B, T, C) from the model on the tokenizer's own ids, ids, mask)
    word_ids: Callable  # a word -> its token ids
    masked: bool  # the means of the weighting are taken over the attention mask's positions
    model: torch.nn.Module
    tokenizer: object


def _t5_case(kind: str, name: str, config: dict, masked: bool) -> Case:
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config(**config))
    randomise(model, 1)
    model.eval()
    tok = load_tokenizer(kind)

    def reference(prompts):
        ids, mask = tokenize_t5(tok, prompts, LENGTH)
        return model(input_ids=ids, attention_mask=mask if masked else None).last_hidden_state, ids, mask

    return Case(name, lambda prompts, **kw: encode_t5(model, tok, prompts, max_length=LENGTH, use_attention_mask=masked,
                                                      name=name, **kw)[0],
                reference, lambda word: tok(word, add_special_tokens=False)["input_ids"], masked, model, tok)


def _bert_case() -> Case:
    from transformers import BertConfig, BertModel

    from tests.tiny_hunyuan import BERT

    model = BertModel(BertConfig(**BERT), add_pooling_layer=False)
    randomise(model, 2)
    model.eval()
    tok = load_tokenizer("bert_zh")

    def reference(prompts):
        ids, mask = tokenize_bert(tok, prompts, LENGTH)
        hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        return hidden, ids, mask

    return Case("BERT", lambda prompts, **kw: encode_bert(model, tok, prompts, max_length=LENGTH, **kw)[0],
                reference, lambda word: tok(word, add_special_tokens=False)["input_ids"], True, model, tok)


def _chatglm_case() -> Case:
    from diffstudio.convert.chatglm import canonical_chatglm_keys
    from diffstudio.detect.chatglm import config_from_json
    from diffstudio.models.chatglm import ChatGLMEncoder
    from tests.tiny_kolors import reference_chatglm

    ref = reference_chatglm(seed=3)
    model = ChatGLMEncoder(config_from_json(ref.config.to_dict())).eval()
    model.load_state_dict(canonical_chatglm_keys(ref.state_dict()))
    tok = load_tokenizer("chatglm")

    def reference(prompts):
        t = tok(prompts, max_length=LENGTH)
        hidden = model(t["input_ids"], t["attention_mask"], t["position_ids"]).hidden_states[-2]
        return hidden, t["input_ids"], t["attention_mask"]

    return Case("ChatGLM", lambda prompts, **kw: encode_chatglm(model, tok, prompts, max_length=LENGTH, **kw)[0],
                reference, tok.piece_ids, False, model, tok)


def _build(name: str) -> Case:
    from tests.tiny_flux import T5
    from tests.tiny_hunyuan import MT5

    if name == "t5":
        return _t5_case("t5", "T5", T5, masked=False)  # SD3 / FLUX: no attention mask
    if name == "mt5":
        return _t5_case("mt5", "mT5", MT5, masked=True)  # Hunyuan-DiT: with the mask
    return _bert_case() if name == "bert" else _chatglm_case()


ENCODERS = ["t5", "mt5", "bert", "chatglm"]
ONE_SEQUENCE = ["t5", "mt5", "bert"]  # ChatGLM takes BREAK parts as chunks


@pytest.fixture(scope="module")
def cases():
    built: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in built:
            built[name] = _build(name)
        return built[name]

    return get


def run(case: Case, prompts, **kwargs) -> tuple[torch.Tensor, list[str]]:
    """The encoding and the messages of the warnings it issued."""
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        hidden = case.encode(prompts, **kwargs)
    return hidden, [str(w.message) for w in caught if issubclass(w.category, PromptSyntaxWarning)]


def reference(case: Case, prompts) -> torch.Tensor:
    with torch.no_grad():
        return case.reference(prompts)[0]


def a1111(z: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A1111's "Original" emphasis for one sequence z (T, C), weights w (T,): scale the tokens, then
    restore the mean (over the mask's positions, when the encoder masks)."""
    scaled = z * w[:, None]
    keep = torch.ones(z.shape[0]) if mask is None else mask.float()
    return scaled * ((z * keep[:, None]).sum() / (scaled * keep[:, None]).sum())


@pytest.mark.parametrize("name", ENCODERS)
def test_plain_prompts_encode_exactly_as_before(cases, name):
    case = cases(name)
    prompts = ["a photo of a cat", "", "一只可爱的小猫 a cute cat", LONG, "a cat: on a mat"]
    hidden, messages = run(case, prompts)
    assert torch.equal(hidden, reference(case, prompts))  # bitwise, padding and truncation included
    assert messages == []
    literal = ["a (red) cat BREAK x"]
    assert torch.equal(run(case, literal, syntax=False)[0], reference(case, literal))


@pytest.mark.parametrize("name", ENCODERS)
def test_weight_one_is_plain_text(cases, name):
    case = cases(name)
    expected = reference(case, ["a red cat"])
    for prompt in ["a (red:1.0) cat", "(a red cat:1)", "a ([red]) cat"]:
        assert torch.equal(run(case, [prompt])[0], expected), prompt


@pytest.mark.parametrize("name", ENCODERS)
def test_runs_at_word_boundaries_tokenize_as_plain_text(cases, name):
    """Each run is tokenised on its own; where brackets sit between words the tokens are the plain text's."""
    case = cases(name)
    pairs = [("a (red) cat", "a red cat"), ("(a cat:1.2), a dog", "a cat, a dog"),
             ("[blue] sky, (green grass:0.8)", "blue sky, green grass")]
    if name in ("mt5", "bert"):  # a Chinese word in brackets (ChatGLM's pieces span word boundaries)
        pairs.append(("一只(红色:1.3)的猫", "一只红色的猫"))
    for weighted, plain in pairs:
        assert torch.equal(run(case, [weighted], emphasis="ignore")[0], reference(case, [plain])), weighted


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("prompt, weight", [("a photo of a (red:1.5) cat", 1.5), ("a photo of a [red] cat", 1 / 1.1)])
def test_a_weighted_word_changes_its_tokens_by_the_rule(cases, name, prompt, weight):
    case = cases(name)
    with torch.no_grad():
        z, ids, mask = case.reference(["a photo of a red cat"])
    z, ids, mask = z[0], ids[0], mask[0]
    assert torch.equal(run(case, [prompt], emphasis="ignore")[0][0], z)  # the same tokens
    red = torch.tensor([i in case.word_ids("red") for i in ids.tolist()])
    assert red.sum() >= 1
    # No mean restoration: only "red"'s tokens change, by exactly the weight.
    no_norm = run(case, [prompt], emphasis="no_norm")[0][0]
    assert torch.equal(no_norm[~red], z[~red])
    assert torch.allclose(no_norm[red], z[red] * weight, rtol=1e-6, atol=1e-7)
    # A1111's "Original": the same, then every position times mean(z) / mean(z').
    w = torch.where(red, torch.tensor(weight), torch.tensor(1.0))
    original = run(case, [prompt])[0][0]
    assert torch.allclose(original, a1111(z, w, mask if case.masked else None), rtol=1e-5, atol=1e-6)
    ratio = original[red].norm() / z[red].norm() / (original[~red].norm() / z[~red].norm())
    assert ratio == pytest.approx(weight, rel=1e-4)  # relative to the others, "red" is scaled by its weight


@pytest.mark.parametrize("name", ENCODERS)
def test_weights_are_per_prompt_in_a_batch(cases, name):
    case = cases(name)
    batch = run(case, ["a (red:1.4) cat", "a green dog"])[0]
    assert torch.allclose(batch[0], run(case, ["a (red:1.4) cat"])[0][0], atol=1e-6)
    assert torch.equal(batch[1], reference(case, ["a green dog", "a (red:1.4) cat"])[0])


@pytest.mark.parametrize("name", ONE_SEQUENCE)
def test_one_sequence_encoders_ignore_break_with_one_warning(cases, name):
    case = cases(name)
    hidden, messages = run(case, ["a red cat BREAK a blue dog", "BREAK x BREAK y"])
    assert torch.equal(hidden, reference(case, ["a red cat a blue dog", "x y"]))  # read as one text
    assert len(messages) == 1
    assert messages[0].startswith(f"{case.name} ignores BREAK") and str(LENGTH) in messages[0]


def test_chatglm_encodes_each_break_part_as_a_chunk(cases):
    case = cases("chatglm")
    hidden, messages = run(case, ["a red cat BREAK a (blue:1.2) dog", "a green bird"])
    assert messages == []
    assert hidden.shape == (2, 2 * LENGTH, 64)
    first, second = reference(case, ["a red cat", ""]), run(case, ["a (blue:1.2) dog"])[0]
    assert torch.equal(hidden[0, :LENGTH], first[0])
    assert torch.allclose(hidden[0, LENGTH:], second[0], atol=1e-6)
    # A prompt with fewer parts is padded with the empty prompt's encoding, as on CLIP.
    assert torch.equal(hidden[1], torch.cat([reference(case, ["a green bird"])[0], first[1]]))
    # The pooled vector (never weighted) is the first part's, as CLIP's is its first chunk's.
    with torch.no_grad():
        _, pooled = encode_chatglm(case.model, case.tokenizer, ["a red cat BREAK a (blue:1.2) dog", "a red cat"],
                                   max_length=LENGTH)
        plain = case.model(**{k: v for k, v in case.tokenizer(["a red cat"], max_length=LENGTH).items()})
    assert torch.equal(pooled[0], pooled[1]) and torch.equal(pooled[1], plain.hidden_states[-1][0, -1])
    assert run(case, ["x BREAK"])[0].shape == (1, LENGTH, 64)  # a trailing BREAK adds no empty part
    assert run(case, ["BREAK x"])[0].shape == (1, 2 * LENGTH, 64)  # a leading one does


@pytest.mark.parametrize("name", ENCODERS)
def test_embeddings_are_named_in_one_warning(cases, name):
    case = cases(name)
    embeddings = {"zqstyle": Embedding("zqstyle", {"": torch.randn(2, 64)}), "zqunused": Embedding("zqunused", {})}
    hidden, messages = run(case, ["a ZQStyle cat BREAK red", "a dog"], embeddings=embeddings)
    assert len(messages) == 1  # BREAK (where ignored) and the embedding: one warning
    assert "'zqstyle'" in messages[0] and "zqunused" not in messages[0] and case.name in messages[0]
    assert ("BREAK" in messages[0]) == (name in ONE_SEQUENCE)
    plain = run(case, ["a ZQStyle cat red", "a dog"])[0] if name in ONE_SEQUENCE else None
    if plain is not None:
        assert torch.equal(hidden, plain)  # the name is read as text
    assert run(case, ["a zqstyles cat"], embeddings=embeddings)[1] == []  # whole words only
