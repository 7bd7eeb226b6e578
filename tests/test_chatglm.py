"""ChatGLM (Kolors' text encoder) and its tokenizer against diffusers' Kolors reference classes:
hidden states at a tiny random config (with left padding), the key layouts, configs derived from
shapes, the full-size ChatGLM3-6B key set on the meta device, and token-for-token tokenization."""

from __future__ import annotations

import pytest
import torch

from diffstudio.components import ARCHS
from diffstudio.conditioning.chatglm_tokenizer import load_chatglm_tokenizer
from diffstudio.conditioning.tokenizers import PACKAGED, load_tokenizer
from diffstudio.convert.chatglm import canonical_chatglm_keys
from diffstudio.detect.chatglm import config_from_json, derive_chatglm_config
from diffstudio.errors import ConversionError, ModelNotFoundError, UnknownModelError
from diffstudio.models.chatglm import ChatGLMConfig, ChatGLMEncoder
from diffstudio.release_configs import CHATGLM3_6B
from tests.tiny_kolors import reference_chatglm, reference_tokenizer

TOL = 1e-4
PROMPTS = ["a cat", "一只可爱的小猫，高清，写实", "", "  leading and trailing spaces  ", "tabs\tand\nnew lines\n",
           "emoji 🐱🎨 ünïcödé façade", '一张瓢虫的照片，微距，变焦，高质量，电影，拿着一个牌子，写着"可图"',
           "<|user|> [gMASK] sop </s> <unk> typed as text", "中英 mixed 文本 123 4.56 %$#@!",
           "ＦＵＬＬ－ＷＩＤＴＨ　ｔｅｘｔ",
           "word " * 300, "长" * 400]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def pair():
    ref = reference_chatglm(seed=3)
    config = config_from_json(ref.config.to_dict())
    ours = ChatGLMEncoder(config).eval()
    ours.load_state_dict(canonical_chatglm_keys(ref.state_dict()))
    return ref, ours


def test_hidden_states_match_reference_with_left_padding(pair):
    ref, ours = pair
    tokens = load_chatglm_tokenizer(PACKAGED / "chatglm")(["a cat on a mat", "一只猫", "x " * 40], max_length=48)
    assert not tokens["attention_mask"].all()  # padding is exercised
    with torch.no_grad():
        expected = ref(**tokens, output_hidden_states=True)
        got = ours(tokens["input_ids"], tokens["attention_mask"], tokens["position_ids"])
    assert len(got.hidden_states) == len(expected.hidden_states) == 3
    for mine, theirs in zip(got.hidden_states, expected.hidden_states):
        assert rel_err(mine, theirs.permute(1, 0, 2)) < TOL  # the reference is sequence-first
    assert rel_err(got.last_hidden_state, expected.last_hidden_state.permute(1, 0, 2)) < TOL


