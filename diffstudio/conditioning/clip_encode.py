"""Prompt -> CLIP token chunks -> text-encoder context, with long prompts and clip skip.

CLIP's text encoder sees at most 77 positions: <|startoftext|>, 75 tokens, <|endoftext|>.
Longer prompts follow the convention of the AUTOMATIC1111 web UI, which most shared prompts
were written for:

* the prompt's tokens are cut into chunks of 75; each chunk is wrapped as
  ``[BOS] + chunk + [EOS]`` and padded to 77 with the tokenizer's pad token (SD 1.x: EOS;
  SD 2.x's OpenCLIP tokenizer: "!", id 0). An empty prompt is one chunk ``[BOS, EOS, pad...]``;
* every chunk is encoded on its own (positions restart at 0 in each) and the encodings are
  concatenated along the token axis: n chunks give a context of 77·n tokens, which cross-
  attention in the UNet accepts at any length;
* prompts of one batch with different chunk counts are padded with the encoding of the empty
  chunk so that the batch has one shape (what A1111 does; the negative prompt of a CFG batch
  therefore gets extra empty chunks when the positive prompt is longer, and vice versa).

Clip skip (A1111 semantics): ``clip_skip=1`` is the encoder's last layer with its final layer
norm, i.e. the model's ``last_hidden_state``; ``clip_skip=k`` takes the output of the k-th block
from the end, ``hidden_states[-k]``, and, when ``layer_norm_on_skip`` (the SD 1.x convention),
passes it through the model's ``final_layer_norm``. SDXL and SD3 read the penultimate layer
*without* the final norm: their family records pass ``clip_skip=2, layer_norm_on_skip=False``.

The pooled embedding (for SDXL's size/pooled conditioning and SD3/FLUX's vector input) is the
model's own: the final-layer feature at the first EOS position of the *first* chunk, projected
by ``text_projection`` when the model has one (``CLIPTextModelWithProjection``). It does not
depend on clip skip.

Gradients are not disabled here: wrap calls in ``torch.no_grad()`` for inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CHUNK_LEN = 75  # tokens per chunk, without BOS/EOS


def chunk_token_ids(
    ids: Sequence[int], *, bos: int, eos: int, pad: int, chunk_len: int = CHUNK_LEN
) -> list[list[int]]:
    """Token ids (without specials) -> chunks of ``chunk_len + 2`` ids: BOS, up to chunk_len ids, EOS, pads.

    Zero ids give one chunk, so every prompt has at least one.
    """
    if chunk_len <= 0:
        raise ValueError(f"chunk_len must be positive, got {chunk_len}.")
    ids = list(ids)
    pieces = [ids[i : i + chunk_len] for i in range(0, len(ids), chunk_len)] or [[]]
    return [[bos, *piece, eos] + [pad] * (chunk_len - len(piece)) for piece in pieces]


def special_ids(tokenizer) -> tuple[int, int, int]:
    """(BOS, EOS, pad) ids of a CLIP tokenizer; a tokenizer without a pad token pads with EOS."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if bos is None or eos is None:
        raise ValueError("The tokenizer has no BOS/EOS token: not a CLIP tokenizer.")
    return bos, eos, eos if pad is None else pad


