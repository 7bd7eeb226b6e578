"""The settings of an ExVideo-SVD extension training run (``train_exvideo``), importable without torch: the command
line reads their defaults to build its help."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SIGMA_SAMPLINGS = ("lognormal", "karras")
LOSS_WEIGHTINGS = ("edm", "exvideo")


@dataclass
class ExVideoTrainConfig:
    data: str  # folder of clips (video files or folders of frames); captions, if any, are not used
    out: str  # the extension file to write (.safetensors)
    model: str | None = None  # the SVD base (svd_xt.safetensors or a diffusers folder)
    init: str | None = None  # start from this extension file (e.g. ExVideo-SVD-128f-v1) instead of the identity
    frames: int = 128  # frames per training clip (ExVideo-SVD: 128)
    stride: int = 1  # take every stride-th frame of a video (ExVideo: 1)
    positions: int | None = None  # rows of the position tables; None = frames (ExVideo-SVD: 128)
    width: int = 512  # frames are resized to cover and centre-cropped to width x height (ExVideo-SVD: 512 x 512)
    height: int = 512
    temporal: bool = True  # train the temporal transformer blocks too (the release does), else tables + convs only
    fps: int = 30  # told to the model as fps - 1 (ExVideo's training script: 30)
    motion_bucket_id: int = 127
    noise_aug: float = 0.02  # noise added to the first frame before it is encoded (SVD's pipeline default)
    p_mean: float = 0.7  # ln(sigma) ~ N(p_mean, p_std^2): SVD fine-tuning's log-normal noise levels
    p_std: float = 1.6
    sigma_sampling: str = "lognormal"  # or "karras": uniform over a 1000-step Karras schedule (DiffSynth's script)
    loss_weighting: str = "edm"  # lambda = (sigma^2 + 1) / sigma^2; "exvideo": its square root (DiffSynth's script)
    target_scale: float = 1.0  # the x0 target is the clean latent times this (DiffSynth's script: 1.01)
    steps: int = 2000
    batch_size: int = 1  # clips per step
    lr: float = 1e-5  # ExVideo's training script
    warmup: int = 0
    lr_end: float | None = None  # anneal to this rate by the last step (half cosine); None = constant
    ema_decay: float | None = None  # keep an EMA of the trained weights and export it (e.g. 0.999)
    precision: str = "fp32"  # "bf16": the frozen UNet in bf16 and the forward under bf16 autocast
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"  # or "adamw_fused", "adamw8bit"
    seed: int = 0
    checkpoint_every: int = 100
    workdir: str | None = None  # checkpoints and caches; None = "<out>.run"
    save_dtype: str = "fp16"  # the written file's weights: fp16 (as the release), bf16 or fp32
    restart: bool = False  # discard the work folder's checkpoint (made with another recipe) and start at step 0
    shard: str | None = None  # "fsdp": under several processes, shard the UNet and optimizer over them (fp32)

    def work_path(self) -> Path:
        return Path(self.workdir) if self.workdir else Path(str(self.out) + ".run")

    def span(self) -> int:
        """Video frames one training clip covers."""
        return (self.frames - 1) * self.stride + 1

    def table_rows(self) -> int:
        return self.positions if self.positions is not None else self.frames
