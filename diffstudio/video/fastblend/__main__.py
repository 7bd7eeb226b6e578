"""``python -m diffstudio.video.fastblend ...``: the ``diffstudio fastblend`` command, standalone."""

from diffstudio.video.fastblend.cli import main

raise SystemExit(main())
