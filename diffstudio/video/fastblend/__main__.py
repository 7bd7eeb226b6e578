"""``python -m diffstudio.video.fastblend ...``: the ``diffstudio fastblend`` command, standalone.

The OpenMP wait policy (diffstudio/threads.py) is set here too, but this package's ``__init__``
has imported torch before this file runs, so the runtime has already read it: for the passive
policy run ``diffstudio fastblend`` or set ``OMP_WAIT_POLICY=PASSIVE`` in the shell.
"""

from diffstudio.threads import prepare_threads

prepare_threads()  # reaches subprocesses; see above for this process

from diffstudio.video.fastblend.cli import main  # noqa: E402

raise SystemExit(main())
