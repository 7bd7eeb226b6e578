# Load one denoiser stage of a build folder as a model: assemble links only what that stage's file needs (the
# latents' VAE, the decoder stage if the folder has one, and the stage itself, which `assemble` then picks as the
# latest present). Used by stage_eval.py.
import tempfile
from pathlib import Path

import diffstudio
from diffstudio.demo.build import build


def load_stage(workdir: Path, stage: str):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in ("latents.pt", "decoder"):
            if (workdir / name).exists():
                (tmp / name).symlink_to((workdir / name).resolve())
        (tmp / stage).symlink_to((workdir / stage).resolve())
        build(tmp / "model.safetensors", tmp, stages=("assemble",))
        return diffstudio.load(tmp / "model.safetensors")
