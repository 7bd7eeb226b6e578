"""One training loop for everything diffstudio trains (VAE, denoiser from scratch, LoRA).

Built on accelerate, so the same code runs on a CPU, one GPU or many (launch with ``accelerate launch`` or
``torchrun``): data parallel, the gradients averaged here, or with ``shard="fsdp"`` sharded by torch's FSDP2
(``train.sharding``). An accelerate config's DDP/FSDP/DeepSpeed is not used (docs/scale.md).

Exact resume: a batch and its noise are pure functions of (seed, step) — see
``step_generator`` and ``train.data.batch_indices`` — and checkpoints hold the model,
the optimizer, the step and the loss history. A run killed and resumed therefore
follows the same loss curve as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

CHECKPOINT = "checkpoint"
OPTIMIZERS = ("adamw", "adamw_fused", "adamw8bit")
RECIPE = "recipe.json"  # what the checkpoint was trained under (written by trainers that pass ``recipe``)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random source of one training step (noise, timesteps, caption dropout)."""
    return torch.Generator().manual_seed(seed * 7_919 + step * 104_729 + 1)


def process_rank() -> tuple[int, int]:
    """(this process's rank, the number of processes) under ``accelerate launch`` or ``torchrun``, else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def data_parallel_rows(batch_size: int) -> slice:
    """This process's rows of a step's global batch: process r of N takes rows [r B/N, (r+1) B/N).

    Every process draws the same global batch and noise (a function of seed and step), keeps its share and
    back-propagates the mean loss of it; DDP averages the N equal shares' gradients, which is the gradient of
    the global batch's mean loss. N processes therefore follow the 1-process run up to fp32 summation order,
    and a run may be resumed under another process count."""
    from diffstudio.errors import InvalidInputError

    rank, world = process_rank()
    if batch_size % world:
        raise InvalidInputError(f"the batch size ({batch_size}) must be a multiple of the number of processes "
                                f"({world}): each process takes an equal share of every step's batch")
    share = batch_size // world
    return slice(rank * share, (rank + 1) * share)


def main_process_first():
    """A context in which process 0 runs first and the others wait for it (work-folder caches, discarding a
    checkpoint); a no-op in a single process."""
    if process_rank()[1] == 1:
        return contextlib.nullcontext()
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).main_process_first()  # the state train() goes on with


def _model_state(model, trainable_only: bool) -> dict:
    state = model.state_dict()
    if not trainable_only:
        return state
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trainable}


def _checkpoint_state(model, optimizer, trainable_only: bool, ema, sharded: bool, keep: bool) -> dict:
    """What a checkpoint holds; a sharded run gathers its shards into full tensors here (every process calls it;
    those of process ``keep`` keep them), so the file is the same whatever the run's process count or sharding."""
    state = {"model": _model_state(model, trainable_only), "optimizer": optimizer.state_dict()}
    if ema is not None:
        state["ema"] = ema.state_dict()
    if sharded:
        from diffstudio.train.sharding import gather_state

        state = gather_state(state, keep)
    return state


