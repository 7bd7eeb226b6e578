"""The command-line options every trainer shares (``diffstudio train lora | controlnet | motion``).

Importing this module imports no torch: the command line builds its parser before torch starts.
"""

from __future__ import annotations

import argparse

OPTIMIZERS = ("adamw", "adamw_fused", "adamw8bit")
SHARD_MODES = ("fsdp",)  # train.sharding.SHARD_MODES (that module imports torch)


def add_run_options(p: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float, warmup: int = 0,
                    caption_dropout: float = 0.0, optimizer: str = "adamw", seed: int = 0,
                    checkpoint_every: int = 100, captions: bool = True, shard: bool = False) -> None:
    """Steps and rates, Min-SNR, caption dropout, optimizer, seed, checkpoints, the work folder and --restart;
    each trainer passes its own defaults (those of its config dataclass). ``captions=False``: without Min-SNR and
    caption dropout (a trainer with neither, e.g. ExVideo's EDM loss on image conditioning). ``shard``: the trainer
    runs data-parallel and offers ``--shard`` (``train.sharding``)."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--lr-end", type=float, default=None, help="anneal to this learning rate (half cosine)")
    if captions:
        p.add_argument("--snr-gamma", type=float, default=None,
                       help="Min-SNR-gamma loss weighting, e.g. 5 (eps/v families; docs/training.md)")
        p.add_argument("--caption-dropout", type=float, default=caption_dropout,
                       help="share of samples trained on the empty prompt (keeps CFG working)")
    p.add_argument("--optimizer", default=optimizer, choices=OPTIMIZERS)
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every)
    p.add_argument("--workdir", help="checkpoints + caches (default: OUT.run); a rerun with the same data, "
                                     "base model and settings resumes from it")
    if shard:
        p.add_argument("--shard", choices=SHARD_MODES,
                       help="under several processes, shard parameters, gradients and optimizer state over them "
                            "(fsdp: torch FSDP2; docs/scale.md)")
    p.add_argument("--restart", action="store_true",
                   help="discard the work folder's checkpoint (a run with other data or settings) and start over")
