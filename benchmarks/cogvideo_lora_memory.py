"""Memory of CogVideoX LoRA training, computed (not measured on a GPU): docs/cogvideox.md, "Training a LoRA".

What autograd keeps for the backward pass is counted, not estimated: one block of the released width (2B: 1920,
5B: 3072) in bf16 with the trainer's fp32 peft adapters (rank 16 on attn1.to_q / to_k / to_v / to_out.0) runs
forward on the CPU at two small video token counts, and a ``saved_tensors_hooks`` pair sums the bytes of every
tensor saved for backward (parameters excluded: they are not copies). Attention runs through SDPA, whose fused
kernels keep the output and the log-sum-exp, not the N x N matrix; a tensor with two token-sized dimensions would
be reported. The per-token slope then gives 49 and 129 frames at 720x480 (13 / 33 latent frames of 30 x 45 tokens
+ 226 text tokens), batch 1:

* without gradient checkpointing: every block's saved tensors at once;
* with it (``--gradient-checkpointing``, one checkpoint per block): each block keeps its inputs (video and text
  hidden states) and one block's saved tensors exist at a time, during its recomputation.

Weights: the transformer in bf16 (parameter count of the released layout, on the meta device); the adapters in
fp32 with their gradient and AdamW's two moments (16 bytes a parameter). T5-XXL and the VAE are not counted: they
run once per clip when the cache is built, before the transformer trains.

    python benchmarks/cogvideo_lora_memory.py
"""

from __future__ import annotations

import torch

GiB = 1024**3
RELEASE = {  # transformer/config.json of THUDM/CogVideoX-2b and -5b
    "2b": dict(num_attention_heads=30, attention_head_dim=64, num_layers=30),
    "5b": dict(num_attention_heads=48, attention_head_dim=64, num_layers=42, use_rotary_positional_embeddings=True),
}
COMMON = dict(in_channels=16, out_channels=16, time_embed_dim=512, text_embed_dim=4096, sample_width=90,
              sample_height=60, sample_frames=49, patch_size=2, max_text_seq_length=226,
              spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0, attention_bias=True, norm_eps=1e-5)
TEXT = 226
GRID = 30 * 45  # video tokens per latent frame at 720x480
RANK = 16


def saved_bytes(block, dim: int, video_tokens: int, rope) -> int:
    params = {p.data_ptr() for p in block.parameters()}
    total = [0]

    def pack(t):
        if t.data_ptr() not in params:
            n = video_tokens + TEXT
            if sum(1 for s in t.shape if s == n) >= 2:
                raise RuntimeError(f"a saved tensor of shape {tuple(t.shape)} grows with the square of the tokens")
            total[0] += t.numel() * t.element_size()
        return t

    g = torch.Generator().manual_seed(0)
    video = torch.randn(1, video_tokens, dim, generator=g).bfloat16().requires_grad_()
    text = torch.randn(1, TEXT, dim, generator=g).bfloat16().requires_grad_()
    temb = torch.randn(1, 512, generator=g).bfloat16()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(video, text, temb, rope)
    return total[0]


def main() -> None:
    from diffstudio.models.cogvideo import Block, CogVideoConfig, CogVideoTransformer, rope_3d
    from diffstudio.train.lora import inject_lora, target_modules

    print("| | 2B | 5B |\n|---|---|---|")
    rows: dict[str, list[str]] = {}
    for release in RELEASE.values():
        c = CogVideoConfig(**{**COMMON, **release})
        with torch.device("meta"):
            full = CogVideoTransformer(c)
        weights = sum(p.numel() for p in full.parameters())
        lora = sum(RANK * (m.in_features + m.out_features) for n, m in full.named_modules()
                   if n in target_modules(full, r"transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)"))
        block = Block(c).bfloat16()
        inject_lora(block, target_modules(block, r"attn1\.(to_q|to_k|to_v|to_out\.0)"), RANK, RANK, seed=0)
        dim = c.inner_dim
        counts = (25, 100)
        measured = []
        for frames_tokens in counts:  # a latent frame of 5 x 5 / 10 x 10 tokens stand in for the token count
            side = int(frames_tokens**0.5)
            rope = tuple(r.bfloat16() for r in rope_3d(1, side, side, c)) if c.use_rotary_positional_embeddings \
                else None
            measured.append(saved_bytes(block, dim, frames_tokens, rope))
        per_token = (measured[1] - measured[0]) / (counts[1] - counts[0])
        fixed = measured[0] - per_token * counts[0]
        rows.setdefault("transformer weights (bf16)", []).append(f"{weights / 1e9:.2f} B params, "
                                                                 f"{weights * 2 / GiB:.1f} GiB")
        rows.setdefault(f"rank-{RANK} adapters + grads + AdamW (fp32)", []).append(
            f"{lora / 1e6:.1f} M params, {lora * 16 / GiB:.2f} GiB")
        rows.setdefault("saved for backward, one block, per token", []).append(f"{per_token / 1024:.1f} KiB")
        for frames in (49, 129):
            video = ((frames - 1) // 4 + 1) * GRID
            one_block = fixed + per_token * video
            inputs = (video + TEXT) * dim * 2  # a checkpointed block keeps its video + text hidden states (bf16)
            plain = weights * 2 + lora * 16 + c.num_layers * one_block
            ckpt = weights * 2 + lora * 16 + c.num_layers * inputs + one_block
            rows.setdefault(f"{frames} frames: total without checkpointing", []).append(f"{plain / GiB:.0f} GiB")
            rows.setdefault(f"{frames} frames: total with --gradient-checkpointing", []).append(f"{ckpt / GiB:.1f} GiB")
    for label, values in rows.items():
        print(f"| {label} | {' | '.join(values)} |")


if __name__ == "__main__":
    main()
