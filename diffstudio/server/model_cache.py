"""The loaded models: at most ``size`` kept, the least recently used dropped first.

Image checkpoints and video models (SVD, CogVideoX) share the one LRU: each held model is keyed by what it is
(``"image"`` / ``"video"``), its catalog name and, for SVD, the ExVideo extensions grafted onto it, so a model
loaded with an extension is never handed to a job that asked for the plain one.

Only the job worker thread loads and uses models, so the cache needs no lock of its own; the lock guards
the listing other threads read (``loaded``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from diffstudio.errors import InvalidInputError
from diffstudio.server.catalog import Catalog, Entry

IMAGE, VIDEO = "image", "video"


def load_entry(entry: Entry):
    """The default loader: ``diffstudio.load`` of the entry's path (the demo model by its packaged path)."""
    import diffstudio

    return diffstudio.load(entry.path)


def load_video_entry(entry: Entry, extensions: tuple[Entry, ...] = ()):
    """The default video loader: SVD by ``load_svd`` (a single file or a diffusers folder, ExVideo extensions
    grafted on), CogVideoX by ``diffstudio.load``."""
    if entry.family == "svd":
        from diffstudio.video.svd_loading import load_svd

        return load_svd(entry.path, *(e.path for e in extensions))
    if extensions:
        raise InvalidInputError(f"ExVideo extensions extend SVD models; {entry.name} is {entry.family}")
    return load_entry(entry)


class ModelCache:
    """name -> ``diffstudio.Pipeline`` over the loaded model, with LoRA tags looked up in the catalog's folders;
    and video models (``video_models``) by name, held in the same LRU."""

    def __init__(self, catalog: Catalog, size: int = 1, loader: Callable[[Entry], object] | None = None,
                 video_loader: Callable[..., object] | None = None):
        if size < 1:
            raise InvalidInputError(f"the model cache must hold at least one model, got {size}")
        self.catalog, self.size = catalog, size
        self.loader = loader or load_entry
        self.video_loader = video_loader or load_video_entry
        self._held: OrderedDict[tuple, object] = OrderedDict()  # (kind, name, *extensions) -> pipeline / models
        self._lock = threading.Lock()

    def _get(self, key: tuple, make: Callable[[], object]):
        with self._lock:
            held = self._held.get(key)
            if held is not None:
                self._held.move_to_end(key)
                return held
            while len(self._held) >= self.size:  # free the memory before loading the next one
                self._held.popitem(last=False)
        held = make()
        with self._lock:
            self._held[key] = held
        return held

    def pipeline(self, name: str):
        """The pipeline of checkpoint ``name`` (loaded now when it is not), marked most recently used."""
        import diffstudio

        entry = self.catalog.checkpoint(name)
        return self._get((IMAGE, entry.name),
                         lambda: diffstudio.Pipeline(self.loader(entry), lora_dirs=self.catalog.lora_dirs))

    def video_models(self, name: str, family: str | None = None, extensions: tuple[str, ...] = ()):
        """The loaded models of video model ``name`` (``SVDModels`` or a CogVideoX ``diffstudio.load`` result),
        with the named ExVideo extensions grafted on (SVD only), marked most recently used."""
        entry = self.catalog.video_model(name, family)
        exts = tuple(self.catalog.exvideo_extension(e) for e in extensions)
        key = (VIDEO, entry.name, *(e.name for e in exts))
        return self._get(key, lambda: self.video_loader(entry, exts))

    def use_catalog(self, catalog: Catalog) -> None:
        """A rescanned catalog: its LoRA folders apply to the loaded pipelines' ``<lora:...>`` tags too."""
        with self._lock:
            self.catalog = catalog
            for (kind, *_), held in self._held.items():
                if kind == IMAGE:
                    held.lora_dirs = catalog.lora_dirs

    @property
    def loaded(self) -> list[str]:
        """The held models' names (a video model with extensions: ``name+extension``)."""
        with self._lock:
            return ["+".join(name) for _, *name in self._held]
