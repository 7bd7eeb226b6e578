"""LoRA training as a queued job (``diffstudio.train.lora.train_lora``), run in chunks of ``checkpoint_every``
steps: each chunk resumes from the previous one's checkpoint, so between chunks the job reports its step and
the loss history (``job.info["losses"]``) and a Cancel takes effect (the checkpoint stays; the same run
started again resumes from it). The base model is the server's loaded one (the model cache's), left unchanged.

With a sample prompt, each checkpoint renders one image with the LoRA as it stands then (written by the chunk
as ``sample.safetensors`` in the run's work folder; the final one is the LoRA itself), on a clone of the model
(the cached model keeps no patch): the job's outputs (``<job id>-<n>.png``), with ``job.info["samples"]``
giving each one's step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

SAMPLE_SIDE = 256  # the largest default side of a checkpoint sample
SNAPSHOT = "sample.safetensors"  # the LoRA of the newest checkpoint, in the run's work folder


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
    sample_prompt: str = ""  # "" = no samples
    sample_size: int = 0  # 0 = the model's default width, at most SAMPLE_SIDE
    sample_steps: int = 0  # 0 = the model's default
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

        if self.steps < 1 or self.rank < 1 or self.checkpoint_every < 1 or not self.lr > 0 or \
                self.sample_size < 0 or self.sample_steps < 0:
            raise InvalidInputError("steps, rank and the checkpoint interval must be positive whole numbers, the "
                                    "learning rate a positive number, the sample size and steps 0 or more")
        require_train_extra()
        read_captions(self.data)

    def params(self) -> dict:
        return {"model": self.model, "steps": self.steps, "rank": self.rank, "lr": self.lr,
                "resolution": self.resolution, "out": Path(self.out).name}

    def run(self, job, cache, outputs: Path) -> None:
        from diffstudio.train.lora import train_lora

        models = cache.pipeline(self.model).models
        config = self.config()
        snapshot = config.work_path() / SNAPSHOT if self.sample_prompt else None
        job.steps = self.steps
        while True:
            job.check_stop()
            lora = train_lora(config, models, stop_after=self.checkpoint_every, snapshot=snapshot)
            config.restart = False  # only the first chunk may discard an older run
            job.step, losses = read_progress(config.work_path())
            job.info = {**job.info, "losses": losses}
            if self.sample_prompt:
                self.render_sample(job, models, lora or snapshot, outputs)
            if lora is not None:
                break
        job.info = {**job.info, "lora": Path(lora).name}
        if self.finished is not None:
            self.finished(Path(lora))


    def render_sample(self, job, models, lora: Path, outputs: Path) -> None:
        """One image of the sample prompt with ``lora`` (the job's seed), added to the job's outputs."""
        import diffstudio
        from diffstudio.io.recipe import save_png
        from diffstudio.server.runner import output_name

        clone = models.clone()  # the LoRA goes on the clone: the cached model is left as it is
        clone.apply_lora(lora)
        size = self.sample_size or min(int({**asdict(models.family.defaults), **models.defaults}["width"]),
                                       SAMPLE_SIDE)
        image = diffstudio.Pipeline(clone)(self.sample_prompt, width=size, height=size, seed=self.seed,
                                           steps=self.sample_steps or None, progress=False)[0]
        models.activate()  # the base's own patches back in the shared weights
        name = output_name(job.id, len(job.outputs))
        save_png(image, outputs / name, image.info["diffstudio_recipe"])
        job.outputs = [*job.outputs, name]
        job.info = {**job.info, "samples": [*job.info.get("samples", []), {"step": job.step, "output": name}]}


def read_progress(workdir: Path) -> tuple[int, list[float]]:
    """(step, losses) of a training run's newest checkpoint; (0, []) before the first."""
    from diffstudio.train.loop import CHECKPOINT

    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        path = Path(workdir) / name / "progress.json"
        if path.is_file():
            data = json.loads(path.read_text())
            return int(data["step"]), [float(v) for v in data["losses"]]
    return 0, []
