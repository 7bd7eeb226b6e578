"""A video render's work folder: its state after every sampler step, and the check that it belongs to the run.

``state.safetensors`` holds the latent x of all frames after the last finished step, the index of the next
step, and the state of every frame's noise generator (``SeededNoise``); its metadata holds the render's
*recipe* (everything that decides the result: prompts, size, frames, sampling, seed, inputs by content,
model files, windows, smoothing). It is replaced atomically after each step, so a killed render leaves the
state of its last finished step.

Started again with the same arguments, a render continues from that step, and the result equals an
uninterrupted render bit for bit: the samplers allowed here (``RESUMABLE_SAMPLERS``) carry nothing from
one step to the next but x and the noise stream, and both are restored. Multistep samplers (DPM++ 2M) also
carry the previous step's prediction, so a render with a work folder refuses them (``UnresumableSamplerError``).
A folder whose state was made under another recipe is refused (``StaleRenderError``, listing what differs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from diffstudio.errors import InvalidInputError

STATE_FILE = "state.safetensors"
RECIPE_KEY = "diffstudio_video_render"
RESUMABLE_SAMPLERS = ("euler", "euler_ancestral", "ddim", "heun", "lcm")
RESTART = "pass restart=True (CLI: --restart) to discard it and start over, or use another work folder"


class StaleRenderError(InvalidInputError):
    """A render asked to continue in a work folder whose state was made with other arguments (another
    prompt, seed, input video, model ...). The message lists the fields that differ."""


class UnresumableSamplerError(InvalidInputError):
    """A render with a work folder asked for a sampler whose state is more than the latent and the noise
    stream (multistep samplers), so a resumed render could not equal an uninterrupted one."""


def check_sampler(sampler: str) -> None:
    if sampler not in RESUMABLE_SAMPLERS:
        raise UnresumableSamplerError(
            f"the {sampler!r} sampler carries state between steps that a work folder does not store, so a resumed "
            f"render would differ from an uninterrupted one; with a work folder use one of "
            f"{', '.join(RESUMABLE_SAMPLERS)}, or render without a work folder")


@dataclass
class RenderState:
    x: torch.Tensor  # (F, C, h, w) float32: the latent after `step` steps
    step: int  # the next step to run (0-based, into the run's schedule)
    noise_states: torch.Tensor  # (F, S) uint8: each frame's noise generator
    draws: int  # noise draws so far (SeededNoise.draws)


class WorkDir:
    """``WorkDir(path, recipe)``: ``load()`` the state to continue from (None: start afresh), ``save(...)``."""

    def __init__(self, path: str | Path, recipe: dict):
        self.path = Path(path)
        self.recipe = json.loads(json.dumps(recipe))  # the form it has once stored (tuples become lists)
        if self.path.exists() and not self.path.is_dir():
            raise InvalidInputError(f"the work folder {self.path} is a file: give a folder (it is made if missing)")
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    def load(self, restart: bool = False) -> RenderState | None:
        """The saved state, after checking its recipe; None when there is none (or ``restart``)."""
        from safetensors import safe_open

        if restart or not self.state_file.exists():
            return None
        with safe_open(str(self.state_file), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get(RECIPE_KEY, "null"))
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        where = f"the work folder {self.path}"
        if stored is None:
            raise StaleRenderError(f"{where} holds a state that records no render recipe: {RESTART}")
        changed = [k for k in sorted(stored.keys() | self.recipe.keys()) if stored.get(k) != self.recipe.get(k)]
        if changed:
            lines = "\n".join(f"  {k}: {_show(stored.get(k))} -> {_show(self.recipe.get(k))}" for k in changed)
            raise StaleRenderError(f"{where} holds a render (at step {int(tensors['step'])}) made with other "
                                   f"arguments:\n{lines}\nRun again with the old arguments to finish it; to render "
                                   f"the new ones, {RESTART}")
        return RenderState(tensors["x"], int(tensors["step"]), tensors["noise_states"], int(tensors["draws"]))

    def save(self, x: torch.Tensor, step: int, noise) -> None:
        """Replace the state atomically: x after ``step`` steps and the noise generators (a SeededNoise)."""
        from diffstudio.io.safetensors_file import save_safetensors

        tensors = {"x": x.detach().float().cpu().contiguous(), "step": torch.tensor(step, dtype=torch.int64),
                   "noise_states": torch.stack([g.get_state() for g in noise.generators]),
                   "draws": torch.tensor(noise.draws, dtype=torch.int64)}
        save_safetensors(tensors, self.state_file, metadata={RECIPE_KEY: json.dumps(self.recipe)})


def restore_noise(noise, state: RenderState) -> None:
    """Put a fresh SeededNoise's generators where the saved render left them."""
    if state.noise_states.shape[0] != len(noise.generators):
        raise StaleRenderError(f"the saved state has {state.noise_states.shape[0]} noise generators, the render "
                               f"{len(noise.generators)}: {RESTART}")
    for generator, saved in zip(noise.generators, state.noise_states):
        generator.set_state(saved.clone())
    noise.draws = state.draws


def _show(value) -> str:
    return "(unset)" if value is None else json.dumps(value)
