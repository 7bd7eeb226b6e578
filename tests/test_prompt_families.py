"""Each family record hands its prompts, parsed once, to every encoder, with the model's own embeddings:
FLUX and SD3 (CLIP + T5), Hunyuan-DiT (BERT + mT5) and Kolors (ChatGLM), loaded from the tiny folders
of tests/tiny_*.py. The non-CLIP part of the conditioning is checked against the raw encoder on the
tokenizer's own ids, and the weighting against the formula written out in test_prompt_encoders.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

import diffstudio
from diffstudio.conditioning import PromptSyntaxWarning
from diffstudio.conditioning.bert_encode import tokenize_bert
from diffstudio.conditioning.t5_encode import tokenize_t5
from tests.test_prompt_encoders import a1111

WEIGHT = 1.5


def _folder(name: str, root):
    if name == "flux":
        from tests.tiny_flux import reference_models, write_diffusers_folder

        return write_diffusers_folder(root / name, *reference_models("schnell"), variant="schnell")
    if name == "sd3":
        from tests.tiny_sd3 import reference_models, write_diffusers_folder

        return write_diffusers_folder(root / name, reference_models())
    if name == "hunyuan":
        from tests.tiny_hunyuan import reference_models, write_diffusers_folder

        return write_diffusers_folder(root / name, *reference_models())
    from tests.tiny_kolors import reference_models, write_diffusers_folder

    return write_diffusers_folder(root / name, *reference_models())


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    root, loaded = tmp_path_factory.mktemp("families"), {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = diffstudio.load(_folder(name, root))
        return loaded[name]

    return get


@pytest.fixture(scope="module")
def embedding_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("embeddings") / "zqstyle.safetensors"
    save_file({"emb_params": torch.randn(2, 64)}, str(path))  # 64: the tiny CLIP-Ls' width
    return path


def condition(models, prompts) -> tuple[dict, list[str]]:
    """The family's conditioning and the prompt warnings it issued."""
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        cond = models.family.make_conditioning(models, prompts, clip_skip=models.family.text_encoders[0]
                                               .default_clip_skip, width=64, height=64)
    return cond, [str(w.message) for w in caught if issubclass(w.category, PromptSyntaxWarning)]


