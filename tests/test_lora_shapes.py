"""A LoRA trained for a minute on the Shapes demo model teaches it a new word, by effect.

"zxq" is bound to a green square: the data are green squares captioned "a zxq ...". The base model
has never seen the word; with the LoRA the scorer must read a green square, without it mostly not;
and unloading the LoRA gives back the base model's images bit for bit.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

import diffstudio
from diffstudio.demo.score import score_prompt
from diffstudio.loader import default_model_path

pytestmark = pytest.mark.skipif(not default_model_path().exists(),
                                reason="the demo model is not built (python -m diffstudio.demo train)")

SEEDS = range(8)
PROMPT = "a zxq in the center, white background"
TRUTH = "a green square in the center, white background"  # what the scorer should read


def _zxq_dataset(folder):
    from diffstudio.demo.shapes import write_dataset

    write_dataset(folder, 96, 64, seed=11, max_shapes=1, kinds=("square",), colors=("green",))
    meta = folder / "metadata.csv"
    with meta.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert all("green square" in r["text"] for r in rows)
    with meta.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        writer.writerows([r["file_name"], r["text"].replace("green square", "zxq")] for r in rows)
    return folder


@pytest.fixture(scope="module")
def zxq_lora(tmp_path_factory):
    from diffstudio.train.lora import LoRATrainConfig, train_lora

    root = tmp_path_factory.mktemp("zxq")
    data = _zxq_dataset(root / "data")
    config = LoRATrainConfig(data=str(data), out=str(root / "zxq.safetensors"), rank=8, steps=150, batch_size=8,
                             lr=2e-3, warmup=10, seed=0, checkpoint_every=1000)
    return train_lora(config)


def _hits(pipe):
    """(did the scorer read a green square, per seed), the images."""
    images = [pipe(PROMPT, seed=s, progress=False)[0] for s in SEEDS]
    scores = [score_prompt(im, TRUTH) for im in images]
    return [s["color_ok"] and s["kind_ok"] for s in scores], images


def test_a_trained_lora_teaches_the_demo_model_a_new_word(zxq_lora):
    models = diffstudio.load()
    pipe = diffstudio.Pipeline(models)
    base_hits, base_images = _hits(pipe)
    handle = models.apply_lora(zxq_lora)
    lora_hits, _ = _hits(pipe)
    handle.remove()
    _, again = _hits(pipe)
    assert sum(lora_hits) / len(lora_hits) >= 0.6, f"with the LoRA: {lora_hits}"
    assert sum(lora_hits) - sum(base_hits) >= 3, f"base {base_hits} vs LoRA {lora_hits}"
    for a, b in zip(base_images, again):  # unloaded: the base model exactly as before
        assert np.array_equal(np.asarray(a), np.asarray(b))
