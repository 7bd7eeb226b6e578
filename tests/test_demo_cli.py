"""`python -m diffstudio.demo evaluate`: its options reach the evaluation."""

from __future__ import annotations

import json
import sys

import pytest

from diffstudio.demo import __main__ as demo_cli
from diffstudio.loader import default_model_path


@pytest.mark.skipif(not default_model_path().exists(), reason="the demo model is not built")
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
