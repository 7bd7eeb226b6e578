"""Training needs packages the main install leaves out (the ``train`` extra: accelerate and peft).

They are imported where training starts, so that a missing one is a one-line named error that says what to
install, before any model is loaded.
"""

from __future__ import annotations

import importlib

from diffstudio.errors import MissingExtraError

TRAIN_EXTRA = ("accelerate", "peft")
INSTALL_TRAIN = 'pip install "diffstudio[train]"'


def require(module: str, message: str) -> None:
    """Import ``module`` or raise ``MissingExtraError(message)``."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(message, name=module) from exc


def require_train_extra(*modules: str) -> None:
    """Check that the train extra's packages (all, or the named ones) import."""
    for module in modules or TRAIN_EXTRA:
        require(module, f"training needs {module}, which the main install leaves out: {INSTALL_TRAIN}")
