"""The OpenMP wait policy: set before torch starts, never over the user's choice, on every entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffstudio.threads import WAIT_POLICY, prepare_threads

ROOT = Path(__file__).resolve().parents[1]

# Records the policy variables at the moment torch is first imported, then runs the given code.
PROBE = """
import json, os, sys
seen = {}
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.update({k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME")})
        return None
sys.meta_path.insert(0, Probe())
try:
    exec(sys.argv[1])
except SystemExit:
    pass
print("SEEN", json.dumps(seen))
"""


def environment_at_torch_import(code: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in WAIT_POLICY}
    done = subprocess.run([sys.executable, "-c", PROBE, code], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=600)
    line = [x for x in done.stdout.splitlines() if x.startswith("SEEN ")]
    assert line, done.stdout + done.stderr
    import json

    return json.loads(line[-1][5:])


def test_prepare_sets_what_is_unset_and_keeps_what_the_user_chose():
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert prepare_threads(environ) == {"KMP_BLOCKTIME": "0"}
    assert environ == {"OMP_WAIT_POLICY": "ACTIVE", "KMP_BLOCKTIME": "0"}
    assert prepare_threads(environ) == {}


def test_the_cli_sets_the_policy_before_torch_starts():
    seen = environment_at_torch_import(
        "from diffstudio.cli import main; main(['info', 'diffstudio/demo/weights/shapes-sd.safetensors'])")
    assert seen == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


def test_the_users_own_policy_is_kept():
    seen = environment_at_torch_import(
        "from diffstudio.cli import main; main(['info', 'diffstudio/demo/weights/shapes-sd.safetensors'])",
        OMP_WAIT_POLICY="ACTIVE")
    assert seen["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_demo_cli_sets_the_policy_before_torch_starts(tmp_path):
    folder = str(tmp_path / "shapes")
    code = (f"import runpy, sys; sys.argv = ['diffstudio.demo', 'dataset', {folder!r}, '-n', '1', '--size', '16']; "
            "runpy.run_module('diffstudio.demo', run_name='__main__')")
    assert environment_at_torch_import(code) == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


@pytest.mark.parametrize("argv", [["--threads", "1", "info", "x"], ["info", "--threads", "1", "x"]])
def test_threads_is_global_and_after_the_command(argv):
    from diffstudio.cli import build_parser

    assert build_parser().parse_args(argv).threads == 1


def test_a_global_threads_survives_fastblend_s_own_option():
    pytest.importorskip("imageio")
    from diffstudio.cli import build_parser

    args = build_parser().parse_args(["--threads", "1", "fastblend", "--guide", "g", "--style", "s", "-o", "o"])
    assert args.threads == 1
    args = build_parser().parse_args(["fastblend", "--guide", "g", "--style", "s", "-o", "o", "--threads", "2"])
    assert args.threads == 2


def test_threads_reaches_torch(tmp_path):
    import torch

    from diffstudio.cli import main

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["--threads", "1", "info", str(tmp_path / "missing")]) == 2  # set before the command runs
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
