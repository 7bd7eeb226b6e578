"""FastBlend as a queued job: deflicker a stylised video against its original, or render the original in the
style of a few keyframes (``diffstudio.video.fastblend``). The queue's worker runs it like a generation:
``job.step`` counts the frames written, Cancel stops it at the next frame, and the output is
``OUTPUTS/<job id>.mp4``."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path


def video_output_name(job_id: str) -> str:
    return f"{job_id}.mp4"


@dataclass
class FastBlendTask:
    """guide: the original video (file or folder of frames). style: its stylised version (blend), or
    keyframes: stylised frames named by their frame number (``00012.png``: interpolation)."""

    guide: str
    style: str | None = None
    keyframes: list[str] = field(default_factory=list)
    mode: str = "fast"
    window_size: int = 15
    seed: int = 0
    single_keyframe: bool = False

    def check(self) -> None:
        """Refuse settings and inputs before the job is queued (named errors, no frame decoded)."""
        from diffstudio.errors import InvalidInputError
        from diffstudio.video import video_io
        from diffstudio.video.fastblend import check_settings

        check_settings(mode=self.mode, window_size=self.window_size)
        video_io.check_source(self.guide, "original video")
        if (self.style is None) == (not self.keyframes):
            raise InvalidInputError("give the stylised video (blend) or stylised keyframes (interpolation), "
                                    "one of the two")
        if self.style is not None:
            video_io.check_source(self.style, "stylised video")
        for path in self.keyframes:
            video_io.frame_index(path)

    def params(self) -> dict:
        """What the job file records (file names only)."""
        return {"mode": "interpolate" if self.keyframes else self.mode, "window_size": self.window_size,
                "seed": self.seed, "guide": Path(self.guide).name, "keyframes": [Path(p).name for p in self.keyframes]}

    def run(self, job, cache, outputs: Path) -> None:
        from diffstudio.video import video_io
        from diffstudio.video.fastblend import iter_blend, iter_interpolate
        from diffstudio.video.fastblend.frames import DiskFrames

        keyframes = {video_io.frame_index(p): video_io.read_image(p) for p in self.keyframes}
        name = video_output_name(job.id)
        writer = video_io.VideoWriter(str(outputs / name), video_io.video_fps(self.guide))
        with tempfile.TemporaryDirectory(prefix="diffstudio-fastblend-") as scratch, \
                DiskFrames.spill(video_io.iter_frames(self.guide, "original video"), scratch) as guides:
            job.steps = len(guides)
            if keyframes:
                frames = iter_interpolate(keyframes, guides, seed=self.seed, single_keyframe=self.single_keyframe)
                self._write(job, writer, frames)
            else:
                with DiskFrames.spill(video_io.iter_frames(self.style, "stylised video"), scratch) as styles:
                    self._write(job, writer, iter_blend(styles, guides, mode=self.mode,
                                                        window_size=self.window_size, seed=self.seed))
        job.outputs.append(name)
        job.info = {**job.info, "frames": writer.count}

    @staticmethod
    def _write(job, writer, frames) -> None:
        with writer:  # a cancel (or any error) leaves no partial output
            for frame in frames:
                writer.write(frame)
                job.step += 1
                job.check_stop()
