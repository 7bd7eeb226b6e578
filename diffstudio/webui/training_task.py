"""LoRA training as a queued job (``diffstudio.train.lora.train_lora``), run in chunks of ``checkpoint_every``
steps: each chunk resumes from the previous one's checkpoint, so between chunks the job reports its step and
the loss history (``job.info["losses"]``) and a Cancel takes effect (the checkpoint stays; the same run
started again resumes from it). The base model is the server's loaded one (the model cache's), left unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LoRATrainingTask:
    """data: a folder of images with captions (metadata.csv or a .txt beside each image); out: the LoRA file."""

    model: str
    data: str
    out: str
    steps: int = 100
    rank: int = 4
    lr: float = 1e-4
    resolution: int | None = None
    checkpoint_every: int = 10
    seed: int = 0
    restart: bool = False
    finished: Callable[[Path], None] | None = None  # called with the LoRA's path (the server rescans its models)

    def config(self):
        from diffstudio.train.lora import LoRATrainConfig

        return LoRATrainConfig(data=self.data, out=self.out, steps=self.steps, rank=self.rank, lr=self.lr,
                               resolution=self.resolution, checkpoint_every=self.checkpoint_every, seed=self.seed,
                               restart=self.restart)

    def check(self) -> None:
        """Refuse before queueing what needs no model: the numbers, the training extra, the folder's captions."""
        from diffstudio.errors import InvalidInputError
        from diffstudio.train.data import read_captions
        from diffstudio.train.extras import require_train_extra

        if self.steps < 1 or self.rank < 1 or self.checkpoint_every < 1 or not self.lr > 0:
            raise InvalidInputError("steps, rank and the checkpoint interval must be positive whole numbers and "
                                    "the learning rate a positive number")
        require_train_extra()
        read_captions(self.data)

    def params(self) -> dict:
        return {"model": self.model, "steps": self.steps, "rank": self.rank, "lr": self.lr,
                "resolution": self.resolution, "out": Path(self.out).name}

    def run(self, job, cache, outputs: Path) -> None:
        from diffstudio.train.lora import train_lora

        models = cache.pipeline(self.model).models
        config = self.config()
        job.steps = self.steps
        while True:
            job.check_stop()
            lora = train_lora(config, models, stop_after=self.checkpoint_every)
            config.restart = False  # only the first chunk may discard an older run
            job.step, losses = read_progress(config.work_path())
            job.info = {**job.info, "losses": losses}
            if lora is not None:
                break
        job.info = {**job.info, "lora": Path(lora).name}
        if self.finished is not None:
            self.finished(Path(lora))


def read_progress(workdir: Path) -> tuple[int, list[float]]:
    """(step, losses) of a training run's newest checkpoint; (0, []) before the first."""
    from diffstudio.train.loop import CHECKPOINT

    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        path = Path(workdir) / name / "progress.json"
        if path.is_file():
            data = json.loads(path.read_text())
            return int(data["step"]), [float(v) for v in data["losses"]]
    return 0, []
