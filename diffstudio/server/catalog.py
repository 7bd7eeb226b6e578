"""What a server can load: the checkpoints, LoRAs, ControlNets, IP-Adapters and motion modules under its models
folder.

A1111's folder layout is understood, and files elsewhere are placed by what they hold:

* ``FOLDER/Lora`` and ``FOLDER/LyCORIS``: LoRA files (any depth); ``FOLDER/ControlNet``: ControlNets (and
  IP-Adapters, which A1111's ControlNet extension keeps there, told apart by their header);
* ``FOLDER/AnimateDiff`` or ``FOLDER/animatediff_models`` (the A1111 extension's and ComfyUI's names): AnimateDiff
  motion modules, ``.ckpt`` included (listed by folder, opened only when used, weights-only);
* ``FOLDER/ipadapter`` or ``FOLDER/IP-Adapter`` (ComfyUI's and h94's names): IP-Adapters, ``.safetensors`` told
  by their header and ``.bin`` by their folder (``image_encoder`` folders inside are the adapters' encoders);
* any other ``.safetensors`` file: a LoRA when its keys are LoRA factor names (``lora_down``, ``lora_A``,
  ``hada_w1_a`` ...), else whatever ``diffstudio.detect`` makes of its header (names and shapes only, no
  weights read): a whole model, a ControlNet, an IP-Adapter, a motion module, or a lone component (not listed);
* ``.ckpt`` / ``.pt`` / ``.pth`` files outside those folders: checkpoints (pickles are never opened to list them);
* a folder with ``model_index.json``: a diffusers model; with a ControlNetModel ``config.json``: a ControlNet.

Video models are listed apart from the image checkpoints (``video_models``), by the same content rules: a
single file ``diffstudio.detect`` places in the ``svd`` or ``cogvideox`` family (svd.safetensors,
svd_xt.safetensors, a CogVideoX transformer file), or a diffusers folder whose ``model_index.json`` names a
pipeline of those families (``StableVideoDiffusionPipeline``, ``CogVideoXPipeline``,
``CogVideoXImageToVideoPipeline`` ...). ExVideo-SVD extension files (the extra position tables and temporal
weights grafted onto an SVD UNet) are told by their keys and listed as ``exvideo_extensions``.

The packaged Shapes demo model is always listed (as ``shapes-sd``), with its IP-Adapter (``shapes-ip-adapter``,
its image encoder bundled) and its motion module (``shapes-motion``). Every entry is a file found under the models
folder (or the demo's), so a name a client sends can only ever reach those files.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from diffstudio.errors import InvalidInputError, ModelNotFoundError

log = logging.getLogger("diffstudio.server")

DEMO_NAME = "shapes-sd"
DEMO_IP_ADAPTER = "shapes-ip-adapter"
DEMO_MOTION = "shapes-motion"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
LORA_FOLDERS = ("Lora", "LyCORIS")
CONTROLNET_FOLDERS = ("ControlNet",)
IP_ADAPTER_FOLDERS = ("ipadapter", "IP-Adapter")
MOTION_FOLDERS = ("AnimateDiff", "animatediff_models")
VIDEO_FAMILIES = ("svd", "cogvideox")  # families run by a video pipeline of their own: listed as video models
IP_ADAPTER_ENCODER_FOLDER = "image_encoder"  # inside an IP-Adapter folder: an adapter's image encoder, not listed
# Key fragments only LoRA-style files hold (kohya, LyCORIS, peft, diffusers' old processor names).
_LORA_KEY = re.compile(r"lora_down|lora_up|lora_A\.|lora_B\.|hada_w1|lokr_w1|lora_linear_layer|_lora\.(down|up)")


@dataclass(frozen=True)
class Entry:
    """One loadable thing: its client-facing name, its path, and its kind."""

    name: str  # checkpoints: the path under the models folder; LoRAs / ControlNets: the file stem
    path: Path
    kind: str  # "checkpoint" | "lora" | "controlnet" | "ip_adapter" | "motion" | "video" | "exvideo"
    family: str | None = None  # video models: "svd" or "cogvideox"


@dataclass
class Catalog:
    """The scanned models folder (``Catalog.scan``); looked up by name, never by a client's path."""

    root: Path | None
    checkpoints: dict[str, Entry] = field(default_factory=dict)
    loras: dict[str, Entry] = field(default_factory=dict)
    controlnets: dict[str, Entry] = field(default_factory=dict)
    ip_adapters: dict[str, Entry] = field(default_factory=dict)
    motion_modules: dict[str, Entry] = field(default_factory=dict)
    video_models: dict[str, Entry] = field(default_factory=dict)  # SVD and CogVideoX, by path under the folder
    exvideo_extensions: dict[str, Entry] = field(default_factory=dict)  # ExVideo-SVD extension files, by stem
    _walked: set = field(default_factory=set, repr=False)  # folders listed (links inside may form loops)

    @classmethod
    def scan(cls, root: str | Path | None) -> Catalog:
        from diffstudio.loader import default_model_path

        catalog = cls(None if root is None else Path(root).expanduser().resolve())
        if catalog.root is not None:
            if not catalog.root.is_dir():
                raise ModelNotFoundError(f"models folder not found: {catalog.root}; pass an existing folder")
            catalog._walk(catalog.root, kind=None)
        catalog.checkpoints.setdefault(DEMO_NAME, Entry(DEMO_NAME, default_model_path(), "checkpoint", "sd15"))
        demo_adapter = default_model_path().parent / f"{DEMO_IP_ADAPTER}.safetensors"
        catalog.ip_adapters.setdefault(DEMO_IP_ADAPTER, Entry(DEMO_IP_ADAPTER, demo_adapter, "ip_adapter", "sd15"))
        demo_motion = default_model_path().parent / f"{DEMO_MOTION}.safetensors"
        catalog.motion_modules.setdefault(DEMO_MOTION, Entry(DEMO_MOTION, demo_motion, "motion", "sd15"))
        return catalog

    # -- lookups -------------------------------------------------------------------------------
    @property
    def default_checkpoint(self) -> str:
        """The first checkpoint of the folder by name; the demo model when it holds none."""
        found = sorted(n for n in self.checkpoints if n != DEMO_NAME)
        return found[0] if found else DEMO_NAME

    def checkpoint(self, name: str) -> Entry:
        """A checkpoint by name, by A1111 title (``name [hash]``) or by file stem."""
        name = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", str(name).strip())
        if name in self.checkpoints:
            return self.checkpoints[name]
        by_stem = [e for e in self.checkpoints.values() if Path(e.name).stem == name or Path(e.name).name == name]
        if len(by_stem) == 1:
            return by_stem[0]
        raise ModelNotFoundError(f"no checkpoint named {name!r} on this server; GET /sdapi/v1/sd-models lists them: "
                                 f"{', '.join(sorted(self.checkpoints))}")

    def controlnet(self, name: str) -> Entry:
        stem = Path(str(name)).stem if Path(str(name)).suffix in CHECKPOINT_SUFFIXES else str(name)
        if stem in self.controlnets:
            return self.controlnets[stem]
        known = ", ".join(sorted(self.controlnets)) or "none (put them under MODELS/ControlNet)"
        raise InvalidInputError(f"no ControlNet named {name!r} on this server; known: {known}")

    def ip_adapter(self, name: str) -> Entry:
        stem = Path(str(name)).stem if Path(str(name)).suffix in (*CHECKPOINT_SUFFIXES, ".bin") else str(name)
        if stem in self.ip_adapters:
            return self.ip_adapters[stem]
        raise InvalidInputError(f"no IP-Adapter named {name!r} on this server; known: "
                                f"{', '.join(sorted(self.ip_adapters))} (GET /v1/models lists them)")

    def motion_module(self, name: str) -> Entry:
        stem = Path(str(name)).stem if Path(str(name)).suffix in CHECKPOINT_SUFFIXES else str(name)
        if stem in self.motion_modules:
            return self.motion_modules[stem]
        raise InvalidInputError(f"no motion module named {name!r} on this server; known: "
                                f"{', '.join(sorted(self.motion_modules))} (put them under MODELS/AnimateDiff)")

    def video_model(self, name: str, family: str | None = None) -> Entry:
        """A video model by name (its path under the models folder, or its file / folder name); ``family``
        (``svd`` / ``cogvideox``): it must be one of those."""
        name = str(name).strip()
        entry = self.video_models.get(name)
        if entry is None:
            found = [e for e in self.video_models.values() if name in (Path(e.name).stem, Path(e.name).name)]
            entry = found[0] if len(found) == 1 else None
        known = [n for n, e in sorted(self.video_models.items()) if family is None or e.family == family]
        if entry is None or (family is not None and entry.family != family):
            what = {"svd": "SVD model", "cogvideox": "CogVideoX model"}.get(family, "video model")
            raise InvalidInputError(f"no {what} named {name!r} on this server; known: "
                                    f"{', '.join(known) or 'none'} (GET /v1/models lists them as video_models)")
        return entry

    def exvideo_extension(self, name: str) -> Entry:
        stem = Path(str(name)).stem if Path(str(name)).suffix in CHECKPOINT_SUFFIXES else str(name)
        if stem in self.exvideo_extensions:
            return self.exvideo_extensions[stem]
        raise InvalidInputError(f"no ExVideo extension named {name!r} on this server; known: "
                                f"{', '.join(sorted(self.exvideo_extensions)) or 'none'}")

    @property
    def lora_dirs(self) -> list[Path]:
        """The folders ``<lora:name:w>`` tags are looked up in: the A1111 ones, then those of detected LoRAs."""
        dirs = [self.root / d for d in LORA_FOLDERS if self.root is not None and (self.root / d).is_dir()]
        for entry in self.loras.values():
            if not any(entry.path.is_relative_to(d) for d in dirs):
                dirs.append(entry.path.parent)
        return list(dict.fromkeys(dirs))

    def check_lora_path(self, name: str, path: Path) -> None:
        """Refuse a tag whose name resolved to a file that is not one of this catalog's LoRAs."""
        if path.resolve() not in {e.path for e in self.loras.values()}:
            raise InvalidInputError(f"<lora:{name}> is not a LoRA of this server; GET /sdapi/v1/loras lists them: "
                                    f"{', '.join(sorted(self.loras)) or 'none'}")

    # -- scanning ------------------------------------------------------------------------------
    def _walk(self, folder: Path, kind: str | None) -> None:
        if folder.resolve() in self._walked:
            return
        self._walked.add(folder.resolve())
        try:
            children = sorted(folder.iterdir())
        except OSError as err:
            log.warning("cannot list %s: %s", folder, err)
            return
        for child in children:
            if child.name.startswith("."):
                continue
            if child.is_symlink() and not child.resolve().is_relative_to(self.root):
                log.warning("skipping %s: a link out of the models folder", child)
                continue
            if child.is_dir():
                self._folder(child, kind)
            elif child.suffix.lower() in CHECKPOINT_SUFFIXES or (kind == "ip_adapter" and child.suffix == ".bin"):
                self._file(child, kind)

    def _folder(self, folder: Path, kind: str | None) -> None:
        from diffstudio.controlnet_loading import is_controlnet_folder

        if (folder / "model_index.json").is_file():
            family = _video_family_of_folder(folder)
            self._add(Entry(self._relative(folder), folder.resolve(), "checkpoint" if family is None else "video",
                            family))
        elif is_controlnet_folder(folder):
            self._add(Entry(folder.name, folder.resolve(), "controlnet"))
        elif kind is None and folder.parent == self.root and folder.name in LORA_FOLDERS:
            self._walk(folder, "lora")
        elif kind is None and folder.parent == self.root and folder.name in CONTROLNET_FOLDERS:
            self._walk(folder, "controlnet")
        elif kind is None and folder.parent == self.root and folder.name in IP_ADAPTER_FOLDERS:
            self._walk(folder, "ip_adapter")
        elif kind is None and folder.parent == self.root and folder.name in MOTION_FOLDERS:
            self._walk(folder, "motion")
        elif kind == "ip_adapter" and folder.name == IP_ADAPTER_ENCODER_FOLDER:
            return
        else:
            self._walk(folder, kind)

    def _file(self, path: Path, kind: str | None) -> None:
        family = None
        safetensors = path.suffix.lower() == ".safetensors"
        if kind is None:
            kind, family = _kind_by_content(path) if safetensors else ("checkpoint", None)
        elif kind in ("controlnet", "ip_adapter") and safetensors:
            # A1111 keeps IP-Adapters among the ControlNets: the header tells them apart.
            is_adapter = _kind_by_content(path)[0] == "ip_adapter"
            kind = "ip_adapter" if is_adapter else "controlnet" if kind == "controlnet" else None
        elif kind == "motion" and safetensors and _kind_by_content(path)[0] != "motion":
            kind = None  # something else kept among the motion modules
        if kind is not None:
            name = self._relative(path) if kind in ("checkpoint", "video") else path.stem
            self._add(Entry(name, path.resolve(), kind, family))

    def _add(self, entry: Entry) -> None:
        table = {"checkpoint": self.checkpoints, "lora": self.loras, "controlnet": self.controlnets,
                 "ip_adapter": self.ip_adapters, "motion": self.motion_modules, "video": self.video_models,
                 "exvideo": self.exvideo_extensions}[entry.kind]
        if entry.name in table:
            log.warning("two %ss named %r: %s is used, %s is not listed", entry.kind, entry.name,
                        table[entry.name].path, entry.path)
            return
        table[entry.name] = entry

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def _kind_by_content(path: Path) -> tuple[str | None, str | None]:
    """(kind, family) of a safetensors file from its header alone; kind None = not listed."""
    from diffstudio.detect import detect
    from diffstudio.errors import DiffstudioError
    from diffstudio.io.state_dict import read_state_dict_meta

    try:
        sd, metadata = read_state_dict_meta(path)
    except DiffstudioError as err:
        log.warning("skipping %s: %s", path, err)
        return None, None
    if sum(1 for k in sd if _LORA_KEY.search(k)) * 2 > len(sd):
        return "lora", None
    try:
        detection = detect(sd, metadata)
    except DiffstudioError as err:
        log.warning("skipping %s: %s", path, err)
        return None, None
    if set(detection.components) == {"controlnet"}:
        return "controlnet", detection.family
    if set(detection.components) == {"ip_adapter"}:
        return "ip_adapter", None
    if set(detection.components) == {"motion"}:
        return "motion", detection.family
    if set(detection.components) == {"exvideo"}:
        return "exvideo", None
    if detection.family in VIDEO_FAMILIES:
        return "video", detection.family
    if detection.family is None:
        return None, None  # a lone VAE / text encoder: not something to generate with
    return "checkpoint", detection.family


def _video_family_of_folder(folder: Path) -> str | None:
    """The video family whose diffusers pipeline ``model_index.json`` names (``Family.diffusers_pipelines``);
    None for any other folder (an image model)."""
    from diffstudio.errors import DiffstudioError
    from diffstudio.families import FAMILIES
    from diffstudio.io.folders import read_model_index

    try:
        pipeline = read_model_index(folder).get("_class_name")
    except DiffstudioError as err:
        log.warning("skipping %s: %s", folder, err)
        return None
    for family in FAMILIES:
        if family.name in VIDEO_FAMILIES and pipeline in family.diffusers_pipelines:
            return family.name
    return None
