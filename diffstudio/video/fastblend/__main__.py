"""``python -m diffstudio.video.fastblend ...``: the ``diffstudio fastblend`` command, standalone."""

import os

# OpenMP threads that spin while waiting make torch 10-100x slower on a CPU shared with other
# jobs (measured on a busy 2-core machine); waiting passively costs almost nothing when idle.
# It must be set before torch starts its thread pool, so before the imports below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from diffstudio.video.fastblend.cli import main  # noqa: E402

raise SystemExit(main())