def _save(state: dict, out_dir: Path, step: int, losses: list[float], recipe: dict | None = None) -> None:
    """Write the checkpoint next to the old one, then swap, so a kill mid-write loses nothing.

    The files are written into ``checkpoint.tmp``; ``progress.json`` comes last, so a folder that has it is
    complete. A kill between the two renames leaves ``checkpoint.old``, which ``_checkpoint_dir`` falls back to.
    """
    tmp, final, old = (out_dir / (CHECKPOINT + suffix) for suffix in (".tmp", "", ".old"))
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "state.pt")
    if recipe is not None:
        (tmp / RECIPE).write_text(json.dumps(recipe, indent=1, sort_keys=True))
    (tmp / "progress.json").write_text(json.dumps({"step": step, "losses": losses}))
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _checkpoint_dir(out_dir: Path) -> Path | None:
    """The newest complete checkpoint: ``checkpoint``, else ``checkpoint.old`` (a kill between _save's renames)."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        if (out_dir / name / "progress.json").exists():
            return out_dir / name
    return None


def read_checkpoint(out_dir: str | Path) -> tuple[int, dict | None] | None:
    """(step, recipe) of the checkpoint in ``out_dir`` (recipe None if it was saved without one), or None."""
    ckpt = _checkpoint_dir(Path(out_dir))
    if ckpt is None:
        return None
    step = int(json.loads((ckpt / "progress.json").read_text())["step"])
    recipe = json.loads((ckpt / RECIPE).read_text()) if (ckpt / RECIPE).exists() else None
    return step, recipe


def discard_checkpoints(out_dir: str | Path) -> None:
    """Remove every checkpoint folder of ``out_dir`` (the next run starts at step 0)."""
    for suffix in ("", ".old", ".tmp"):
        shutil.rmtree(Path(out_dir) / (CHECKPOINT + suffix), ignore_errors=True)


def _read_checkpoint(out_dir: Path) -> tuple[Path, dict] | None:
    ckpt = _checkpoint_dir(out_dir)
    if ckpt is None:
        return None
    return ckpt, torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)


def _load_model(model, ckpt: Path, state: dict, trainable_only: bool) -> None:
    from diffstudio.errors import CorruptFileError

    try:
        _, unexpected = model.load_state_dict(state["model"], strict=not trainable_only)
    except RuntimeError as exc:  # missing keys or other shapes: torch lists every tensor (hundreds of lines)
        first = str(exc).strip().splitlines()[1:2] or [""]
        raise CorruptFileError(f"the checkpoint in {ckpt} does not fit this model ({first[0].strip()} ...); "
                               f"discard it (--restart) or train in another work folder") from None
    if unexpected or (trainable_only and set(_model_state(model, True)) - set(state["model"])):
        raise CorruptFileError(f"the checkpoint in {ckpt} does not belong to this model (unexpected keys "
                               f"{unexpected[:3]}); discard it (--restart) or train in another work folder")


def _load_training(optimizer, ckpt: Path, state: dict, ema=None, params=None) -> tuple[int, list[float]]:
    """The optimizer's and EMA's state and the progress; ``params``: a sharded run's parameters, whose shards of
    the checkpoint's full optimizer state this process keeps."""
    from diffstudio.errors import CorruptFileError

    optimizer_state = state["optimizer"]
    if params is not None:
        from diffstudio.train.sharding import shard_optimizer_state

        optimizer_state = shard_optimizer_state(optimizer_state, params)
    optimizer.load_state_dict(optimizer_state)
    if ema is not None:
        if "ema" not in state:
            raise CorruptFileError(f"the checkpoint in {ckpt} holds no EMA of the weights; discard it (--restart) "
                                   f"or train in another work folder")
        ema.load_state_dict(state["ema"])
    progress = json.loads((ckpt / "progress.json").read_text())
    return int(progress["step"]), list(progress["losses"])


def train(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, int], torch.Tensor], *, steps: int,
          out_dir: str | Path, lr: float = 1e-4, weight_decay: float = 0.0, warmup: int = 0,
          lr_end: float | None = None, checkpoint_every: int = 500, grad_clip: float | None = 1.0,
          mixed_precision: str = "no",
          optimizer: str = "adamw", progress: bool = True, desc: str = "train",
          stop_after: int | None = None, trainable_only: bool = False, recipe: dict | None = None,
          ema=None, shard: str | None = None) -> list[float]:
    """Minimise ``loss_fn(model, step)`` for `steps` steps; resumes from `out_dir` if a checkpoint is there.

    ``stop_after`` ends the run early after that many steps of this call (used by tests to
    simulate an interrupted run). ``trainable_only`` checkpoints only the parameters that
    require grad (LoRA adapters, not the frozen base). ``recipe`` (JSON-able) is stored with every checkpoint
    (``read_checkpoint`` gives it back): a trainer compares it before resuming. Returns the loss history of the
    whole run.
    The learning rate rises linearly over ``warmup`` steps, then stays at ``lr``, or with ``lr_end``
    follows a half cosine down to ``lr_end`` at the last step.
    ``ema``: a ``train.ema.EMA`` of the trainable parameters, updated after every optimizer step and stored with
    (and restored from) every checkpoint.
    ``shard="fsdp"``: under several processes, each keeps 1/N of the parameters, gradients and optimizer state
    (``train.sharding``; FSDP2); the module is whole again when ``train`` returns, and the checkpoints are those of
    an unsharded run. In one process it changes nothing.
    """
    from diffstudio.train.extras import require_train_extra
    from diffstudio.train.sharding import ShardedModel, check_shard

    require_train_extra("accelerate")
    check_shard(shard)
    from accelerate import Accelerator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    processes = accelerator.num_processes
    sharded = shard is not None and processes > 1
    if sharded and ema is not None:
        from diffstudio.errors import InvalidInputError

        raise InvalidInputError("an EMA of the weights is not kept under sharded training; drop the EMA or the "
                                "sharding (--shard)")
    checkpoint = _read_checkpoint(out_dir)
    if checkpoint is not None:
        _load_model(model, *checkpoint, trainable_only)
    if processes > 1:
        _broadcast_parameters([p for p in model.parameters() if p.requires_grad])
    shards = ShardedModel(model) if sharded else None
    params = [p for p in model.parameters() if p.requires_grad]  # sharded: this process's shards
    opt = _optimizer(optimizer, params, lr, weight_decay)
    start, losses = 0, []
    if checkpoint is not None:
        start, losses = _load_training(opt, *checkpoint, ema, params if sharded else None)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s + start, steps, warmup, lr,
                                                                          lr_end))
    if processes == 1:
        model, opt = accelerator.prepare(model, opt)
    elif not sharded:  # the losses call the network through the pipeline, not the module's forward, so DDP's
        opt = accelerator.prepare(opt)  # hooks would not run: the gradients are averaged below (what DDP computes)
    model.train()
    run = _Run(accelerator, model, shards, loss_fn, opt, schedule, params, ema, out_dir, steps, checkpoint_every,
               grad_clip, trainable_only, recipe)
    try:
        run.steps_from(start, losses, stop_after, desc, progress)
    finally:
        if shards is not None:
            shards.restore()
    model.eval()
    return losses


