"""`diffstudio.load(*paths)`: files and folders on disk -> ready-to-run components.

The first path is the base model (a single file in the original layout, or a diffusers
folder); later paths add or replace components (a VAE file, a UNet file, a text
encoder). Modules are built on the meta device and the weights are assigned in the
requested dtype, so a model is never held twice in memory.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffstudio.components import ARCHS
from diffstudio.detect import Component, Detection, detect
from diffstudio.errors import InvalidInputError, ModelNotFoundError, UnknownModelError
from diffstudio.families import get_family
from diffstudio.families.base import Family

DENOISER_ADDON_ROLES = ("motion",)  # components called inside the denoiser's step (offload moves them with it)


@dataclass
class Models:
    """A loaded model: components by role (``models.unet``, ``models.vae``, ...) and its family."""

    family: Family
    components: dict[str, Any]
    configs: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)  # role -> the path it came from
    detection: Detection | None = None
    defaults: dict = field(default_factory=dict)  # this model's own settings over the family's (e.g. size)
    patches: dict = field(default_factory=dict)  # role -> {parameter: [Patch]}: this model's own weight patches
    loras: list = field(default_factory=list)  # the LoRAHandles applied, in order
    embeddings: dict = field(default_factory=dict)  # textual-inversion name -> Embedding (docs/prompts.md)
    controlnets: dict = field(default_factory=dict)  # path -> loaded ControlNet (add_controlnet)
    ip_adapters: dict = field(default_factory=dict)  # (path, encoder) -> LoadedIPAdapter (add_ip_adapter)

    def __getattr__(self, name: str):
        components = self.__dict__.get("components", {})
        if name in components:
            return components[name]
        raise AttributeError(f"this {self.__dict__.get('family').name} model has no component {name!r}; "
                             f"it has: {', '.join(components)}")

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.components[self.family.denoiser_role]

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's compute dtype (its weights may be stored lower: float8, models/lowbit.py)."""
        from diffstudio.models.lowbit import compute_dtype

        return compute_dtype(self.denoiser)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def apply_lora(self, path, strength: float = 1.0, text_strength: float | None = None, mode: str = "merged"):
        """Patch the denoiser and text encoders with a LoRA/LyCORIS file; returns a handle (docs/lora.md)."""
        from diffstudio.patches import apply_lora

        return apply_lora(self, path, strength, text_strength, mode)

    # -- patches: owned by this Models, applied to the shared modules while it is in use ----------
    def activate(self) -> Models:
        """Make this model's patches the ones in its modules' weights (a clone sharing the modules may have
        had its own applied). Cheap when they already are; the pipeline calls it before every run."""
        from diffstudio.patches.patcher import patcher_for

        for role, module in self.components.items():
            if not isinstance(module, torch.nn.Module):
                continue
            patcher = patcher_for(module, create=role in self.patches)
            if patcher is not None:
                patcher.use(self.patches.setdefault(role, {}))
        return self

    def refresh_patches(self, touched: dict[str, set[str]]) -> None:
        """Recompute the named parameters per role from their patches, if this model is the one in use."""
        from diffstudio.patches.patcher import patcher_for

        for role, names in touched.items():
            patcher = patcher_for(self.components[role], create=False)
            if patcher is not None and patcher.in_use(self.patches.get(role, {})):
                patcher.refresh(names)

    def clone(self) -> Models:
        """The same modules (no weight is copied) with copies of the patch lists, LoRA handles and embeddings:
        a LoRA applied to (or removed from, or re-weighted on) the clone leaves this model as it is. Add-ons
        loaded once (ControlNets, IP-Adapters) are shared: loading one on a clone loads it for the base too."""
        from dataclasses import replace as copy_patch

        twin = copy.copy(self)
        twin.patches = {role: {name: [copy_patch(p) for p in lists] for name, lists in params.items()}
                        for role, params in self.patches.items()}
        twin.loras = [handle.copy_to(twin) for handle in self.loras]
        twin.embeddings = dict(self.embeddings)
        twin.components, twin.configs, twin.defaults = dict(self.components), dict(self.configs), dict(self.defaults)
        return twin

    def __repr__(self) -> str:
        parts = ", ".join(f"{role}={type(m).__name__}" for role, m in self.components.items())
        extra = f", loras={[Path(h.name).name for h in self.loras]}" if self.loras else ""
        name = self.family.name + (f" ({self.detection.variant})" if getattr(self.detection, "variant", None) else "")
        try:
            where = f"{str(self.dtype).removeprefix('torch.')} on {self.device}"
        except (StopIteration, KeyError):
            where = "no denoiser"
        return f"Models({name}: {parts}; {where}{extra})"

    def add_controlnet(self, path) -> torch.nn.Module:
        """Load a ControlNet file or folder that fits this model (docs/controlnet.md); loaded once per path."""
        from diffstudio.controlnet_loading import add_controlnet

        key = str(Path(path).expanduser().resolve())
        if key not in self.controlnets:
            self.controlnets[key] = add_controlnet(self, path)
            enabled, wide = self.__dict__.get("winograd_enabled", (False, False))
            if enabled:
                from diffstudio.models.winograd import use_winograd

                use_winograd(self.controlnets[key], wide=wide)
            self._offload_addons()
        return self.controlnets[key]

    def add_ip_adapter(self, path, image_encoder=None):
        """Load an IP-Adapter and its image encoder (a folder or file; default: the image_encoder/ folder beside
        the adapter) that fit this model (docs/ipadapter.md); loaded once per (path, encoder)."""
        from diffstudio.ipadapter_loading import add_ip_adapter

        key = (str(Path(path).expanduser().resolve()), image_encoder if isinstance(image_encoder, torch.nn.Module)
               else None if image_encoder is None else str(Path(image_encoder).expanduser().resolve()))
        if key not in self.ip_adapters:
            self.ip_adapters[key] = add_ip_adapter(self, path, image_encoder)
            self._offload_addons()
        return self.ip_adapters[key]

    def add_motion_module(self, path, hints: dict | None = None) -> torch.nn.Module:
        """Add an AnimateDiff motion module file or MotionAdapter folder (docs/animatediff.md) as this model's
        ``motion`` component; a video run then uses it and the family's motion schedule."""
        from diffstudio.motion_loading import add_motion_module

        motion = add_motion_module(self, path, hints=hints)
        self._offload_addons()
        return motion

    def enable_offload(self, mode: str | None, device) -> Models:
        """Keep the components on the host and move each to ``device`` for its calls ("model"), or the denoiser's
        and the text encoders' blocks one at a time, streamed one ahead ("group") or moved synchronously
        ("sequential"); None takes the offload off (the components stay on the host). memory/offload.py."""
        from diffstudio.memory.offload import Offloader

        old = self.__dict__.get("offloader")
        if old is not None:
            old.remove()
        self.__dict__["offloader"] = None
        if mode is not None:
            modules = {r: m for r, m in self.components.items()
                       if isinstance(m, torch.nn.Module) and r not in DENOISER_ADDON_ROLES}
            blockwise = {self.family.denoiser_role, *(spec.encoder_role for spec in self.family.text_encoders)}
            self.__dict__["offloader"] = Offloader(modules, device, mode, blockwise)
            self._offload_addons()
        return self

    def compile(self, backend: str = "inductor", mode: str | None = None, freeze: bool = False) -> Models:
        """Compile the denoiser with ``torch.compile`` (in place: its names, weights, patches and hooks stay as they
        are; the first call after this compiles, later calls reuse the code). ``freeze`` (inductor, inference on the
        CPU) folds the weights into the compiled code as constants (pre-packed for oneDNN): faster, but a LoRA
        applied, removed or re-weighted afterwards then makes the next call compile again (``Patcher.refresh``).
        Measured speed and compile time: docs/benchmarks.md ("torch.compile")."""
        if freeze and backend != "inductor":
            raise InvalidInputError(f"freeze folds weights in inductor's code; backend {backend!r} has no freezing")
        options = {"freezing": True} if freeze else None
        if options and mode:
            raise InvalidInputError("torch.compile takes a mode or options, not both: leave mode out with freeze")
        denoiser = self.denoiser
        denoiser.compile(backend=backend, mode=mode, options=options)
        denoiser.frozen_weights = freeze  # read by the patcher: weights baked into compiled code
        return self

    def winograd(self, enabled: bool = True, wide: bool = False) -> Models:
        """Run the large 3x3 convolutions of the denoiser, the VAE and the ControlNets (those added later too) by
        Winograd's F(4x4, 3x3) in float32 on the CPU (``models/winograd.py``): a relative error of about 3e-6 a
        convolution; the transformed kernels take 4x those layers' weight memory (about 1.2 GB for SD 1.5 or
        SDXL). ``wide`` switches the widest layers too (faster still; 8.3 GB for SD 1.5, 5 GB for SDXL). Other
        dtypes and devices run as before; ``enabled=False`` switches back and frees the kernels. Measured speed:
        docs/benchmarks.md ("Winograd convolutions")."""
        from diffstudio.models.winograd import use_winograd

        self.__dict__["winograd_enabled"] = (enabled, wide)
        for module in (self.denoiser, self.components.get("vae"), *self.controlnets.values()):
            if isinstance(module, torch.nn.Module):
                use_winograd(module, enabled, wide)
        return self

    def _offload_addons(self) -> None:
        """Put the add-ons under the offload: ControlNets, motion modules and IP-Adapter projections travel with
        the denoiser, an IP-Adapter's image encoder is moved for its own calls (memory/offload.py)."""
        offloader = self.__dict__.get("offloader")
        if offloader is None:
            return
        denoiser = self.family.denoiser_role
        for role in DENOISER_ADDON_ROLES:
            if isinstance(self.components.get(role), torch.nn.Module):
                offloader.join(denoiser, role, self.components[role])
        for path, controlnet in self.controlnets.items():
            offloader.join(denoiser, f"controlnet:{path}", controlnet)
        for i, loaded in enumerate(self.ip_adapters.values()):
            offloader.join(denoiser, f"ip_adapter:{i}", loaded.adapter)
            offloader.add(f"image_encoder:{loaded.encoder_source}", loaded.image_encoder)

    def add_embedding(self, path_or_folder, name: str | None = None) -> list:
        """Add a textual-inversion embedding file, or every one under a folder, to this model's prompts
        (by file stem, or ``name``); a name added again is replaced. Returns the embeddings added."""
        from diffstudio.conditioning.embeddings import load_embeddings

        added = load_embeddings(path_or_folder, name)
        self.embeddings.update({embedding.name: embedding for embedding in added})
        return added


