"""``python -m diffstudio ...``: the ``diffstudio`` command line (diffstudio/cli.py)."""

import sys

from diffstudio.cli import main

sys.exit(main())
