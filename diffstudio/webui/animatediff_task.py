"""AnimateDiff text-to-video as a queued job: a checkpoint of the server's catalog plus one of its motion modules
(docs/animatediff.md), rendered by ``diffstudio.VideoPipeline`` into ``OUTPUTS/<job id>.mp4``. The motion module
is added to a clone of the cached model, so image jobs on the same model never see it; ``job.step`` counts the
sampling steps and Cancel stops the render at the next one."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from diffstudio.webui.video_task import video_output_name

MAX_FRAMES = 256  # a UI job's ceiling; longer videos: `diffstudio video`, which resumes from a work folder


@dataclass
class AnimateDiffTask:
    """model / motion: names in the server's catalog (``shapes-sd`` / ``shapes-motion`` for the demo). Sizes,
    steps and CFG of 0 take the model's defaults."""

    model: str
    motion: str
    prompt: str
    negative_prompt: str = ""
    frames: int = 16
    width: int = 0
    height: int = 0
    steps: int = 0
    cfg_scale: float = 0.0
    seed: int = 0
    context_length: int = 16
    fps: float = 8.0
    context_dilation: int = 1

    def check(self, catalog) -> None:
        """Refuse what cannot run before the job is queued (named errors; nothing is loaded)."""
        from diffstudio.errors import InvalidInputError

        catalog.checkpoint(self.model)
        catalog.motion_module(self.motion)
        if not self.prompt.strip():
            raise InvalidInputError("an AnimateDiff job needs a prompt")
        if not 1 <= self.frames <= MAX_FRAMES:
            raise InvalidInputError(f"frames must be 1..{MAX_FRAMES}, got {self.frames} (longer videos: the "
                                    "`diffstudio video` command, which renders any length)")
        if min(self.context_length, self.context_dilation) < 1 or self.steps < 0 or self.cfg_scale < 0 or self.fps <= 0:
            raise InvalidInputError("context length, dilation and fps must be positive, steps and CFG not negative")

    def params(self) -> dict:
        return asdict(self)

    def run(self, job, cache, outputs: Path) -> None:
        from diffstudio.video.render import VideoPipeline

        pipe = cache.pipeline(self.model)
        models = pipe.models.clone()  # the motion module goes on the clone: the cached model stays an image model
        models.add_motion_module(cache.catalog.motion_module(self.motion).path)
        job.check_stop()

        def on_step(step, total, x, x0):
            job.steps, job.step = total, step + 1
            job.check_stop()

        name = video_output_name(job.id)
        VideoPipeline(models, lora_dirs=pipe.lora_dirs)(
            self.prompt, self.negative_prompt, num_frames=self.frames, width=self.width or None,
            height=self.height or None, steps=self.steps or None, cfg_scale=self.cfg_scale or None, seed=self.seed,
            context_length=self.context_length, context_dilation=self.context_dilation, output=outputs / name,
            fps=self.fps, progress=False, callback=on_step)
        job.outputs.append(name)
        job.info = {**job.info, "frames": self.frames}