def prompt_token_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, without specials and without truncation."""
    encoded = tokenizer(list(prompts), add_special_tokens=False, truncation=False, verbose=False)
    return [list(ids) for ids in encoded["input_ids"]]


def tokenize_chunks(tokenizer, prompt: str, chunk_len: int = CHUNK_LEN) -> list[list[int]]:
    """One prompt -> its chunks of ``chunk_len + 2`` token ids (see the module docstring)."""
    bos, eos, pad = special_ids(tokenizer)
    return chunk_token_ids(
        prompt_token_ids(tokenizer, [prompt])[0], bos=bos, eos=eos, pad=pad, chunk_len=chunk_len
    )


def encode_clip(
    text_encoder: torch.nn.Module,
    tokenizer,
    prompts,
    *,
    clip_skip: int = 1,
    chunk_len: int = CHUNK_LEN,
    pooled: bool = False,
    layer_norm_on_skip: bool = True,
    syntax: bool = True,
    embeddings: dict | None = None,
    emphasis: str = "original",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode prompts with a transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``.

    Returns ``hidden`` of shape (B, (chunk_len + 2) · n_chunks, C), n_chunks being the largest
    chunk count in the batch, and ``pooled`` of shape (B, P) (P = C without a projection) when
    ``pooled`` is set, else None. Outputs are on the encoder's device, in its dtype.

    ``prompts``: strings, or ``ParsedPrompt`` objects a family record parsed once for all its encoders
    (``prompt_input.parse_prompts``). Strings are read in the A1111 prompt language (docs/prompts.md):
    ``(word:1.3)``, ``[word]``, ``BREAK``, escapes; ``<lora:...>`` tags are dropped from the text.
    ``syntax=False`` encodes strings literally. Names of textual-inversion embeddings (``embeddings``:
    {name: Embedding}, a model's ``models.embeddings``; None = none) become their vectors.
    ``emphasis`` is the weighting formula (``conditioning.weighting``). The pooled output is never
    weighted. A prompt without syntax encodes exactly as with plain tokenisation.
    """
    from diffstudio.conditioning.prompt_input import parse_prompts

    prompts = parse_prompts(prompts, syntax)
    if not prompts:
        raise ValueError("encode_clip needs at least one prompt.")
    config = text_encoder.config
    if not 1 <= clip_skip <= config.num_hidden_layers:
        raise ValueError(
            f"clip_skip must be in 1..{config.num_hidden_layers} for this encoder, got {clip_skip}."
        )
    if chunk_len + 2 > config.max_position_embeddings:
        raise ValueError(
            f"chunk_len {chunk_len} + BOS + EOS exceeds the encoder's "
            f"{config.max_position_embeddings} positions."
        )

    from diffstudio.conditioning import embeddings as ti
    from diffstudio.conditioning.prompt_tokens import batch_tokens
    from diffstudio.conditioning.weighting import apply_emphasis

    bos, eos, pad = special_ids(tokenizer)
    tokens = batch_tokens(tokenizer, prompts, chunk_len=chunk_len, bos=bos, eos=eos, pad=pad, embeddings=embeddings)
    n_chunks = tokens.n_chunks

    device = _device_of(text_encoder)
    input_ids = torch.tensor(tokens.rows, dtype=torch.long, device=device)  # (B · n_chunks, chunk_len + 2)
    with ti.inject(text_encoder, tokens.slots):
        hidden, pooled_rows = _run_encoder(text_encoder, input_ids, clip_skip, layer_norm_on_skip)
    hidden = apply_emphasis(hidden, torch.tensor(tokens.weights), emphasis)

    batch, width = len(prompts), hidden.shape[-1]
    hidden = hidden.reshape(batch, n_chunks * input_ids.shape[1], width)  # chunks side by side
    pooled_out = pooled_rows.reshape(batch, n_chunks, -1)[:, 0] if pooled else None
    return hidden, pooled_out


def encode_clip_concat(
    encoders: Sequence[tuple[torch.nn.Module, object]],
    prompts,
    *,
    clip_skip: int = 1,
    layer_norm_on_skip: bool = True,
    chunk_len: int = CHUNK_LEN,
    embeddings: dict | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Several CLIP encoders on the same prompts: hidden states side by side, and each one's pooled.

    ``encoders`` are (text_encoder, tokenizer) pairs. SDXL's context is CLIP ViT-L's and OpenCLIP
    bigG's penultimate states concatenated on the feature axis (Podell et al. 2023, section 2.1):
    (B, T, 768) + (B, T, 1280) -> (B, T, 2048). Every encoder runs through ``encode_clip`` (chunks,
    clip skip, ``embeddings``); the tokenizers share one vocabulary, so chunk counts agree. Returns
    ``(hidden (B, T, sum of widths), [pooled (B, P_i) per encoder])``.
    """
    from diffstudio.conditioning.prompt_input import parse_prompts
    from diffstudio.errors import InvalidInputError

    prompts = parse_prompts(prompts)  # once for all the encoders
    hiddens, pooled = [], []
    for text_encoder, tokenizer in encoders:
        hidden, pooled_i = encode_clip(text_encoder, tokenizer, prompts, clip_skip=clip_skip, chunk_len=chunk_len,
                                       pooled=True, layer_norm_on_skip=layer_norm_on_skip, embeddings=embeddings)
        hiddens.append(hidden)
        pooled.append(pooled_i)
    if len({h.shape[:2] for h in hiddens}) != 1:
        shapes = ", ".join(str(tuple(h.shape)) for h in hiddens)
        raise InvalidInputError(f"the text encoders gave token sequences of different lengths ({shapes}): their "
                                "tokenizers split the prompt differently. Use the tokenizers that came with the model.")
    return torch.cat(hiddens, dim=-1), pooled


def _run_encoder(
    model: torch.nn.Module, input_ids: torch.Tensor, clip_skip: int, layer_norm_on_skip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (N, T, C) at the requested layer, pooled (N, P) from the final layer)."""
    # No attention mask: the SD text encoders were trained/used with the causal mask only,
    # so padding positions attend to the prompt like in every released pipeline.
    out = model(input_ids=input_ids, output_hidden_states=clip_skip > 1)
    if clip_skip == 1:
        hidden = out.last_hidden_state
    else:
        # hidden_states = (embeddings, block 1, ..., block L): [-k] is the k-th block from the end.
        hidden = out.hidden_states[-clip_skip]
        if layer_norm_on_skip:
            hidden = _final_layer_norm(model)(hidden)
    text_embeds = getattr(out, "text_embeds", None)
    pooled = text_embeds if text_embeds is not None else out.pooler_output
    return hidden, pooled


def _final_layer_norm(model: torch.nn.Module) -> torch.nn.Module:
    # transformers 4.x (and 5.x's WithProjection) nest the transformer under .text_model.
    return getattr(model, "text_model", model).final_layer_norm


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
