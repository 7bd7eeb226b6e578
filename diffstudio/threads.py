"""CPU threads for diffstudio's entry points: a wait policy that survives a busy machine.

torch runs its CPU kernels on an OpenMP pool (GNU libgomp in the pip wheels; Intel's libiomp in
some builds). By default an idle OpenMP thread spins for a while before it sleeps, so that the next
parallel region starts without a wake-up. On a machine where other processes want the same cores
that is a disaster: each parallel region ends in a barrier, the threads that arrived spin while
the one that was descheduled waits for a core that the spinners occupy, and a one-second generation
on a busy 2-core machine took 11-51 s (docs/benchmarks.md, "Threads on a loaded machine"). Waiting
passively (sleeping on a futex) costs microseconds per region when the machine is idle.

The runtimes read these variables once, when the library is loaded (``import torch``), so
:func:`prepare_threads` must run before that: every command-line entry point calls it first
(``diffstudio``, ``python -m diffstudio``, ``python -m diffstudio.demo``,
``python -m diffstudio.video.fastblend``). Library users set the variables themselves, in the
shell or before their first ``import torch``::

    OMP_WAIT_POLICY=PASSIVE KMP_BLOCKTIME=0 python my_script.py

A variable the user has set is never changed.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# variable -> value: the GNU runtime's wait policy; the Intel runtime's spin time before sleeping (ms)
WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


def prepare_threads(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the passive wait policy where the user has not chosen one; returns what was set.

    Call it before torch is imported (it does not import torch). Afterwards it changes nothing
    for the runtime already loaded, so it warns nobody: the entry points call it first.
    """
    environ = os.environ if environ is None else environ
    chosen = {name: value for name, value in WAIT_POLICY.items() if name not in environ}
    environ.update(chosen)
    return chosen


def set_threads(threads: int | None) -> int:
    """Use ``threads`` CPU threads for torch's kernels (None: leave torch's default); returns the count.

    torch's default is OMP_NUM_THREADS when set, else the number of physical cores. With the
    passive wait policy that default no longer collapses when other processes share the cores
    (docs/benchmarks.md: on a loaded 2-core machine two threads stayed as fast as one), so the
    command line keeps it unless ``--threads`` says otherwise.
    """
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