# ---------------------------------------------------------------------------------------------
# Reading sources: every source becomes {role: (canonical state dict, config, layout)}.

@dataclass
class Part:
    state_dict: dict
    config: Any
    source: str

    def numel(self) -> int:
        return sum(int(v.numel()) for v in self.state_dict.values())


def _cast(sd: dict, dtype: torch.dtype, device) -> dict:
    return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in sd.items()}


def _read_file(path: Path) -> tuple[Detection, dict[str, Part]]:
    from diffstudio.io.state_dict import read_file_metadata, read_state_dict

    sd = read_state_dict(path)
    detection = detect(sd, read_file_metadata(path))
    parts = {}
    for role, comp in detection.components.items():
        parts[role] = Part(canonical_state_dict(sd, comp), comp.config, str(path))
    return detection, parts


def canonical_state_dict(sd: dict, comp: Component) -> dict:
    n = len(comp.prefix)
    sub = {k[n:]: v for k, v in sd.items() if k.startswith(comp.prefix)} if comp.prefix else dict(sd)
    arch = ARCHS[comp.arch]
    if comp.layout != "original":  # diffusers names, or OpenCLIP's for a CLIP text encoder
        sub = arch.from_diffusers(sub)
    return sub


def _read_role(role, path: Path, where: str, layout: str) -> tuple[Part, Component]:
    """One role's weights, from a component folder (with its config.json when there is one) or a weights
    file, in canonical names with their config; ``where`` and ``layout`` are what `diffstudio info` shows."""
    from diffstudio.io.folders import read_component
    from diffstudio.io.state_dict import read_state_dict

    arch = ARCHS[role.arch]
    sd, config_json = read_component(path) if path.is_dir() else (read_state_dict(path), None)
    canonical = arch.to_canonical(sd)
    config = arch.config_from_diffusers(config_json) if config_json else arch.derive_config(canonical, role.hints)
    dtype = str(next(iter(canonical.values())).dtype).removeprefix("torch.")
    return (Part(canonical, config, str(path)),
            Component(role.name, role.arch, where, layout, config, sum(int(v.numel()) for v in canonical.values()),
                      dtype))


