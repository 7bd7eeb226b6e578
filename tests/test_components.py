"""The architecture records and the rule engine under every converter."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import diffstudio
from diffstudio.components import ARCHS, ComponentArch
from diffstudio.convert.rules import CONV_1X1, SWAP_HALVES, Fuse, apply_to_ours, from_canonical, rule, to_canonical
from diffstudio.errors import ConversionError

PACKAGE = Path(diffstudio.__file__).parent


@pytest.mark.parametrize("name", list(ARCHS))
def test_each_record_holds_real_references(name):
    arch = ARCHS[name]
    assert isinstance(arch, ComponentArch) and arch.name == name
    for sentinels in (arch.sentinels, arch.diffusers_sentinels):
        assert isinstance(sentinels, tuple) and sentinels and all(isinstance(k, str) and ":" not in k
                                                                 for k in sentinels)
    for field in ("derive_config", "config_from_diffusers", "build", "from_diffusers", "to_diffusers",
                  "config_to_dict", "config_from_dict"):
        assert callable(getattr(arch, field)), field


def _diffstudio_imports(path: Path) -> set[str]:
    """Every diffstudio module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffstudio"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("diffstudio"))
    return found


def test_models_import_nothing_above_them():
    for path in sorted((PACKAGE / "models").glob("*.py")):
        above = {m for m in _diffstudio_imports(path) if not m.startswith(("diffstudio.models", "diffstudio.errors"))}
        assert not above, f"{path.name} imports {above}"


def test_converters_and_detection_do_not_import_the_registry():
    for folder in ("convert", "detect/vae.py", "detect/flux.py", "detect/mmdit.py", "detect/hunyuan_dit.py"):
        for path in [PACKAGE / folder] if folder.endswith(".py") else sorted((PACKAGE / folder).glob("*.py")):
            assert not {m for m in _diffstudio_imports(path) if m.startswith("diffstudio.components")}, path.name


# ---- the rule engine -----------------------------------------------------------------------------------


def test_longest_prefix_wins_and_the_rest_carries_over():
    rules = [rule("blocks.0.norm1", "blocks.0.norm1.norm"), rule("blocks.0.mod", "blocks.0.norm1.linear"),
             rule("blocks.0.norm2", "blocks.0.norm3"), rule("blocks.0.norm3", "blocks.0.norm2")]
    theirs = {k: torch.full((2,), float(i)) for i, k in enumerate(
        ["blocks.0.norm1.norm.weight", "blocks.0.norm1.linear.bias", "blocks.0.norm2.weight", "blocks.0.norm3.weight"])}
    done = apply_to_ours(theirs, rules)
    assert done.out.keys() == {"blocks.0.norm1.weight", "blocks.0.mod.bias", "blocks.0.norm3.weight",
                               "blocks.0.norm2.weight"}
    assert done.out["blocks.0.mod.bias"] is theirs["blocks.0.norm1.linear.bias"]  # renamed, not copied
    assert torch.equal(done.out["blocks.0.norm3.weight"], theirs["blocks.0.norm2.weight"])


def test_transforms_invert_each_other():
    g = torch.Generator().manual_seed(0)
    ours = {"qkv.weight": torch.randn(10, 3, generator=g), "qkv.bias": torch.randn(10, generator=g),
            "ada.weight": torch.randn(4, 3, generator=g), "q.weight": torch.randn(3, 3, 1, 1, generator=g)}
    rules = [rule("qkv", ("to_q", "to_k", "to_mlp"), Fuse((3, 3, 4))), rule("ada", "norm_out", SWAP_HALVES),
             rule("q", "to_q_linear", CONV_1X1), rule("q", "query", CONV_1X1, read_only=True)]
    theirs = from_canonical("test", ours, rules, ours)
    assert set(theirs) == {"to_q.weight", "to_k.weight", "to_mlp.weight", "to_q.bias", "to_k.bias", "to_mlp.bias",
                           "norm_out.weight", "to_q_linear.weight"}  # the read-only spelling is never written
    assert theirs["to_mlp.weight"].shape == (4, 3) and theirs["to_q_linear.weight"].shape == (3, 3)
    assert torch.equal(theirs["norm_out.weight"][:2], ours["ada.weight"][2:])
    back = to_canonical("test", theirs, rules, ours)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    older = {("query.weight" if k == "to_q_linear.weight" else k): v for k, v in theirs.items()}
    assert torch.equal(to_canonical("test", older, rules, ours)["q.weight"], ours["q.weight"])


def test_the_check_names_absent_parts_and_bad_splits():
    rules = [rule("qkv", ("to_q", "to_k", "to_v"), Fuse())]
    with pytest.raises(ConversionError, match=r"qkv.weight needs to_k.weight"):
        to_canonical("test", {"to_q.weight": torch.zeros(2, 2), "to_v.weight": torch.zeros(2, 2)}, rules, None)
    with pytest.raises(ConversionError, match="matched no rule: extra.weight"):
        to_canonical("test", {"extra.weight": torch.zeros(1)}, rules, None)
    with pytest.raises(ConversionError, match="do not split into 3 equal parts"):
        from_canonical("test", {"qkv.weight": torch.zeros(7, 2)}, rules, {"qkv.weight": torch.zeros(6, 2)})
