"""ChatGLM3-6B as a text encoder (the prompt encoder of Kolors).

References:
  * Du et al. 2022, "GLM: General Language Model Pretraining with Autoregressive Blank Infilling"
    (arXiv:2103.10360): the [gMASK] / sop prefix of every ChatGLM input, and 2-D positions (which
    ChatGLM2/3 replaced by ordinary 1-D rotary positions).
  * Team GLM 2024, "ChatGLM: A Family of Large Language Models from GLM-130B to GLM-4 All Tools"
    (arXiv:2406.12793), sec. 2: ChatGLM2/3 are decoder-only pre-norm transformers with RMSNorm,
    multi-query attention (2 key/value groups), rotary embeddings and a SwiGLU MLP.
  * Su et al. 2021, "RoFormer" (arXiv:2104.09864), eq. 34: rotary position embedding. ChatGLM rotates
    only the first half of each head's dimensions, in interleaved pairs (x[2i], x[2i+1]).
  * Shazeer 2020, "GLU Variants Improve Transformer" (arXiv:2002.05202): SwiGLU.
  * Zhang & Sennrich 2019, "Root Mean Square Layer Normalization" (arXiv:1910.07467): RMSNorm.
  * Kolors technical report (Kwai-Kolors 2024), sec. 2: Kolors conditions on ChatGLM3's penultimate
    hidden states (256 tokens) and on the last block's output at the final token (the pooled vector).

Parameter names are the released checkpoint's (Kwai-Kolors/Kolors ``text_encoder``, the names of
THUDM/chatglm3-6b-base): ``transformer.embedding.word_embeddings.weight``,
``transformer.encoder.layers.N.{input_layernorm, self_attention.query_key_value, self_attention.dense,
post_attention_layernorm, mlp.dense_h_to_4h, mlp.dense_4h_to_h}``, ``transformer.encoder.final_layernorm``.
The language-model head (``transformer.output_layer``, 0.27 B parameters) and the rotary buffer
(``transformer.rotary_pos_emb.inv_freq``) are not part of this module: Kolors never reads the head,
and the rotary frequencies are recomputed (diffstudio.convert.chatglm drops both).

Shapes: input_ids (B, S); hidden states (B, S, hidden) (batch first; the reference runs sequence
first, which changes no number).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from diffstudio.models.layers import attention


@dataclass
class ChatGLMConfig:
    """Constructor arguments of `ChatGLMEncoder` (ChatGLM3-6B's values as defaults).

    ``kv_channels`` is the width of one attention head; the query has ``num_heads`` heads and the
    keys/values ``kv_groups`` heads (multi-query attention), each head of queries using the
    key/value group ``head // (num_heads // kv_groups)``.
    """

    vocab_size: int = 65024  # padded_vocab_size: 64,789 SentencePiece pieces + 9 specials, padded
    hidden_size: int = 4096
    num_layers: int = 28
    num_heads: int = 32
    kv_channels: int = 128
    kv_groups: int = 2  # multi_query_group_num
    ffn_hidden_size: int = 13696
    layernorm_eps: float = 1e-5
    qkv_bias: bool = True  # add_qkv_bias (the other linear layers have no bias)
    rope_base: float = 10000.0  # 10000 * rope_ratio (1 for ChatGLM3-6B / Kolors)

    def __post_init__(self) -> None:
        if self.num_heads % self.kv_groups:
            raise ValueError(f"ChatGLMConfig: {self.num_heads} query heads do not split into "
                             f"{self.kv_groups} key/value groups")
        if self.kv_channels % 4:
            raise ValueError(f"ChatGLMConfig: kv_channels {self.kv_channels} must be a multiple of 4 (the rotary "
                             "half of each head rotates in pairs)")

    @property
    def projection_size(self) -> int:
        """Width of all query heads together (ChatGLM3-6B: 32 x 128 = 4096)."""
        return self.num_heads * self.kv_channels

    @property
    def qkv_size(self) -> int:
        """Output width of ``query_key_value``: queries, then the keys and values of every group."""
        return self.projection_size + 2 * self.kv_groups * self.kv_channels

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ChatGLMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"ChatGLMConfig: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


@dataclass
class ChatGLMOutput:
    """``hidden_states``: the embeddings, then the output of every block (num_layers + 1 tensors,
    the last one *before* the final RMSNorm, as the reference returns them); ``last_hidden_state``:
    the last block's output after the final RMSNorm. All (B, S, hidden)."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g, computed in float32 and returned in the input's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def rotary_tables(position_ids: torch.Tensor, rot_dim: int, base: float, dtype: torch.dtype):
    """cos, sin of the angles position * theta_i, theta_i = base^(-2i / rot_dim), i < rot_dim / 2.

    position_ids (B, S) -> cos, sin (B, S, rot_dim / 2). Angles are computed in float32; the tables
    are then rounded to the activations' dtype, as the release does in half precision.
    """
    theta = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=position_ids.device) / rot_dim))
    angles = position_ids.float()[..., None] * theta                              # (B, S, rot_dim/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of each head in pairs (x[2i], x[2i+1]).

    x (B, S, heads, d); cos/sin (B, S, r) with 2r <= d. The other d - 2r dims pass unchanged
    (ChatGLM rotates half of every head: r = d / 4).
    """
    r = cos.shape[-1]
    rot, rest = x[..., : 2 * r], x[..., 2 * r:]
    pairs = rot.unflatten(-1, (r, 2))                                             # (B, S, heads, r, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, :, None], sin[:, :, None]                                   # broadcast over heads
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, rest), dim=-1)


def glm_attention_mask(padding_mask: torch.Tensor | None, seq_len: int, device) -> torch.Tensor:
    """The boolean (True = attend) mask of the released ChatGLM code, shape (B or 1, 1, S, S).

    Causal over the real tokens: a real query attends to real keys at or before it. A padding
    query (mask 0) attends to *every* position. The release builds it this way (its ``get_masks``:
    causal * key-mask, then rows of padding queries filled), and Kolors' left-padded prompts
    depend on it: the padding positions' hidden states are part of the context the UNet reads.
    """
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    if padding_mask is None:
        return causal[None, None]
    real = padding_mask.to(device=device).bool()                                  # (B, S)
    allowed = causal[None] & real[:, None, :]                                     # keys must be real
    allowed = allowed | ~real[:, :, None]                                         # padding queries see all
    return allowed[:, None]


class SelfAttention(nn.Module):
    """Multi-query attention with rotary positions (one fused projection for q, k, v)."""

    def __init__(self, c: ChatGLMConfig):
        super().__init__()
        self.c = c
        self.query_key_value = nn.Linear(c.hidden_size, c.qkv_size, bias=c.qkv_bias)
        self.dense = nn.Linear(c.projection_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        c = self.c
        b, s, _ = x.shape
        d, g = c.kv_channels, c.kv_groups
        qkv = self.query_key_value(x)                                             # (B, S, heads*d + 2*g*d)
        q, k, v = qkv.split((c.projection_size, g * d, g * d), dim=-1)
        q = apply_rotary(q.view(b, s, c.num_heads, d), cos, sin)
        k = apply_rotary(k.view(b, s, g, d), cos, sin)
        v = v.view(b, s, g, d)
        # Each key/value group serves num_heads / g consecutive query heads.
        per_group = c.num_heads // g
        k = k.repeat_interleave(per_group, dim=2)                                 # (B, S, heads, d)
        v = v.repeat_interleave(per_group, dim=2)
        out = attention(q.flatten(2), k.flatten(2), v.flatten(2), c.num_heads, mask)  # (B, S, heads*d)
        return self.dense(out)


class MLP(nn.Module):
    """SwiGLU: dense_h_to_4h gives [a, b] (each ffn wide); out = dense_4h_to_h(silu(a) * b)."""

    def __init__(self, c: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(c.hidden_size, 2 * c.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(c.ffn_hidden_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(a) * b)


class GLMBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, c: ChatGLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.layernorm_eps)
        self.self_attention = SelfAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.layernorm_eps)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), mask, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Embedding(nn.Module):
    def __init__(self, c: ChatGLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)


class _Encoder(nn.Module):
    def __init__(self, c: ChatGLMConfig):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(c) for _ in range(c.num_layers))
        self.final_layernorm = RMSNorm(c.hidden_size, c.layernorm_eps)


class _Transformer(nn.Module):
    """The ``transformer.`` level of the released checkpoint."""

    def __init__(self, c: ChatGLMConfig):
        super().__init__()
        self.embedding = _Embedding(c)
        self.encoder = _Encoder(c)


class ChatGLMEncoder(nn.Module):
    """``forward(input_ids, attention_mask=None, position_ids=None) -> ChatGLMOutput``.

    ``attention_mask`` (B, S) is 1 for tokens and 0 for padding; ``position_ids`` (B, S) index the
    rotary table (the ChatGLM tokenizer gives 0 to left padding and 0, 1, ... to the tokens).
    Without them: no padding, positions 0..S-1.
    """

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.config = config
        self.transformer = _Transformer(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.embedding.word_embeddings.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> ChatGLMOutput:
        c = self.config
        b, s = input_ids.shape
        device = self.transformer.embedding.word_embeddings.weight.device
        input_ids = input_ids.to(device)
        if position_ids is None:
            position_ids = torch.arange(s, device=device).expand(b, s)
        if attention_mask is not None and bool(attention_mask.bool().all()):
            attention_mask = None  # nothing padded: plain causal attention
        mask = glm_attention_mask(attention_mask, s, device)                      # (B or 1, 1, S, S)
        h = self.transformer.embedding.word_embeddings(input_ids)                 # (B, S, hidden)
        # Rotary over half of each head (kv_channels / 2 dims, i.e. kv_channels / 4 frequencies).
        cos, sin = rotary_tables(position_ids.to(device), c.kv_channels // 2, c.rope_base, h.dtype)
        hidden_states = [h]
        for layer in self.transformer.encoder.layers:
            h = layer(h, mask, cos, sin)
            hidden_states.append(h)
        return ChatGLMOutput(self.transformer.encoder.final_layernorm(h), tuple(hidden_states))

