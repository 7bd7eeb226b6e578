"""The t5_encoder component: parity with transformers' T5EncoderModel through our arch path (derive the
config from shapes, build on meta, load like the loader does), the layouts we read, fp16 handling,
prompt encoding, and the full-size T5-XXL / mT5-XL layouts on the meta device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

from diffstudio.components import ARCHS
from diffstudio.conditioning.t5_encode import encode_t5, tokenize_t5
from diffstudio.conditioning.tokenizers import load_tokenizer
from diffstudio.convert.t5 import canonical_t5_keys
from diffstudio.detect.t5 import derive_t5_config
from diffstudio.errors import ConversionError, UnknownModelError
from diffstudio.loader import build_component

TINY = dict(vocab_size=32128, d_model=48, d_kv=16, num_heads=3, d_ff=40, num_layers=2, is_encoder_decoder=False,
            use_cache=False, decoder_start_token_id=0)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
              feed_forward_proj="gated-gelu")  # google/t5-v1_1-xxl (SD3's and FLUX's text_encoder_3 / _2)
MT5_XL = dict(vocab_size=250112, d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24,
              feed_forward_proj="gated-gelu")  # google/mt5-xl (Hunyuan-DiT's text_encoder_2)


def reference(feed_forward_proj: str, seed: int = 0) -> T5EncoderModel:
    model = T5EncoderModel(T5Config(**TINY, feed_forward_proj=feed_forward_proj)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim == 1 else 0.3))
    return model


def ours(sd: dict, dtype=torch.float32):
    """The loader's path: derive the config from shapes, build on meta, assign the weights."""
    arch = ARCHS["t5_encoder"]
    canonical = arch.to_canonical(sd)
    config = arch.derive_config(canonical, {})
    return build_component("text_encoder_3", "t5_encoder", SimpleNamespace(state_dict=canonical, config=config,
                                                                          source="test"), dtype, "cpu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("ff", ["gated-gelu", "relu"])  # T5 v1.1 / mT5, and T5 v1.0
def test_parity_with_transformers(ff):
    ref = reference(ff)
    model = ours(ref.state_dict())
    assert model.config.feed_forward_proj == ff and model.config.num_heads == 3 and model.config.d_kv == 16
    tokenizer = load_tokenizer("t5")
    prompts = ["a red circle on a blue square", "hello"]
    ids, mask = tokenize_t5(tokenizer, prompts, 16)
    with torch.no_grad():
        for attention_mask in (None, mask):
            expected = ref(input_ids=ids, attention_mask=attention_mask).last_hidden_state
            got = model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
            assert rel_err(got, expected) < 1e-4
        hidden, token_mask = encode_t5(model, tokenizer, prompts, max_length=16, use_attention_mask=True)
    assert rel_err(hidden, ref(input_ids=ids, attention_mask=mask).last_hidden_state) < 1e-4
    assert token_mask.dtype == torch.bool and token_mask.tolist() == mask.bool().tolist()


def test_tokenization_pads_to_max_length_with_eos():
    tokenizer = load_tokenizer("t5")
    ids, mask = tokenize_t5(tokenizer, ["a cat", "word " * 40], 12)
    assert ids.shape == (2, 12)
    n = int(mask[0].sum())
    assert ids[0, n - 1] == tokenizer.eos_token_id and (ids[0, n:] == tokenizer.pad_token_id).all()
    assert mask[1].all() and ids[1, -1] == tokenizer.eos_token_id  # truncated, still EOS-terminated


def test_layouts_are_normalised():
    ref = reference("gated-gelu")
    sd = ref.state_dict()
    assert "encoder.embed_tokens.weight" in sd  # transformers writes the tied embedding under both names
    canonical = canonical_t5_keys(sd)
    assert "encoder.embed_tokens.weight" not in canonical and canonical["shared.weight"] is sd["shared.weight"]
    only_embed = {k: v for k, v in sd.items() if k != "shared.weight"}
    assert canonical_t5_keys(only_embed).keys() == canonical.keys()
    # A whole encoder-decoder checkpoint: the decoder and LM head are dropped.
    full = T5ForConditionalGeneration(T5Config(**{**TINY, "is_encoder_decoder": True}, feed_forward_proj="gated-gelu"))
    kept = canonical_t5_keys(full.state_dict())
    assert not any(k.startswith(("decoder.", "lm_head.")) for k in kept) and "shared.weight" in kept
    with pytest.raises(ConversionError, match="not part of a T5 encoder"):
        canonical_t5_keys({**canonical, "text_model.final_layer_norm.weight": torch.ones(3)})


def test_built_model_is_canonical_and_tied_after_an_assign_load():
    ref = reference("gated-gelu")
    for sd in (canonical_t5_keys(ref.state_dict()),
               {k: v for k, v in ref.state_dict().items() if k != "shared.weight"}):  # embed_tokens only
        model = ours(sd)
        assert model.encoder.embed_tokens.weight is model.shared.weight
        assert not model.shared.weight.is_meta
        assert set(model.state_dict()) == set(canonical_t5_keys(ref.state_dict()))
        # ... and its own state dict loads back strictly.
        model.load_state_dict(model.state_dict(), strict=True)


def test_float16_keeps_the_feed_forward_output_in_float32():
    ref = reference("gated-gelu")
    model = ours(ref.state_dict(), dtype=torch.float16)
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == torch.float32 and model.shared.weight.dtype == torch.float16
    ids, _ = tokenize_t5(load_tokenizer("t5"), ["a red circle"], 8)
    with torch.no_grad():
        got = model(input_ids=ids).last_hidden_state
        expected = ref(input_ids=ids).last_hidden_state
    assert torch.isfinite(got).all() and rel_err(got, expected) < 2e-2


def test_derive_rejects_what_it_does_not_know():
    sd = canonical_t5_keys(reference("gated-gelu").state_dict())
    with pytest.raises(ValueError, match="not allowed"):
        derive_t5_config(sd, {"num_heads": 4})
    umt5 = {**sd, "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight": torch.zeros(32, 3)}
    with pytest.raises(UnknownModelError, match="UMT5"):
        derive_t5_config(umt5)
    with pytest.raises(UnknownModelError, match="does not match"):
        derive_t5_config(sd, {"feed_forward_proj": "relu"})
    with pytest.raises(UnknownModelError, match="not a T5 encoder"):
        derive_t5_config({k: v for k, v in sd.items() if k != "encoder.final_layer_norm.weight"})


@pytest.mark.parametrize("fields", [T5_XXL, MT5_XL], ids=["t5-v1_1-xxl", "mt5-xl"])
def test_full_size_layout_on_meta(fields):
    with torch.device("meta"):
        ref = T5EncoderModel(T5Config(**fields, is_encoder_decoder=False))
    arch = ARCHS["t5_encoder"]
    canonical = arch.to_canonical(ref.state_dict())
    config = arch.derive_config(canonical, {})
    for name, value in fields.items():
        assert getattr(config, name) == value, name
    assert config.dense_act_fn == "gelu_new" and config.is_gated_act
    with torch.device("meta"):
        built = arch.build(config)
    expected = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    assert expected == {k: tuple(v.shape) for k, v in canonical.items()}
    # The config survives the metadata round trip that saved files use.
    assert arch.config_from_dict(arch.config_to_dict(config)).to_dict() == config.to_dict()
