"""The settings of an IP-Adapter training run (``train_ip_adapter``), importable without torch: the command line
reads their defaults to build its help."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class IPAdapterTrainConfig:
    data: str  # folder of images + metadata.csv (file_name,text) or .txt captions; each image is its own reference
    out: str  # the IP-Adapter file to write (.safetensors)
    model: str | None = None  # base model path; None = the packaged Shapes demo model
    image_encoder: str | None = None  # a CLIP vision encoder (folder or file) or a Shapes encoder file; None = new
    train_encoder: bool | None = None  # None: a new (Shapes) encoder trains, a loaded one stays frozen
    num_tokens: int = 4  # image tokens per image (the base IP-Adapter: 4)
    encoder_size: int = 64  # a new Shapes encoder's input side
    encoder_width: int = 32  # a new Shapes encoder's per-pixel feature width
    encoder_dim: int = 64  # a new Shapes encoder's image embedding width
    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-4  # the paper's rate (sec. 4.1)
    warmup: int = 0
    lr_end: float | None = None  # anneal to this rate by the last step (half cosine); None = constant
    snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (eps / v families)
    caption_dropout: float = 0.05  # share of samples trained on the empty prompt (the paper: 0.05)
    image_dropout: float = 0.05  # share trained with the zero image embedding (the paper: 0.05), independently
    resolution: int | None = None  # bucket area = resolution**2; None = the model's default width
    buckets: bool = True  # False: every image is resized to resolution x resolution
    precision: str = "fp32"  # "bf16": the frozen base in bf16, the adapter in fp32
    optimizer: str = "adamw"  # or "adamw_fused", "adamw8bit"
    seed: int = 0  # the new weights, the batches, the noise, the dropouts
    checkpoint_every: int = 100
    workdir: str | None = None  # checkpoints and caches; None = "<out>.run"
    save_dtype: str = "fp32"  # the file's dtype: fp32, fp16 or bf16
    restart: bool = False  # discard the work folder's checkpoint (made with another recipe) and start at step 0

    def work_path(self) -> Path:
        return Path(self.workdir) if self.workdir else Path(str(self.out) + ".run")


# Settings that leave every update as it is: they may change between a run and its resume.
NOT_IN_RECIPE = ("data", "out", "model", "image_encoder", "workdir", "checkpoint_every", "save_dtype", "restart")
