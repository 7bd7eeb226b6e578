"""Prompt weighting, BREAK, long prompts, textual inversion and prompt LoRA tags, on tiny CLIPs.

Expected values are computed here from the raw CLIP output (``model(input_ids).last_hidden_state``),
independently of ``encode_clip``'s code path.
"""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import diffstudio
from diffstudio.conditioning import embeddings as ti
from diffstudio.conditioning import encode_clip, load_clip_tokenizer, prompt_token_ids, tokenize_chunks
from diffstudio.errors import (
    EmbeddingMismatchError,
    LoRANotFoundError,
    LoRAUnavailableError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from diffstudio.families import get_family
from diffstudio.loader import Models
from tests.tiny_sd15 import CLIP, randomise, reference_models, write_diffusers_folder

WORDS = ["red", "green", "blue", "cat", "dog", "house", "tree", "sky", "river", "photo", "light", "dark"]


def tiny_clip(seed: int = 0, width: int = 64, projection: bool = False) -> torch.nn.Module:
    config = CLIPTextConfig(**{**CLIP, "hidden_size": width, "projection_dim": 16})
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    randomise(model, seed)
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def clip_l():
    return tiny_clip(seed=11)


@pytest.fixture(scope="module")
def clip_g():  # a narrower second encoder, like SDXL's bigG next to CLIP-L
    return tiny_clip(seed=12, width=32, projection=True)


def text_models(model, tok) -> Models:
    """A Models holding just a text encoder: what the textual-inversion tests need (its embeddings)."""
    return Models(get_family("sd15"), {"text_encoder": model, "tokenizer": tok}, {})


def raw(model, tok, text: str) -> torch.Tensor:
    """The unweighted encoding of ``text``'s chunks, straight from the model: (1, 77 * chunks, C)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokenize_chunks(tok, text))).last_hidden_state
    return out.reshape(1, -1, out.shape[-1])


def encode(model, tok, prompts, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return encode_clip(model, tok, prompts, **kwargs)[0]


# ------------------------------------------------------------------------------------ weighting


def test_prompts_without_syntax_encode_exactly_as_before(clip_l, tok):
    rng = random.Random(0)
    long_prompt = ", ".join(rng.choice(WORDS) for _ in range(60))  # 119 tokens: 2 chunks
    for prompt in ["a photo of a cat", "", "a cat: on a mat", long_prompt]:
        assert torch.equal(encode(clip_l, tok, [prompt]), raw(clip_l, tok, prompt)), prompt
    literal = "a (red) cat"
    assert torch.equal(encode(clip_l, tok, [literal], syntax=False), raw(clip_l, tok, literal))


def test_weight_one_everywhere_is_exact(clip_l, tok):
    expected = raw(clip_l, tok, "a red cat")
    for prompt in ["a (red:1) cat", "(a red cat:1.0)", "a red cat <lora:x:0.5>"]:
        assert torch.equal(encode(clip_l, tok, [prompt]), expected), prompt


def test_a1111_formula_against_raw_output(clip_l, tok):
    ids = prompt_token_ids(tok, ["a red cat"])[0]
    assert prompt_token_ids(tok, ["a ", "red", " cat"]) == [[ids[0]], [ids[1]], [ids[2]]]
    z = raw(clip_l, tok, "a red cat")[0]  # (77, C); "red" is at position 2 (after BOS and "a")
    w = torch.ones(77)
    w[2] = 1.5
    no_norm = encode(clip_l, tok, ["a (red:1.5) cat"], emphasis="no_norm")[0]
    others = torch.arange(77) != 2
    assert torch.equal(no_norm[others], z[others])  # before mean restoration only "red" changes
    assert torch.allclose(no_norm[2], z[2] * 1.5, rtol=1e-6, atol=1e-6)

    expected = z * w[:, None]
    expected = expected * (z.mean() / expected.mean())
    original = encode(clip_l, tok, ["a (red:1.5) cat"])[0]
    assert torch.allclose(original, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(original.mean(), z.mean(), rtol=1e-5, atol=1e-7)  # the mean is restored
    assert not torch.allclose(original, z, atol=1e-4)
    assert torch.equal(encode(clip_l, tok, ["a (red:1.5) cat"], emphasis="ignore")[0], z)


def test_weights_are_per_prompt_in_a_batch(clip_l, tok):
    batch = encode(clip_l, tok, ["a (red:1.4) cat", "a green dog"])
    assert torch.allclose(batch[0], encode(clip_l, tok, ["a (red:1.4) cat"])[0], atol=1e-6)
    assert torch.equal(batch[1], raw(clip_l, tok, "a green dog")[0])


def test_text_past_77_tokens_reaches_the_encoder(clip_l, tok):
    words = [random.Random(1).choice(WORDS[:3]) for _ in range(110)]
    words[0] = "(" + words[0] + ":1.3)"
    changed = list(words)
    changed[99] = "house"  # token 100 of the prompt: in the second chunk
    a, b = encode(clip_l, tok, [" ".join(words)]), encode(clip_l, tok, [" ".join(changed)])
    assert a.shape == (1, 154, 64)
    assert torch.equal(a[:, :77], b[:, :77])
    assert not torch.allclose(a[:, 77:], b[:, 77:], atol=1e-4)


def test_break_starts_a_new_chunk(clip_l, tok):
    hidden = encode(clip_l, tok, ["a red cat BREAK a blue dog"])
    assert hidden.shape == (1, 154, 64)
    assert torch.equal(hidden[:, :77], raw(clip_l, tok, "a red cat"))
    assert torch.equal(hidden[:, 77:], raw(clip_l, tok, "a blue dog"))
    leading = encode(clip_l, tok, ["BREAK a blue dog"])
    assert torch.equal(leading[:, :77], raw(clip_l, tok, ""))  # an empty chunk first
    full = " ".join(["red"] * 75)  # exactly one full chunk: BREAK adds no empty chunk after it
    assert encode(clip_l, tok, [full + " BREAK dog"]).shape == (1, 154, 64)
    assert encode(clip_l, tok, [full + " BREAK"]).shape == (1, 77, 64)


# ------------------------------------------------------------------------------------ textual inversion


def save_a1111_pt(path, vectors):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "x", "step": 500,
                "sd_checkpoint": "abcd", "sd_checkpoint_name": "model"}, path)


def save_a1111_parameterdict(path, vectors):  # the first A1111 / textual_inversion files
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors)})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, path)


def save_emb_params(path, vectors):
    save_file({"emb_params": vectors.contiguous()}, str(path))


def save_diffusers_bin(path, vectors):
    torch.save({"<some-token>": vectors[0] if vectors.shape[0] == 1 else vectors}, path)


FORMATS = {"a1111.pt": save_a1111_pt, "paramdict.pt": save_a1111_parameterdict,
           "emb_params.safetensors": save_emb_params, "diffusers.bin": save_diffusers_bin}


class CaptureEmbeddingInput:
    """Records the token embeddings entering the transformer (embedding output minus positions)."""

    def __init__(self, model):
        self.model, self.rows = model, None
        self.handle = getattr(model, "text_model", model).embeddings.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.rows = (output - module.position_embedding.weight[: output.shape[1]]).detach().clone()

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n_vectors", [1, 3])
def test_embedding_formats_encode_with_their_vectors(tmp_path, clip_l, tok, fmt, n_vectors):
    vectors = torch.randn(n_vectors, 64)
    path = tmp_path / f"zqstyle.{fmt.split('.')[-1]}"
    FORMATS[fmt](path, vectors)
    loaded = ti.load_embedding(path)
    assert loaded.name == "zqstyle" and loaded.num_vectors == n_vectors
    assert torch.equal(loaded.vectors_for(64), vectors)

    before = {k: v.clone() for k, v in clip_l.state_dict().items()}
    models = text_models(clip_l, tok)
    assert models.add_embedding(path)[0].name == "zqstyle"
    capture = CaptureEmbeddingInput(clip_l)
    try:  # the tokenizer lower-cases the name
        hidden = encode(clip_l, tok, ["a photo of ZQStyle cat"], embeddings=models.embeddings)
    finally:
        capture.close()
    start = 1 + len(prompt_token_ids(tok, ["a photo of"])[0])
    assert torch.allclose(capture.rows[0, start : start + n_vectors], vectors, atol=1e-6)
    cat_id = prompt_token_ids(tok, ["cat"])[0][0]  # the next word follows the N vectors
    token_table = clip_l.get_input_embeddings().weight
    assert torch.allclose(capture.rows[0, start + n_vectors], token_table[cat_id], atol=1e-6)
    assert not torch.allclose(hidden, raw(clip_l, tok, "a photo of zqstyle cat"), atol=1e-4)
    after = clip_l.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the encoder's weights are untouched
    assert not clip_l.get_input_embeddings()._forward_hooks  # and nothing stays hooked
    # Without the mapping (another model's prompts) the name is plain text.
    assert torch.equal(encode(clip_l, tok, ["a photo of zqstyle cat"]), raw(clip_l, tok, "a photo of zqstyle cat"))


def test_embedding_never_straddles_chunks_and_takes_weights(tmp_path, clip_l, tok):
    save_emb_params(tmp_path / "zqthree.safetensors", torch.randn(3, 64))
    models = text_models(clip_l, tok)
    models.add_embedding(tmp_path)
    capture = CaptureEmbeddingInput(clip_l)
    try:  # 73 + 3 > 75: next chunk
        hidden = encode(clip_l, tok, [" ".join(["red"] * 73) + " zqthree"], embeddings=models.embeddings)
    finally:
        capture.close()
    assert hidden.shape == (1, 154, 64)
    assert torch.allclose(capture.rows[1, 1:4], models.embeddings["zqthree"].vectors_for(64), atol=1e-6)
    weighted = encode(clip_l, tok, ["a (zqthree:1.2)"], emphasis="no_norm", embeddings=models.embeddings)
    plain = encode(clip_l, tok, ["a zqthree"], embeddings=models.embeddings)
    assert torch.allclose(weighted[0, 2:5], plain[0, 2:5] * 1.2, atol=1e-5)  # all three vectors weighted


def test_sdxl_dual_file_and_width_mismatch(tmp_path, clip_l, clip_g, tok):
    vectors = {"clip_l": torch.randn(2, 64), "clip_g": torch.randn(2, 32)}
    save_file(vectors, str(tmp_path / "zqdual.safetensors"))
    save_emb_params(tmp_path / "zqsdone.safetensors", torch.randn(1, 64))
    embeddings = text_models(clip_l, tok)
    embeddings.add_embedding(tmp_path)  # adding never checks widths: using a name does
    embeddings = embeddings.embeddings
    for model, key in [(clip_l, "clip_l"), (clip_g, "clip_g")]:
        capture = CaptureEmbeddingInput(model)
        try:
            encode(model, tok, ["zqdual cat"], embeddings=embeddings)
        finally:
            capture.close()
        assert torch.allclose(capture.rows[0, 1:3], vectors[key], atol=1e-6), key
    encode(clip_l, tok, ["zqsdone cat"], embeddings=embeddings)  # an SD 1.x embedding fits the 64-wide encoder
    with pytest.raises(EmbeddingMismatchError, match="zqsdone"):
        encode(clip_g, tok, ["zqsdone cat"], embeddings=embeddings)
    assert not clip_g.get_input_embeddings()._forward_hooks


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": Payload()}}, path)
    with pytest.raises(UnsafeCheckpointError):
        ti.load_embedding(path)
    models = text_models(tiny_clip(), load_clip_tokenizer())
    with pytest.raises(UnsafeCheckpointError):
        models.add_embedding(tmp_path)
    assert not marker.exists()
    assert models.embeddings == {}


def test_unrecognised_file(tmp_path):
    save_file({"a": torch.zeros(2, 4), "b": torch.zeros(3)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(UnsupportedFormatError, match="textual-inversion"):
        ti.load_embedding(tmp_path / "two.safetensors")


# ------------------------------------------------------------------------------------ the pipeline


def test_lora_tags_without_lora_support():
    from diffstudio.conditioning.lora_tags import PromptLoRAs, split_lora_tags

    loras, model = PromptLoRAs(), SimpleNamespace()
    assert loras.models_for(model, [], []) is model  # no tags: nothing is asked of the model
    with pytest.raises(LoRAUnavailableError, match="inkstyle"):
        loras.models_for(model, split_lora_tags(["a <lora:inkstyle:0.5>"])[1], [])


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = write_diffusers_folder(tmp_path_factory.mktemp("prompts") / "sd15", *reference_models())
    return diffstudio.Pipeline(diffstudio.load(folder))


def generate(pipe, prompt, **kwargs):
    image = pipe(prompt, width=64, height=64, steps=2, seed=5, progress=False, **kwargs)[0]
    return image, np.asarray(image).astype(np.int16)


def test_pipeline_weights_and_lora_tags(pipe, tmp_path):
    models = pipe.models
    _, plain = generate(pipe, "a red circle")
    _, weighted = generate(pipe, "a (red:1.6) circle")
    assert np.abs(plain - weighted).max() > 0  # the SD 1.x record encodes with the syntax

    with pytest.raises(LoRANotFoundError, match="inkstyle"):  # pipe.lora_dirs is empty
        generate(pipe, "a red circle <lora:inkstyle:0.5>")

    calls = []

    def apply_lora(path, strength, text_strength=None):  # on the clone the pipeline makes for the tags
        calls.append((path, strength, text_strength))

    (tmp_path / "inkstyle.pt").write_bytes(b"x")
    (tmp_path / "inkstyle.safetensors").write_bytes(b"x")
    models.apply_lora = apply_lora
    pipe.lora_dirs = [tmp_path]
    try:
        image, tagged = generate(pipe, "a red circle <lora:inkstyle:0.5>")
        assert calls == [(tmp_path / "inkstyle.safetensors", 0.5, None)]
        assert np.array_equal(tagged, plain)  # the tag's text never reaches the encoder
        assert image.info["diffstudio_recipe"]["prompt"] == "a red circle <lora:inkstyle:0.5>"
        generate(pipe, "a blue circle <lora:inkstyle:0.5>")
        assert len(calls) == 1  # same tags: the same clone, nothing applied again
        generate(pipe, "a blue circle", negative_prompt="<lora:inkstyle:0.5:0.25>")  # negatives count too
        assert calls[1] == (tmp_path / "inkstyle.safetensors", 0.25, 0.5)
        generate(pipe, "a blue circle")
        assert len(calls) == 2 and models.loras == []  # no tags: the model itself, which never had them
    finally:
        del models.apply_lora
        pipe.lora_dirs = []


def test_embeddings_belong_to_one_models_object(tmp_path, clip_l, tok):
    """Two models (here sharing one text encoder) never see each other's embeddings."""
    save_emb_params(tmp_path / "zqmine.safetensors", torch.randn(2, 64))
    with_it, without_it = text_models(clip_l, tok), text_models(clip_l, tok)
    with_it.add_embedding(tmp_path / "zqmine.safetensors", name="zqours")  # name= renames a single file
    assert list(with_it.embeddings) == ["zqours"] and without_it.embeddings == {}
    family = with_it.family
    with torch.no_grad():
        ours = family.make_conditioning(with_it, ["a zqours cat"], clip_skip=1)["context"]
        theirs = family.make_conditioning(without_it, ["a zqours cat"], clip_skip=1)["context"]
    assert torch.equal(theirs, raw(clip_l, tok, "a zqours cat"))  # the name is plain text there
    assert not torch.allclose(ours, theirs, atol=1e-4)
    assert not hasattr(ti, "add_embedding") and not hasattr(ti, "registered_embeddings")  # no global registry