def test_no_mask_is_plain_causal_attention(pair):
    ref, ours = pair
    ids = torch.randint(0, 64798, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(input_ids=ids, output_hidden_states=True).hidden_states[-1].permute(1, 0, 2)
        assert rel_err(ours(ids).hidden_states[-1], expected) < TOL
        # The mask matters: padding the first row changes its padded *and* real positions' outputs.
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        assert rel_err(ours(ids, mask).hidden_states[-1], expected) > 1e-2


def test_bfloat16_runs_close_to_float32(pair):
    _, ours = pair
    ids = torch.randint(0, 64798, (1, 9), generator=torch.Generator().manual_seed(2))
    low = ChatGLMEncoder(ours.config).eval()
    low.load_state_dict(ours.state_dict())
    low.to(torch.bfloat16)
    with torch.no_grad():
        out = low(ids).hidden_states[-2]
        assert out.dtype == torch.bfloat16
        assert rel_err(out.float(), ours(ids).hidden_states[-2]) < 3e-2


def test_released_and_bare_layouts_give_the_same_canonical_keys(pair):
    ref, ours = pair
    bare = ref.state_dict()  # ChatGLMModel's own names: no `transformer.` level, LM head included
    released = {"transformer." + k: v for k, v in bare.items()}
    released["transformer.rotary_pos_emb.inv_freq"] = ref.rotary_pos_emb.inv_freq
    canon = canonical_chatglm_keys(bare)
    assert canon.keys() == canonical_chatglm_keys(released).keys() == ours.state_dict().keys()
    assert not any("output_layer" in k or "inv_freq" in k for k in canon)
    arch = ARCHS["chatglm"]
    assert arch.is_diffusers(bare) and arch.is_canonical(released)
    assert arch.to_canonical(released).keys() == canon.keys()  # normalised in every layout
    with pytest.raises(ConversionError, match="lm_head"):
        canonical_chatglm_keys({**released, "transformer.lm_head.weight": torch.zeros(2, 2)})


def test_config_from_shapes_equals_config_json(pair):
    ref, ours = pair
    canon = canonical_chatglm_keys(ref.state_dict())
    assert derive_chatglm_config(canon, {"kv_channels": ref.config.kv_channels}) == ours.config
    # Without the hint, ChatGLM's 128-wide heads are assumed; this tiny model's widths do not split into them.
    with pytest.raises(UnknownModelError, match="kv_channels"):
        derive_chatglm_config(canon)
    assert ChatGLMConfig.from_dict(ours.config.to_dict()) == ours.config
    with pytest.raises(ConversionError, match="rmsnorm"):
        config_from_json({**ref.config.to_dict(), "rmsnorm": False})


def test_full_size_chatglm3_on_meta():
    """ChatGLM3-6B's 200 released tensors map onto ours (minus the unused head and buffer), shapes equal,
    and the config derived from shapes alone is ChatGLM3-6B's."""
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig as RefConfig
    from diffusers.pipelines.kolors.text_encoder import ChatGLMModel

    with torch.device("meta"):
        ref = ChatGLMModel(RefConfig(**CHATGLM3_6B), empty_init=False)
    released = {"transformer." + k: v for k, v in ref.state_dict().items()}
    assert len(released) == 200  # the count in the released index's metadata
    canon = canonical_chatglm_keys(released)
    config = derive_chatglm_config(canon, {"kv_channels": 128})
    assert config == derive_chatglm_config(canon) == config_from_json(CHATGLM3_6B) == ChatGLMConfig()
    assert (config.num_heads, config.kv_groups, config.qkv_size) == (32, 2, 4608)
    with torch.device("meta"):
        ours = ChatGLMEncoder(config)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in canon.items()}
    params = sum(v.numel() for v in ours.state_dict().values())
    assert 5.9e9 < params < 6.0e9  # 6.24 B with the 0.27 B head we drop


def test_tokenizer_matches_reference_token_for_token():
    ref = reference_tokenizer()
    ours = load_tokenizer("chatglm")
    expected = ref(PROMPTS, padding="max_length", max_length=256, truncation=True, return_tensors="pt")
    got = ours(PROMPTS)
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert torch.equal(got[key], expected[key]), key
    assert got["input_ids"].shape == (len(PROMPTS), 256)
    # Left padding, the [gMASK] sop prefix, truncation on the right.
    assert got["input_ids"][0, -4:].tolist()[:2] == [ours.special_ids["[gMASK]"], ours.special_ids["sop"]]
    assert got["input_ids"][2, -2:].tolist() == [64790, 64792] and got["attention_mask"][2].sum() == 2
    assert got["attention_mask"][-1].all() and got["input_ids"][-1, 3:].eq(got["input_ids"][-1, 3]).all()
    assert ours.vocab_size == ref.vocab_size == 64798


def test_tokenizer_padding_longest_decode_and_missing_folder(tmp_path):
    tok = load_tokenizer("chatglm")
    out = tok(["一只猫", "a much longer prompt than the other"], padding="longest")
    assert out["input_ids"].shape[1] == len(tok.encode("a much longer prompt than the other"))
    assert out["position_ids"][0].tolist()[-3:] == [out["attention_mask"][0].sum().item() - 3 + i for i in range(3)]
    assert tok.decode(tok("一只猫 cat")["input_ids"][0]) == "[gMASK]sop一只猫 cat"
    assert load_tokenizer("chatglm", tmp_path) is tok  # no tokenizer.model there: the packaged one (cached)
    with pytest.raises(ModelNotFoundError, match="tokenizer.model"):
        load_chatglm_tokenizer(tmp_path)
