"""CLIP text encoder: tokenizer, config derivation, key layouts, loading, prompt encoding.

References: transformers' CLIPTokenizer / CLIPTextModel at tiny configs with random weights
(eager attention, while our loaded models use the default implementation).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import unicodedata

import pytest
import regex
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffstudio.conditioning import (
    PACKAGED_CLIP_TOKENIZER,
    chunk_token_ids,
    encode_clip,
    load_clip_tokenizer,
    prompt_token_ids,
    tokenize_chunks,
)
from diffstudio.convert.clip import (
    build_clip_text_model,
    canonical_clip_keys,
    canonical_clip_keys_with_report,
    clip_from_openclip,
    load_clip_text_model,
    to_installed_transformers_layout,
)
from diffstudio.detect.clip import CLIP_SENTINELS, derive_clip_config
from diffstudio.errors import ConversionError, ModelNotFoundError, UnknownModelError

BOS, EOS = 49406, 49407
COMPARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id",
)  # fmt: skip


def tiny_config(hidden=32, heads=4, layers=3, act="quick_gelu", projection_dim=16) -> CLIPTextConfig:
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=37, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=projection_dim,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
    )  # fmt: skip
    config._attn_implementation = "eager"  # the reference computes attention differently from ours
    return config


def randomise_norms(model: torch.nn.Module) -> torch.nn.Module:
    """LayerNorms start at (1, 0); random affine parameters make the norm matter in the checks."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return model.eval()


def released_layout(sd: dict) -> dict:
    """The released HF layout: every encoder key under ``text_model.`` (transformers 4 / HF folders)."""
    return {
        k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()
    }


def same_fields(a: CLIPTextConfig, b: CLIPTextConfig) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in COMPARED_FIELDS)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def ref_model() -> CLIPTextModel:
    torch.manual_seed(1)
    return randomise_norms(CLIPTextModel(tiny_config()))


@pytest.fixture(scope="module")
def ref_proj_model() -> CLIPTextModelWithProjection:
    torch.manual_seed(2)
    return randomise_norms(CLIPTextModelWithProjection(tiny_config(act="gelu")))


@pytest.fixture(scope="module")
def our_model(ref_model) -> CLIPTextModel:
    sd = canonical_clip_keys(ref_model.state_dict())
    return load_clip_text_model(sd, derive_clip_config(sd, {"num_attention_heads": 4}))


# ------------------------------------------------------------------------------------ reference BPE