def _read_folder(folder: Path) -> tuple[Detection, dict[str, Part]]:
    """A diffusers/HF folder: model_index.json and one subfolder per component."""
    from diffstudio.families import FAMILIES
    from diffstudio.io.folders import read_model_index

    index = read_model_index(folder)
    family = _family_of_folder(folder, index)
    parts: dict[str, Part] = {}
    components: dict[str, Component] = {}
    for role in family.roles:
        if (folder / role.subfolder).is_dir():
            parts[role.name], components[role.name] = _read_role(role, folder / role.subfolder,
                                                                 f"{role.subfolder}/", "diffusers")
    if family.denoiser_role not in parts:
        raise ModelNotFoundError(f"{folder} has no {family.role(family.denoiser_role).subfolder}/ folder with "
                                 f"weights; a {family.name} folder needs one")
    reason = family.check_denoiser(parts[family.denoiser_role].config)
    if reason:
        names = ", ".join(f.name for f in FAMILIES)
        raise UnknownModelError(f"{folder}: model_index.json says {family.name} but {reason} (known: {names})")
    return Detection(family.name, components, family.variant_from(parts[family.denoiser_role].config)), parts


def _folder_denoiser_config(folder: Path, family: Family):
    """The config of ``family``'s denoiser subfolder, from its config.json when there is one (no weights
    read), else derived from the weights' shapes; None when the folder has no such subfolder or the
    config is not one of this family's architecture."""
    from diffstudio.io.folders import read_component

    den = family.role(family.denoiser_role)
    sub = folder / den.subfolder
    if not sub.is_dir():
        return None
    arch = ARCHS[den.arch]
    try:
        if (sub / "config.json").exists():
            return arch.config_from_diffusers(json.loads((sub / "config.json").read_text()))
        sd, _ = read_component(sub)
        return arch.derive_config(arch.to_canonical(sd), den.hints)
    except (KeyError, TypeError, ValueError, UnknownModelError):  # another architecture's subfolder
        return None


