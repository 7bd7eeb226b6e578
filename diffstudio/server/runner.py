"""What the job worker does for a generation: pick the model, run the pipeline, write the PNGs.

Both APIs turn a request into a :class:`GenerationSpec` (A1111 fields in ``a1111.py``, ours in ``v1.py``);
the worker runs it here. Outputs are written to the outputs folder as ``<job id>-<n>.png`` with their
recipe (an A1111 ``parameters`` chunk and the ``diffstudio`` JSON chunk, ``diffstudio.io.recipe``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffstudio.server.checks import Limits, check_counts
from diffstudio.server.jobs import Job
from diffstudio.server.model_cache import ModelCache


@dataclass
class GenerationSpec:
    """One job's generation, checked as far as it can be without the model.

    request: keyword arguments of ``diffstudio.pipeline.request.Request`` (images already decoded).
    batches: A1111's ``n_iter``: runs of ``batch_size`` images, the seed advancing by ``batch_size`` each.
    controlnets: ``ControlNetUnit``s whose ``model`` is a path from the catalog.
    """

    model: str
    request: dict
    batches: int = 1
    controlnets: list = field(default_factory=list)


def output_name(job_id: str, index: int) -> str:
    return f"{job_id}-{index}.png"


def run_generation(job: Job, cache: ModelCache, outputs: Path, limits: Limits) -> None:
    """Run ``job.work`` (a GenerationSpec); fills ``job.outputs`` and ``job.info["recipes"]``."""
    from diffstudio.io.recipe import save_png
    from diffstudio.pipeline.control import ControlNets
    from diffstudio.pipeline.request import Request

    spec: GenerationSpec = job.work
    pipe = cache.pipeline(spec.model)
    job.check_stop()  # loading may take long: a stop asked meanwhile is honoured before sampling
    # The model's defaults fill what the request left out (a size, the steps): check them against the limits too.
    resolved = Request(**spec.request).resolve(pipe.models)
    check_counts(limits, resolved.width, resolved.height, resolved.steps, resolved.batch_size, spec.batches)
    modules = [ControlNets(spec.controlnets)] if spec.controlnets else []
    batch_size = spec.request.get("batch_size", 1)
    recipes: list[dict] = []
    for b in range(spec.batches):
        request = Request(**{**spec.request, "seed": spec.request.get("seed", 0) + b * batch_size})

        def on_step(i, total, x, denoised, b=b):
            job.steps = total * spec.batches
            job.step = b * total + i + 1
            job.check_stop()

        for image in pipe.run(request, modules=modules, progress=False, callback=on_step):
            name = output_name(job.id, len(job.outputs))
            recipe = image.info["diffstudio_recipe"]
            save_png(image, outputs / name, recipe)
            job.outputs.append(name)
            recipes.append(recipe)
    job.info = {**job.info, "model": spec.model, "recipes": recipes}