def check_rule(weighted: torch.Tensor, plain: torch.Tensor, ids: torch.Tensor, word: list[int],
               mask: torch.Tensor | None) -> None:
    """One sequence: the weighted prompt's encoding is the plain one with the word's tokens scaled by
    WEIGHT and the mean restored (over ``mask``'s positions when given)."""
    red = torch.tensor([i in word for i in ids.tolist()])
    assert red.sum() >= 1
    w = torch.where(red, torch.tensor(WEIGHT), torch.tensor(1.0))
    assert torch.allclose(weighted.float(), a1111(plain.float(), w, mask), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(weighted, plain, atol=1e-4)


PLAIN, WEIGHTED = "a photo of a red cat", f"a photo of a (red:{WEIGHT}) cat"
BREAKS = "a photo of a red cat BREAK zqstyle"


def test_flux_t5_takes_the_weights_and_names_what_it_ignores(load, embedding_file):
    models = load("flux")
    plain, messages = condition(models, [PLAIN])
    assert messages == []
    length = plain["context"].shape[1]
    ids = tokenize_t5(models.tokenizer_2, [PLAIN], length)[0]
    with torch.no_grad():
        assert torch.equal(plain["context"], models.text_encoder_2(input_ids=ids).last_hidden_state)
    weighted, _ = condition(models, [WEIGHTED])
    word = models.tokenizer_2("red", add_special_tokens=False)["input_ids"]
    check_rule(weighted["context"][0], plain["context"][0], ids[0], word, None)
    assert torch.equal(weighted["y"], plain["y"])  # CLIP's pooled vector is never weighted

    models.add_embedding(embedding_file)
    cond, messages = condition(models, [BREAKS])
    assert len(messages) == 1 and "T5 ignores BREAK" in messages[0] and "'zqstyle'" in messages[0]
    # CLIP honours both: its pooled vector is the first chunk's, "a photo of a red cat".
    assert torch.equal(cond["y"], plain["y"])


def test_sd3_t5_part_takes_the_weights(load):
    models = load("sd3")
    plain, messages = condition(models, [PLAIN])
    weighted, more = condition(models, [WEIGHTED])
    assert messages == more == []
    clip_tokens = 77  # one CLIP chunk, then T5's tokens
    t5_plain, t5_weighted = plain["context"][0, clip_tokens:], weighted["context"][0, clip_tokens:]
    ids = tokenize_t5(models.tokenizer_3, [PLAIN], t5_plain.shape[0])[0]
    with torch.no_grad():
        assert torch.equal(t5_plain, models.text_encoder_3(input_ids=ids).last_hidden_state[0].float())
    word = models.tokenizer_3("red", add_special_tokens=False)["input_ids"]
    check_rule(t5_weighted, t5_plain, ids[0], word, None)
    assert not torch.equal(plain["context"][:, :clip_tokens], weighted["context"][:, :clip_tokens])  # CLIP too
    cond, messages = condition(models, ["a red cat BREAK a dog"])
    assert cond["context"].shape[1] == 2 * clip_tokens + t5_plain.shape[0]  # CLIP: two chunks; T5: one sequence
    assert len(messages) == 1 and messages[0].startswith("T5 ignores BREAK")


def test_hunyuan_bert_and_mt5_take_the_weights_with_their_masks(load, embedding_file):
    models = load("hunyuan")
    plain, messages = condition(models, [PLAIN])
    weighted, _ = condition(models, [WEIGHTED])
    assert messages == []
    for states, mask_key, tokenizer, tokenize in [
            ("encoder_hidden_states", "text_embedding_mask", models.tokenizer, tokenize_bert),
            ("encoder_hidden_states_t5", "text_embedding_mask_t5", models.tokenizer_2, tokenize_t5)]:
        ids, mask = tokenize(tokenizer, [PLAIN], plain[states].shape[1])
        assert torch.equal(plain[mask_key], mask.bool())
        word = tokenizer("red", add_special_tokens=False)["input_ids"]
        check_rule(weighted[states][0], plain[states][0], ids[0], word, mask[0])

    models.add_embedding(embedding_file)
    _, messages = condition(models, [BREAKS])
    assert len(messages) == 2  # one per encoder, each naming everything it ignored
    assert messages[0].startswith("BERT ignores BREAK") and messages[1].startswith("mT5 ignores BREAK")
    assert all("'zqstyle'" in m for m in messages)


def test_kolors_chatglm_takes_weights_and_break_chunks(load, embedding_file):
    models = load("kolors")
    plain, messages = condition(models, [PLAIN])
    weighted, _ = condition(models, [WEIGHTED])
    assert messages == []
    tokens = models.tokenizer([PLAIN], max_length=plain["context"].shape[1])
    with torch.no_grad():
        out = models.text_encoder(tokens["input_ids"], tokens["attention_mask"], tokens["position_ids"])
    assert torch.equal(plain["context"][0], out.hidden_states[-2][0])
    check_rule(weighted["context"][0], plain["context"][0], tokens["input_ids"][0], models.tokenizer.piece_ids("red"),
               None)
    assert torch.equal(weighted["y"], plain["y"])  # the pooled vector is never weighted

    models.add_embedding(embedding_file)
    cond, messages = condition(models, [BREAKS, "a dog"])
    assert cond["context"].shape[1] == 2 * plain["context"].shape[1]  # BREAK: two chunks
    assert torch.equal(cond["context"][0, : plain["context"].shape[1]], plain["context"][0])
    assert len(messages) == 1 and "BREAK" not in messages[0] and "'zqstyle'" in messages[0]