def _family_of_folder(folder: Path, index: dict) -> Family:
    """The family the pipeline class names, if its denoiser passes that family's test; else the first family
    whose test the denoiser passes (e.g. the original Kolors release names StableDiffusionXLPipeline)."""
    from diffstudio.families import FAMILIES

    class_name = index.get("_class_name", "")
    named = [f for f in FAMILIES if class_name in f.diffusers_pipelines]
    for family in named + [f for f in FAMILIES if f not in named]:
        config = _folder_denoiser_config(folder, family)
        if config is not None and family.check_denoiser(config) is None:
            return family
    if named:
        return named[0]  # _read_folder then says what is wrong with its denoiser
    raise UnknownModelError(f"{folder}: model_index.json names pipeline {class_name!r}, which diffstudio does "
                            "not know, and no subfolder holds a denoiser of a known family")


def read_source(path: str | Path) -> tuple[Detection, dict[str, Part]]:
    """One path (file or folder) -> its detection and canonical parts by role."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"{path} does not exist")
    if path.is_dir():
        if (path / "model_index.json").exists():
            return _read_folder(path)
        released = _read_released_folder(path)
        if released is not None:
            return released
        from diffstudio.controlnet_loading import is_controlnet_folder, read_controlnet

        if is_controlnet_folder(path):  # a diffusers ControlNetModel folder (an add-on: `diffstudio info` names it)
            detection, part = read_controlnet(path)
            return detection, {"controlnet": part}
        raise ModelNotFoundError(f"{path} is a folder without model_index.json: pass the model file inside it, "
                                 "or a diffusers folder (model_index.json, unet/, vae/, text_encoder/, ...)")
    return _read_file(path)


def _released_path(folder: Path, candidates: tuple[str, ...]) -> Path | None:
    """The first of a role's ``released`` paths under ``folder``, the release's root (or, when the user
    passed the release's top subfolder such as ``t2i/``, under its parent)."""
    for rel in candidates:
        for base in (folder, folder.parent) if rel.startswith(folder.name + "/") else (folder,):
            if (base / rel).exists():
                return base / rel
    return None


def _read_released_folder(folder: Path) -> tuple[Detection, dict[str, Part]] | None:
    """A model folder as its authors release it (not diffusers): each role is read from the first of its
    ``Role.released`` paths that exists (a weights file, or a component folder with config.json)."""
    from diffstudio.families import FAMILIES

    reasons = []
    for family in FAMILIES:
        den = family.role(family.denoiser_role)
        if _released_path(folder, den.released) is None:
            continue
        parts: dict[str, Part] = {}
        components: dict[str, Component] = {}
        for role in (den, *(r for r in family.roles if r is not den)):
            path = _released_path(folder, role.released)
            if path is None:
                continue
            part, component = _read_role(role, path, os.path.relpath(path, folder), "original")
            if role is den and family.check_denoiser(part.config):
                reasons.append(f"{family.name}: {family.check_denoiser(part.config)}")
                break  # maybe another family's release with the same layout
            parts[role.name], components[role.name] = part, component
        if den.name in parts:
            return Detection(family.name, components, family.variant_from(parts[den.name].config)), parts
    if reasons:
        raise UnknownModelError(f"{folder} is laid out like a released model, but: {'; '.join(reasons)}")
    return None


# ---------------------------------------------------------------------------------------------
# Building modules.

def build_component(role: str, arch_name: str, part: Part, dtype: torch.dtype, device,
                    consume: bool = False, lowbit: torch.dtype | None = None) -> torch.nn.Module:
    """``consume``: empty ``part.state_dict`` while casting (lower peak memory; the loader's own parts).
    ``lowbit``: store the Linear weights in this float8 dtype (when the architecture computes that way)."""
    arch = ARCHS[arch_name]
    with torch.device("meta"):
        module = arch.build(part.config)
    from diffstudio.models.lowbit import cast_keeping_lowbit

    state = cast_keeping_lowbit(module, part.state_dict, dtype, device, consume, lowbit)  # float8 Linears stay
    if arch_name == "clip_text":
        from diffstudio.convert.clip import to_installed_transformers_layout

        state = to_installed_transformers_layout(state, module)
    from diffstudio.errors import ConversionError

    return assign_weights(module, state, device, f"{role} from {part.source}", ConversionError)


def assign_weights(module: torch.nn.Module, state: dict, device, what: str, error=UnknownModelError):
    """Put ``state`` (already in the right dtype and device) into ``module`` built on the meta device: every key
    must match (``error`` names ``what`` otherwise); buffers no checkpoint holds (position_ids) are made on
    ``device``. Returns the module in eval mode, without gradients."""
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise error(f"{what}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                    f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            _materialise_buffer(module, name, buf, device)
    return module.eval().requires_grad_(False)


def _materialise_buffer(module, name, buf, device):
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr == "position_ids":
        value = torch.arange(buf.shape[-1], device=device).expand(buf.shape)
    else:
        raise UnknownModelError(f"buffer {name} is not in the checkpoint and has no known default")
    owner.register_buffer(attr, value.clone(), persistent=False)


def _tokenizer(spec, sources: dict[str, str]):
    """The model folder's own tokenizer/ when it has one, else the packaged data of that kind."""
    from diffstudio.conditioning.tokenizers import load_tokenizer

    source = sources.get(spec.encoder_role)
    folder = Path(source).parent / spec.tokenizer_role if source and Path(source).is_dir() else None
    return load_tokenizer(spec.tokenizer_data, folder)


def default_model_path() -> Path:
    return Path(__file__).parent / "demo" / "weights" / "shapes-sd.safetensors"


def load(*paths, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", offload: str | None = None,
         storage: str | None = None) -> Models:
    """Load a model from files/folders; with no path, the packaged Shapes demo model.

    ``storage="fp8"`` stores the denoiser's Linear weights in float8 (computed in ``dtype``, models/lowbit.py).
    ``offload`` ("model", "group" or "sequential", memory/offload.py) keeps the components on the host and moves them to
    ``device`` for their calls. ``diffstudio.memory.planner.plan`` chooses these for a machine (docs/memory.md)."""
    if offload is not None:
        models = load(*paths, dtype=dtype, device="cpu", storage=storage)
        models.enable_offload(offload, device)
        return models
    if not paths:
        paths = (default_model_path(),)
        if not paths[0].exists():
            import warnings

            from diffstudio.demo.untrained import untrained_demo_models

            warnings.warn(f"the trained demo model is not at {paths[0]} (build it with `python -m diffstudio.demo "
                          "train`, docs/shapes.md): using the demo architecture with random weights", stacklevel=2)
            return untrained_demo_models()
    from diffstudio.controlnet_loading import refuse_as_model
    from diffstudio.ipadapter_loading import refuse_as_model as refuse_ip_adapter

    base_detection, parts = read_source(paths[0])
    refuse_as_model(paths[0], base_detection)
    refuse_ip_adapter(paths[0], base_detection)
    if base_detection.family is None:
        raise UnknownModelError(f"{paths[0]} holds only {', '.join(parts)}: the first path must be a whole "
                                "model (or a denoiser); add lone components after it")
    family = get_family(base_detection.family).for_variant(base_detection.variant)
    if family.own_loader:
        import importlib

        module, name = family.own_loader.split(":")
        if storage is not None:
            from diffstudio.errors import InvalidInputError

            raise InvalidInputError(f"storage={storage!r} is not available for {family.name} models")
        return getattr(importlib.import_module(module), name)(*paths, dtype=dtype, device=device)
    for extra in paths[1:]:
        detection, extra_parts = read_source(extra)
        refuse_as_model(extra, detection)
        refuse_ip_adapter(extra, detection)
        if detection.family not in (None, family.name):
            raise UnknownModelError(f"{extra} is a {detection.family} model but the base is {family.name}")
        if detection.family is None:  # a lone component fills the base family's role of its architecture
            detection.components, extra_parts = _to_family_roles(family, detection.components, extra_parts,
                                                                 set(parts))
        parts.update(extra_parts)
        base_detection.components.update(detection.components)
    missing = [r.name for r in family.roles if r.required and r.name not in parts]
    if missing:
        raise ModelNotFoundError(f"{paths[0]} is a {family.name} model without {', '.join(missing)}; "
                                 f"add the missing component files after it, e.g. load(base, 'vae.safetensors')")
    device = torch.device(device)
    components: dict[str, Any] = {}
    from tqdm.auto import tqdm

    building = [role for role in family.roles if role.name in parts]
    bar = tqdm(building, desc=f"loading {family.name}", unit="part", leave=False,
               disable=len(building) < 2 or sum(p.numel() for p in parts.values()) < 50_000_000)
    lowbit = _storage_dtype(storage)
    for role in bar:
        bar.set_postfix_str(role.name)
        components[role.name] = build_component(role.name, role.arch, parts[role.name], dtype, device,
                                                consume=True, lowbit=lowbit if role.name == family.denoiser_role
                                                else None)
    sources = {role: part.source for role, part in parts.items()}
    for spec in family.text_encoders:
        components[spec.tokenizer_role] = _tokenizer(spec, sources)
    configs = {r: p.config for r, p in parts.items()}
    return Models(family, components, configs, sources, base_detection,
                  _stored_defaults(paths[0]) or _demo_copy_defaults(family, configs))


def _storage_dtype(storage: str | None) -> torch.dtype | None:
    if storage is None:
        return None
    if storage != "fp8":
        from diffstudio.errors import InvalidInputError

        raise InvalidInputError(f"storage={storage!r}: the one storage besides the compute dtype is 'fp8'")
    return torch.float8_e4m3fn


def _width(config) -> int | None:
    return getattr(config, "hidden_size", None) or getattr(config, "d_model", None)


def _to_family_roles(family: Family, components: dict, parts: dict, taken: set[str]) -> tuple[dict, dict]:
    """Move lone component files (detected under a generic role name) to the family's role of their
    architecture. With several such roles (SD3 / SDXL: CLIP-L and CLIP-G), the one whose released
    ``width`` is the file's wins, else the only one not yet filled."""
    from dataclasses import replace

    comps, renamed = {}, {}
    for name, comp in components.items():
        roles = [r for r in family.roles if r.arch == comp.arch]
        if not roles:
            raise UnknownModelError(f"{parts[name].source} is a lone {comp.arch} component, and a {family.name} "
                                    "model has no component of that kind")
        if len(roles) > 1:
            roles = [r for r in roles if r.width == _width(comp.config)] or [r for r in roles if r.name not in taken]
        if len(roles) != 1:
            raise UnknownModelError(f"{parts[name].source}: cannot tell which {family.name} component this "
                                    f"{comp.arch} file is (width {_width(comp.config)}); candidates: "
                                    f"{', '.join(r.name for r in roles)}")
        target = roles[0].name
        comps[target] = replace(comp, role=target)
        renamed[target] = parts[name]
    return comps, renamed


def _demo_copy_defaults(family: Family, configs: dict) -> dict:
    """A copy of the demo model in a format without metadata (a .ckpt) is recognised by its structure: its
    denoiser's config equals the packaged file's. It then gets the demo's defaults (64x64, CFG 3)."""
    demo, role = default_model_path(), family.denoiser_role
    if not demo.is_file() or role not in configs:
        return {}
    from diffstudio.io.state_dict import read_file_metadata

    data = json.loads(read_file_metadata(demo).get("diffstudio", "{}"))
    stored = data.get("configs", {}).get(role)
    if data.get("family") != family.name or ARCHS[family.role(role).arch].config_to_dict(configs[role]) != stored:
        return {}
    return dict(data.get("defaults", {}))


def _stored_defaults(path) -> dict:
    """Generation defaults a file diffstudio wrote carries in its metadata (e.g. the demo model's 64x64)."""
    path = Path(path)
    if not path.is_file():
        return {}
    from diffstudio.io.state_dict import read_file_metadata

    data = read_file_metadata(path).get("diffstudio")
    data = json.loads(data) if isinstance(data, str) else (data or {})
    return dict(data.get("defaults", {}))
