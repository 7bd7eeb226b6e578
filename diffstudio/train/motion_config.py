"""The settings of a motion-module training run (``train_motion``), importable without torch: the command line
reads their defaults to build its help."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class MotionTrainConfig:
    data: str  # folder of clips (video files or folders of frames) + metadata.csv or .txt captions
    out: str  # the motion module file to write (.safetensors)
    model: str | None = None  # base model path; None = the packaged Shapes demo model
    frames: int = 16  # frames per training clip (AnimateDiff: 16)
    stride: int = 1  # take every stride-th frame of a video (AnimateDiff samples webvid at 4)
    resolution: int | None = None  # square frames of this side; None = the model's default width
    max_frames: int = 32  # rows of the position table: the most frames one call may hold (v2/v3: 32)
    mid_block: bool = False  # a module in the UNet's middle block too (v2's layout)
    steps: int = 2000
    batch_size: int = 1  # clips per step
    lr: float = 1e-4
    warmup: int = 0
    lr_end: float | None = None  # anneal to this rate by the last step (half cosine); None = constant
    schedule: str = "linear"  # AnimateDiff's training betas; "model": the base model's own schedule
    snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (see objectives.diffusion_loss)
    caption_dropout: float = 0.1  # share of clips that see the empty prompt (AnimateDiff: 0.1), for CFG
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"  # or "adamw_fused", "adamw8bit"
    seed: int = 0
    checkpoint_every: int = 100
    workdir: str | None = None  # checkpoints and caches; None = "<out>.run"
    save_dtype: str = "fp16"  # the written file's weights: fp16 (as the released modules), bf16 or fp32
    restart: bool = False  # discard the work folder's checkpoint (made with another recipe) and start at step 0

    def work_path(self) -> Path:
        return Path(self.workdir) if self.workdir else Path(str(self.out) + ".run")

    def span(self) -> int:
        """Video frames one training clip covers."""
        return (self.frames - 1) * self.stride + 1
