"""`python -m diffstudio.demo train|evaluate`: their options reach the build and the evaluation."""

from __future__ import annotations

import json
import sys

import pytest

from diffstudio.demo import __main__ as demo_cli


@pytest.mark.parametrize("argv,cfg,seed", [([], 3.0, 1000), (["--cfg", "4.5", "--seed", "5000"], 4.5, 5000)])
def test_evaluate_takes_the_guidance_scale_and_the_first_seed(monkeypatch, capsys, argv, cfg, seed):
    from diffstudio.demo import evaluate as evaluation

    seen = {}

    def fake_evaluate(models, pairs, steps, sampler, seed):
        seen.update(cfg=models.defaults["cfg_scale"], seed=seed, pairs=pairs)
        return {"pairs": pairs}

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    monkeypatch.setattr(sys, "argv", ["diffstudio.demo", "evaluate", "--pairs", "7", *argv])
    demo_cli.main()
    assert seen == {"cfg": cfg, "seed": seed, "pairs": 7}
    assert json.loads(capsys.readouterr().out) == {"pairs": 7}


def test_train_without_flags_is_the_recipe_recorded_in_the_shipped_file(monkeypatch):
    """The documented command (`python -m diffstudio.demo train`) must rebuild the shipped file: every recipe
    value the file records about itself is what the command passes to the build (or the build's default)."""
    import functools
    import inspect

    from safetensors import safe_open

    from diffstudio.demo import build as recipe
    from diffstudio.loader import default_model_path

    with safe_open(str(default_model_path()), "pt") as f:
        shipped = json.loads(f.metadata()["diffstudio.training"])
    defaults = {name: p.default for name, p in inspect.signature(recipe.build).parameters.items()}
    seen = {}
    spy = functools.wraps(recipe.build)(lambda out, workdir, **kw: seen.update(kw))  # keeps build's signature
    monkeypatch.setattr(recipe, "build", spy)
    monkeypatch.setattr(sys, "argv", ["diffstudio.demo", "train"])
    demo_cli.main()
    used = {**defaults, **seen}
    compared = [k for k in shipped if k in used]
    assert len(compared) >= 12  # steps of every stage, batches, rates, optimizer, edge weight, seed
    assert {k: used[k] for k in compared} == {k: shipped[k] for k in compared}