def _bytes_to_symbols() -> dict[int, str]:
    """CLIP's (and GPT-2's) byte -> printable symbol table, in vocabulary order: the printable Latin-1 bytes
    stand for themselves, then the other 68 bytes take the code points from 256 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _packaged_merges() -> list[tuple[str, str]]:
    lines = (PACKAGED_CLIP_TOKENIZER / "merges.txt").read_text(encoding="utf-8").splitlines()
    return [tuple(line.split()) for line in lines[1:] if line]  # line 0 is the "#version" header


def _packaged_vocab() -> dict[str, int]:
    return json.loads((PACKAGED_CLIP_TOKENIZER / "vocab.json").read_text(encoding="utf-8"))


def _clip_vocabulary(merges: list[tuple[str, str]]) -> list[str]:
    symbols = list(_bytes_to_symbols().values())
    return [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges),
            "<|startoftext|>", "<|endoftext|>"]


class ClipBpe:
    """CLIP's tokenizer, independent of transformers and tokenizers: ids from the vocabulary built from the
    merges, words from CLIP's pattern, each word's bytes merged pairwise, lowest merge rank first."""

    WORD = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                         r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def __init__(self, merges: list[tuple[str, str]]):
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.ids = {token: i for i, token in enumerate(_clip_vocabulary(merges))}
        self.symbols = _bytes_to_symbols()

    def _bpe(self, word: str) -> list[str]:
        parts = [self.symbols[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        text = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
        return [self.ids[piece] for word in self.WORD.findall(text) for piece in self._bpe(word)]


def words_prompt(n_tokens: int, rng: random.Random) -> str:
    vocab = ["red", "green", "blue", "cat", "dog", "house", "tree", "sky", "river", "photo", "light", "dark"]
    return " ".join(rng.choice(vocab) for _ in range(n_tokens))


# ------------------------------------------------------------------------------------ tokenizer


def test_known_token_ids(tokenizer):
    assert tokenize_chunks(tokenizer, "a photo of a cat")[0][:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    # "!" alone is "!</w>" (256); id 0 is the bare byte "!", SD 2.x's pad token
    assert prompt_token_ids(tokenizer, ["hello world", "!", "A PHOTO"]) == [[3306, 1002], [256], [320, 1125]]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, EOS)


def test_packaged_vocabulary_is_clips():
    """The released CLIP vocabulary: 256 byte symbols, the same with the end-of-word mark, one token per
    BPE merge in merge order (48 894 of them), then the two specials: 49 408 ids."""
    merges, vocab = _packaged_merges(), _packaged_vocab()
    assert len(merges) == 48894 and len(vocab) == 49408
    assert vocab == {token: i for i, token in enumerate(_clip_vocabulary(merges))}


def test_tokenizer_matches_reference_bpe(tokenizer):
    """Our tokenizer against CLIP's byte-level BPE written from its description (OpenAI's simple_tokenizer:
    NFC + whitespace folding + lower case, the word pattern, bytes -> symbols, lowest-rank merges first)."""
    reference = ClipBpe(_packaged_merges())
    rng = random.Random(0)
    pieces = [
        "a photo of a cat", "masterpiece", "(best quality:1.2)", "[dog|cat]", "Hello,  World!",
        "tab\tnew\nline", "café naïve Æsir", "日本語", "🐱🚀", "x1.5", "2024-01-01", "don't", "it's",
        "UPPER lower", "<lora:x:0.8>", "over-exposed", "8k uhd", "...", "#tag", "e=mc^2", "über", "ʕ•ᴥ•ʔ",
        "photorealistic", "bokeh,",
    ]  # fmt: skip
    strings = ["", " ", "a" * 200, words_prompt(120, rng)]
    for _ in range(300):
        strings.append(" ".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))))
    assert prompt_token_ids(tokenizer, strings) == [reference.encode(s) for s in strings]
    short = strings[:50]
    assert tokenizer(short).input_ids == [[BOS, *reference.encode(s), EOS] for s in short]


def test_tokenizer_from_folder_and_pad_override(tmp_path, tokenizer):
    shutil.copytree(PACKAGED_CLIP_TOKENIZER, tmp_path / "model" / "tokenizer")
    from_folder = load_clip_tokenizer(tmp_path / "model")  # a diffusers folder with tokenizer/
    assert prompt_token_ids(from_folder, ["a photo of a cat"]) == prompt_token_ids(
        tokenizer, ["a photo of a cat"]
    )
    assert load_clip_tokenizer() is tokenizer  # cached
    sd2 = load_clip_tokenizer(pad_token="!")  # SD 2.x convention
    assert tokenize_chunks(sd2, "a cat")[0][:6] == [BOS, 320, 2368, EOS, 0, 0]
    with pytest.raises(ModelNotFoundError):
        load_clip_tokenizer(tmp_path / "nothing-here")


# ------------------------------------------------------------------------------------ chunking


def test_chunking_wraps_and_pads():
    (empty,) = chunk_token_ids([], bos=BOS, eos=EOS, pad=7)
    assert empty == [BOS, EOS] + [7] * 75
    assert len(chunk_token_ids(list(range(75)), bos=BOS, eos=EOS, pad=7)) == 1
    chunks = chunk_token_ids(list(range(76)), bos=BOS, eos=EOS, pad=7)
    assert [len(c) for c in chunks] == [77, 77]
    assert chunks[0] == [BOS, *range(75), EOS]
    assert chunks[1] == [BOS, 75, EOS] + [7] * 74


def test_empty_prompt_is_one_chunk(tokenizer):
    assert tokenize_chunks(tokenizer, "") == [[BOS, EOS] + [EOS] * 75]


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("layout", ["installed", "released"])
def test_derive_config_from_shapes(layout):
    config = tiny_config(hidden=64, heads=1, layers=2)  # head width 64: no hints needed
    sd = build_clip_text_model(config, device="meta").state_dict()
    sd = released_layout(sd) if layout == "released" else sd
    derived = derive_clip_config(canonical_clip_keys(sd))
    assert same_fields(derived, config), (derived, config)


def test_derive_config_tiny_width_needs_head_hint(ref_proj_model):
    sd = canonical_clip_keys(ref_proj_model.state_dict())
    with pytest.raises(UnknownModelError, match="num_attention_heads"):
        derive_clip_config(sd)
    derived = derive_clip_config(sd, {"num_attention_heads": 4, "hidden_act": "gelu"})
    config = ref_proj_model.config
    assert same_fields(derived, config), (derived, config)
    assert derived.projection_dim == 16
    with pytest.raises(ValueError, match="hidden_size"):
        derive_clip_config(sd, {"hidden_size": 8})  # shapes decide that, not hints


def test_build_respects_ambient_meta_device():
    with torch.device("meta"):  # how the loader builds modules before assigning weights
        model = build_clip_text_model(tiny_config(), with_projection=True)
    assert model.text_projection.weight.is_meta


@pytest.mark.parametrize(
    "width, layers, mlp, heads, projection",
    [(768, 12, 3072, 12, None), (1024, 23, 4096, 16, None), (1280, 32, 5120, 20, 1280)],
    ids=["clip-l (SD1.x)", "vit-h (SD2.x, 23 layers kept)", "bigG (SDXL)"],
)
def test_derive_config_real_widths(width, layers, mlp, heads, projection):
    config = CLIPTextConfig(
        hidden_size=width, num_hidden_layers=layers, intermediate_size=mlp, num_attention_heads=heads,
        projection_dim=projection or 512,
    )  # fmt: skip
    sd = build_clip_text_model(config, with_projection=projection is not None, device="meta").state_dict()
    derived = derive_clip_config(canonical_clip_keys(sd))
    assert (derived.hidden_size, derived.num_attention_heads, derived.num_hidden_layers) == (
        width,
        heads,
        layers,
    )
    assert derived.intermediate_size == mlp and derived.vocab_size == 49408
    if projection:
        assert derived.projection_dim == projection


# ------------------------------------------------------------------------------------ layouts and loading


def reference_output(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True)


@pytest.mark.parametrize(
    "prefix", ["", "text_model.", "transformer.text_model.", "cond_stage_model.transformer.text_model."]
)
def test_load_parity_from_every_hf_layout(ref_model, tokenizer, prefix):
    sd = {k.removeprefix("text_model."): v for k, v in released_layout(ref_model.state_dict()).items()}
    sd = {prefix + k: v for k, v in sd.items()}
    sd[prefix + "embeddings.position_ids"] = torch.arange(77)[None]  # a non-weight in released files
    canonical, dropped = canonical_clip_keys_with_report(sd)
    assert dropped == [prefix + "embeddings.position_ids"]
    assert all(k in canonical for k in CLIP_SENTINELS)
    model = load_clip_text_model(sd, derive_clip_config(canonical, {"num_attention_heads": 4}))
    ids = torch.tensor(tokenize_chunks(tokenizer, "a photo of a cat"))
    with torch.no_grad():
        ours = model(input_ids=ids).last_hidden_state
    assert rel_err(ours, reference_output(ref_model, ids).last_hidden_state) < 1e-4


def test_installed_layout_matches_model_keys(ref_model, ref_proj_model):
    for model in (ref_model, ref_proj_model):
        canonical = canonical_clip_keys(model.state_dict())
        assert set(to_installed_transformers_layout(canonical, model)) == set(model.state_dict())


def test_strict_load_names_problems(ref_model):
    sd = canonical_clip_keys(ref_model.state_dict())
    config = derive_clip_config(sd, {"num_attention_heads": 4})
    missing = {k: v for k, v in sd.items() if "final_layer_norm.bias" not in k}
    with pytest.raises(ConversionError, match="final_layer_norm.bias"):
        load_clip_text_model(missing, config)
    with pytest.raises(ConversionError, match="unexpected"):
        load_clip_text_model({**sd, "text_model.encoder.layers.9.mlp.fc1.weight": torch.zeros(1)}, config)
    wrong = CLIPTextConfig(**{**config.to_dict(), "intermediate_size": 40})
    with pytest.raises(ConversionError, match="shape mismatch"):
        load_clip_text_model(sd, wrong)
    with pytest.raises(ConversionError, match="model.diffusion_model"):
        canonical_clip_keys({**sd, "model.diffusion_model.out.0.weight": torch.zeros(1)})


def test_load_dtype(ref_model, tokenizer):
    sd = canonical_clip_keys(ref_model.state_dict())
    model = load_clip_text_model(sd, derive_clip_config(sd, {"num_attention_heads": 4}), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        hidden, pooled = encode_clip(model, tokenizer, ["a cat"], pooled=True)
    assert hidden.dtype == pooled.dtype == torch.bfloat16
    assert rel_err(hidden, encode_clip(ref_model, tokenizer, ["a cat"])[0].detach()) < 2e-2


# ------------------------------------------------------------------------------------ encoding


def test_encode_and_clip_skip_match_reference(our_model, ref_model, tokenizer):
    ids = torch.tensor(tokenize_chunks(tokenizer, "a photo of a cat"))
    ref = reference_output(ref_model, ids)
    with torch.no_grad():
        last, pooled = encode_clip(our_model, tokenizer, ["a photo of a cat"], pooled=True)
        skip2, _ = encode_clip(our_model, tokenizer, ["a photo of a cat"], clip_skip=2)
        raw2, _ = encode_clip(
            our_model, tokenizer, ["a photo of a cat"], clip_skip=2, layer_norm_on_skip=False
        )
        normed = ref_model.final_layer_norm(ref.hidden_states[-2])
    assert rel_err(last, ref.last_hidden_state) < 1e-4
    assert rel_err(pooled, ref.pooler_output) < 1e-4
    assert rel_err(skip2, normed) < 1e-4
    assert rel_err(raw2, ref.hidden_states[-2]) < 1e-4
    assert rel_err(skip2, last) > 1e-2  # skipping a layer changes the result
    with pytest.raises(ValueError, match="clip_skip"):
        encode_clip(our_model, tokenizer, ["x"], clip_skip=4)


def test_long_prompt_second_chunk_sees_late_tokens(our_model, ref_model, tokenizer):
    rng = random.Random(3)
    prompt = words_prompt(150, rng)
    ids = prompt_token_ids(tokenizer, [prompt])[0]
    assert len(ids) == 150
    changed = prompt.rsplit(" ", 1)[0] + " " + ("cat" if not prompt.endswith(" cat") else "dog")
    with torch.no_grad():
        hidden, _ = encode_clip(our_model, tokenizer, [prompt])
        hidden_changed, _ = encode_clip(our_model, tokenizer, [changed])
        first_alone = ref_model(input_ids=torch.tensor([[BOS, *ids[:75], EOS]])).last_hidden_state
    assert hidden.shape == (1, 154, 32)
    assert rel_err(hidden[:, :77], first_alone) < 1e-4
    assert torch.equal(hidden[:, :77], hidden_changed[:, :77])  # first chunk: only its own tokens
    assert not torch.allclose(hidden[:, 77:], hidden_changed[:, 77:])


def test_batch_with_different_lengths_pads_with_empty_chunks(our_model, ref_model, tokenizer):
    rng = random.Random(4)
    long_prompt = words_prompt(100, rng)
    with torch.no_grad():
        hidden, pooled = encode_clip(our_model, tokenizer, ["a red cat", long_prompt], pooled=True)
        short_ref = ref_model(input_ids=torch.tensor(tokenize_chunks(tokenizer, "a red cat")))
        empty_ref = ref_model(input_ids=torch.tensor(tokenize_chunks(tokenizer, ""))).last_hidden_state
        long_alone, long_pooled = encode_clip(our_model, tokenizer, [long_prompt], pooled=True)
    assert hidden.shape == (2, 154, 32) and pooled.shape == (2, 32)
    assert rel_err(hidden[0, :77], short_ref.last_hidden_state[0]) < 1e-4
    assert rel_err(hidden[0, 77:], empty_ref[0]) < 1e-4
    assert rel_err(pooled[0], short_ref.pooler_output[0]) < 1e-4  # pooled: the first chunk's EOS
    assert rel_err(hidden[1], long_alone[0]) < 1e-4 and rel_err(pooled[1], long_pooled[0]) < 1e-4


# ------------------------------------------------------------------------------------ OpenCLIP


BLOCK_NAMES = [  # (HF, open_clip) names inside one transformer block
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
]


def to_openclip_by_hand(model: CLIPTextModelWithProjection, prefix: str) -> dict:
    """The inverse of clip_from_openclip, written independently: HF -> open_clip text tower names."""
    sd = canonical_clip_keys(model.state_dict())
    t = "text_model."
    out = {
        "token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],
        "positional_embedding": sd[t + "embeddings.position_embedding.weight"],
        "ln_final.weight": sd[t + "final_layer_norm.weight"],
        "ln_final.bias": sd[t + "final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T.contiguous(),  # open_clip: x @ W, W is (C, P)
        "logit_scale": torch.tensor(4.6052),
    }
    for i in range(model.config.num_hidden_layers):
        hf, oc = f"{t}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[oc + f"attn.in_proj_{kind}"] = torch.cat(
                [sd[hf + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0
            )
            for hf_name, oc_name in BLOCK_NAMES:
                out[oc + f"{oc_name}.{kind}"] = sd[hf + f"{hf_name}.{kind}"]
    return {prefix + k: v for k, v in out.items()}


def test_openclip_layout_converts_and_matches(ref_proj_model, tokenizer):
    prefix = "conditioner.embedders.1.model."
    openclip_sd = to_openclip_by_hand(ref_proj_model, prefix)
    canonical = clip_from_openclip(openclip_sd)
    assert set(canonical) == set(canonical_clip_keys(ref_proj_model.state_dict()))
    auto, dropped = canonical_clip_keys_with_report(openclip_sd)  # the layout is recognised by itself
    assert dropped == [prefix + "logit_scale"] and set(auto) == set(canonical)

    config = derive_clip_config(canonical, {"num_attention_heads": 4, "hidden_act": "gelu"})
    model = load_clip_text_model(canonical, config)
    assert isinstance(model, CLIPTextModelWithProjection)
    ids = torch.tensor(tokenize_chunks(tokenizer, "a photo of a dog"))
    ref = reference_output(ref_proj_model, ids)
    with torch.no_grad():
        hidden, pooled = encode_clip(model, tokenizer, ["a photo of a dog"], clip_skip=2,
                                     layer_norm_on_skip=False, pooled=True)  # SDXL's convention  # fmt: skip
    assert rel_err(hidden, ref.hidden_states[-2]) < 1e-4
    assert rel_err(pooled, ref.text_embeds) < 1e-4
    assert pooled.shape == (1, 16)