@dataclass
class _Run:
    """What the steps of one ``train`` call work with, once the model, optimizer and checkpoint are set up."""

    accelerator: Any
    model: torch.nn.Module
    shards: Any  # a train.sharding.ShardedModel, or None
    loss_fn: Callable[[torch.nn.Module, int], torch.Tensor]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.nn.Parameter]  # the trainable ones (sharded: this process's shards)
    ema: Any
    out_dir: Path
    steps: int
    checkpoint_every: int
    grad_clip: float | None
    trainable_only: bool
    recipe: dict | None

    def steps_from(self, start: int, losses: list[float], stop_after: int | None, desc: str,
                   progress: bool) -> None:
        """The steps from ``start``, appending to ``losses`` and checkpointing as they go."""
        main = self.accelerator.is_main_process
        bar = tqdm(range(start, self.steps), desc=desc, disable=not progress or not main, initial=start,
                   total=self.steps)
        done = 0
        for step in bar:
            losses.append(self.step(step))
            if step % 20 == 0:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
            done += 1
            stopping = bool(stop_after and done >= stop_after)
            if (step + 1) % self.checkpoint_every == 0 or step + 1 == self.steps or stopping:
                self.checkpoint(step + 1, losses)
            if stopping:
                break
        bar.close()

    def step(self, step: int) -> float:
        """One optimizer step; its loss."""
        shards = self.shards
        loss = shards.step(self.loss_fn, step) if shards is not None else self.loss_fn(self.model, step)
        if not torch.isfinite(loss):
            from diffstudio.errors import NaNError

            raise NaNError(f"loss became {loss.item()} at step {step}; lower the learning rate or use fp32. "
                           f"The last checkpoint in {self.out_dir} is intact.")
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        # several processes: their gradients are averaged here (a sharded run's by FSDP's reduce-scatter)
        if self.accelerator.num_processes > 1 and shards is None:
            _average_gradients(self.params, self.accelerator.num_processes)
        if self.grad_clip:
            self.accelerator.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        if self.ema is not None:
            self.ema.update()
        return float(loss.detach())

    def checkpoint(self, step: int, losses: list[float]) -> None:
        """Save the state after ``step`` steps (gathering a sharded model's shards takes every process)."""
        main = self.accelerator.is_main_process
        state = None
        if self.shards is not None or main:
            state = _checkpoint_state(self.accelerator.unwrap_model(self.model), self.optimizer, self.trainable_only,
                                      self.ema, sharded=self.shards is not None, keep=main)
        if main:
            _save(state, self.out_dir, step, losses, self.recipe)


def _broadcast_parameters(params) -> None:
    """Every process starts from process 0's trainable weights."""
    for p in params:
        torch.distributed.broadcast(p.data, src=0)


def _average_gradients(params, processes: int) -> None:
    """The mean over the processes of each trainable parameter's gradient (each process's loss is the mean of
    its equal share of the batch, so this is the gradient of the whole batch's mean loss)."""
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(processes)


def lr_factor(step: int, steps: int, warmup: int, lr: float, lr_end: float | None) -> float:
    """The learning rate at ``step`` as a fraction of ``lr``, a function of the absolute step (so a resumed
    run continues the same curve): linear warm-up, then constant or a half cosine down to ``lr_end``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if lr_end is None:
        return 1.0
    done = (step - warmup) / max(1, steps - 1 - warmup)
    return (lr_end + (lr - lr_end) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))) / lr


def schedule_depends_on_steps(lr_end: float | None) -> bool:
    """Whether ``lr_factor`` at a given step changes with the total step count: only the cosine to ``lr_end``
    does (warm-up and the constant rate are functions of the step alone). A constant-rate run may therefore
    be continued to more steps and still equal a run started with that many."""
    return lr_end is not None


def _optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw_fused":
        # torch's fused kernel (CPU and CUDA) updates every tensor in one pass, where the default on CPU loops
        # over tensors in Python (33 ms a step for the 10.5 M-parameter demo model, 7 fused:
        # tools/shapes/adamw_step.py). Not the default: its rounding differs in the last bit, so runs
        # made with "adamw" would not repeat exactly.
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    if name == "adamw8bit":
        from diffstudio.train.extras import require

        require("bitsandbytes", "optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    from diffstudio.errors import InvalidInputError

    raise InvalidInputError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
