"""The loaded models: at most ``size`` kept, the least recently used dropped first.

Only the job worker thread loads and uses models, so the cache needs no lock of its own; the lock guards
the listing other threads read (``loaded``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from diffstudio.errors import InvalidInputError
from diffstudio.server.catalog import Catalog, Entry


def load_entry(entry: Entry):
    """The default loader: ``diffstudio.load`` of the entry's path (the demo model by its packaged path)."""
    import diffstudio

    return diffstudio.load(entry.path)


class ModelCache:
    """name -> ``diffstudio.Pipeline`` over the loaded model, with LoRA tags looked up in the catalog's folders."""

    def __init__(self, catalog: Catalog, size: int = 1, loader: Callable[[Entry], object] | None = None):
        if size < 1:
            raise InvalidInputError(f"the model cache must hold at least one model, got {size}")
        self.catalog, self.size = catalog, size
        self.loader = loader or load_entry
        self._pipes: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def pipeline(self, name: str):
        """The pipeline of checkpoint ``name`` (loaded now when it is not), marked most recently used."""
        import diffstudio

        entry = self.catalog.checkpoint(name)
        with self._lock:
            pipe = self._pipes.get(entry.name)
            if pipe is not None:
                self._pipes.move_to_end(entry.name)
                return pipe
            while len(self._pipes) >= self.size:  # free the memory before loading the next one
                self._pipes.popitem(last=False)
        pipe = diffstudio.Pipeline(self.loader(entry), lora_dirs=self.catalog.lora_dirs)
        with self._lock:
            self._pipes[entry.name] = pipe
        return pipe

    def use_catalog(self, catalog: Catalog) -> None:
        """A rescanned catalog: its LoRA folders apply to the loaded pipelines' ``<lora:...>`` tags too."""
        with self._lock:
            self.catalog = catalog
            for pipe in self._pipes.values():
                pipe.lora_dirs = catalog.lora_dirs

    @property
    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._pipes)
