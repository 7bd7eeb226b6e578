"""One memory planner for the device and the host: given their free memory, choose dtype, fp8 storage, offload
and VAE tiling for a model at an image size, say what was chosen and why, or refuse before anything loads.

The candidates, in order of preference (the first whose estimate fits both memories wins):

1. every component on the device in the compute dtype (bf16, or fp16 where bf16 is not available);
2. the denoiser's Linear weights stored in float8 (models/lowbit.py), when its architecture computes that way;
3. model offload: the components live on the host and each moves to the device for its own calls;
4. model offload with the fp8 denoiser;
5. group offload: the denoiser's blocks stream to the device one ahead of their call (every block crosses the
   bus at every step, overlapped with the computation; memory/prefetch.py); the host's weights are pinned;
6. group offload with the fp8 denoiser.

Sequential offload (the same blocks, moved synchronously, no pinned memory) has the same device peak as group
offload in this estimate; the planner prefers the faster one, and ``load(offload="sequential")`` remains for
hosts that cannot pin the weights.

Each candidate is tried with the VAE decoding the whole image first, then in tiles (pipeline/tiled_vae.py):
tiling is cheap next to the following candidate. On a machine without an accelerator the device is the host:
offload would move weights from memory to the same memory, so only 1 and 2 (with or without tiling) are tried.

Margins: a plan may use ``DEVICE_USABLE`` of the device's free memory (the rest is left to the allocator's
fragmentation and kernels' workspaces) and ``HOST_USABLE`` of the host's, after ``HOST_BASELINE`` for the
process itself (Python, torch, transformers, tokenizers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffstudio.errors import MemoryPlanError
from diffstudio.memory import estimate as est

GIB = 1024 ** 3
DEVICE_USABLE = 0.9
HOST_USABLE = 0.9
HOST_BASELINE = 1 * GIB
LATENT_BYTES_PER_PIXEL = 64  # latents, noise, the sampler's history and x0 per latent pixel (fp32, generous)


@dataclass(frozen=True)
class Option:
    fp8: bool
    offload: str | None  # None | "model" | "group" | "sequential"
    tiled_vae: bool

    def describe(self) -> str:
        parts = ["denoiser in fp8" if self.fp8 else "plain weights",
                 {None: "all on the device", "model": "model offload",
                  "group": "group offload", "sequential": "sequential offload"}[self.offload],
                 "tiled VAE" if self.tiled_vae else "whole-image VAE"]
        return ", ".join(parts)


@dataclass
class Plan:
    """The chosen settings, the estimates behind them, and why the better candidates were not chosen."""

    family: str
    width: int
    height: int
    batch: int
    dtype: torch.dtype
    device_type: str
    option: Option
    device_bytes: int  # estimated peak on the device (== host on a CPU-only machine)
    host_bytes: int  # estimated peak on the host (0 extra on a CPU-only machine: it is device_bytes)
    device_free: int
    host_free: int
    phases: dict[str, int]  # phase -> its estimated device peak
    weights: dict[str, int]  # role -> bytes as stored in this plan
    rejected: list[str] = field(default_factory=list)
    assumed: list[str] = field(default_factory=list)

    @property
    def fp8(self) -> bool:
        return self.option.fp8

    @property
    def offload(self) -> str | None:
        return self.option.offload

    @property
    def tiled_vae(self) -> bool:
        return self.option.tiled_vae

    def load_kwargs(self) -> dict:
        """Arguments for ``diffstudio.load`` that apply this plan (the device is the caller's)."""
        return {"dtype": self.dtype, "storage": "fp8" if self.fp8 else None, "offload": self.offload}

    def explain(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        where = "the host (no accelerator: the device is the host)" if self.device_type == "cpu" else "the device"
        lines = [f"{self.family} at {self.width}x{self.height}, batch {self.batch}: {self.option.describe()}, "
                 f"compute in {dtype}",
                 f"  estimated peak on {where}: {_gib(self.device_bytes)} of {_gib(self.device_free)} free"]
        if self.device_type != "cpu":
            lines.append(f"  estimated peak on the host: {_gib(self.host_bytes)} of {_gib(self.host_free)} free")
        lines.append("  weights as stored: " + ", ".join(f"{r} {_gib(b)}" for r, b in self.weights.items()))
        lines.append("  device peak per phase (weights there + activations): "
                     + ", ".join(f"{p} {_gib(b)}" for p, b in self.phases.items()))
        lines += [f"  assumed: {a}" for a in self.assumed]
        lines += [f"  not chosen: {r}" for r in self.rejected]
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


# -- reading the model: headers only -------------------------------------------------------------------------

def detect_sources(*paths):
    """Detection of the model ``load(*paths)`` would build, from the files' headers (no weights read)."""
    from types import SimpleNamespace

    from diffstudio.detect import detect
    from diffstudio.families import get_family
    from diffstudio.io.state_dict import read_state_dict_meta
    from diffstudio.loader import _to_family_roles, read_source

    detection = None
    for path in paths:
        path = Path(path).expanduser()
        if path.is_file():
            found = detect(*read_state_dict_meta(path))
            parts = {role: SimpleNamespace(source=str(path)) for role in found.components}  # what errors name
        else:  # folders: their components are memory-mapped, not read
            found, parts = read_source(path)
        if detection is None:
            detection = found
            continue
        if found.family is None:
            family = get_family(detection.family).for_variant(detection.variant)
            found.components, _ = _to_family_roles(family, found.components, parts, set(detection.components))
        detection.components.update(found.components)
    return detection


# -- the estimate of one candidate ----------------------------------------------------------------------------

@dataclass
class _Model:
    """What the planner knows about a model: components, their weights, and the activation of each phase."""

    family: object
    components: dict  # role -> Component
    weights: dict  # role -> ComponentWeights
    phases: dict  # phase -> (roles whose weights it needs, activation bytes by tiled: {False: n, True: n})
    fp8_capable: bool
    largest_linear: int
    blocks: dict  # role -> [(parameters, Linear weight parameters)] of each block sequential offload moves
    assumed: list


def _model(detection, width: int, height: int, batch: int, dtype: torch.dtype, device_type: str) -> _Model:
    from diffstudio.families import get_family
    from diffstudio.memory.assumed import assumed_component
    if detection.family is None:
        raise MemoryPlanError(f"the files hold only {', '.join(detection.components)}: plan a whole model (its "
                              "denoiser file first)")
    family = get_family(detection.family).for_variant(detection.variant)
    components, assumed = dict(detection.components), []
    conditioning = {spec.encoder_role for spec in family.text_encoders}
    for role in family.roles:  # the required ones and the text encoders the family conditions on
        if role.name not in components and (role.required or role.name in conditioning):
            comp = assumed_component(role, family)
            if comp is None:
                raise MemoryPlanError(f"{family.name} needs a {role.name} ({role.arch}) the files do not hold and "
                                      "that has no released size to assume: add its file")
            components[role.name] = comp
            assumed.append(f"{role.name} not in the files given: counted at its released size "
                           f"({comp.num_params / 1e6:.0f} M parameters)")
    den_role = family.denoiser_role
    den = components[den_role]
    fp8_capable, linear_sizes, _ = _structure(den.arch, den.config)
    weights = {role: est.ComponentWeights(role, c.arch, c.num_params, sum(linear_sizes) if role == den_role else 0)
               for role, c in components.items()}
    cfg_batch = batch * (2 if family.defaults.cfg_scale != 1.0 else 1)
    phases = {}
    for spec in family.text_encoders:
        comp = components.get(spec.encoder_role)
        if comp is not None:
            act = est.text_encoder_bytes(comp.arch, comp.config, spec.max_length, cfg_batch, dtype)
            phases[f"encode ({spec.encoder_role})"] = ((spec.encoder_role,), {False: act, True: act})
    text_tokens = sum(s.max_length for s in family.text_encoders if s.tokenizer_data != "clip") + (
        77 if any(s.tokenizer_data == "clip" for s in family.text_encoders) and den.arch == "mmdit" else 0)
    act = est.denoiser_activation_bytes(den.arch, den.config, width, height, text_tokens=text_tokens or 77,
                                        batch=cfg_batch, dtype=dtype, downscale=family.latent.downscale,
                                        device_type=device_type)
    act += cfg_batch * (width // family.latent.downscale) * (height // family.latent.downscale) * \
        LATENT_BYTES_PER_PIXEL
    phases["sample"] = ((den_role,), {False: act, True: act})
    vae = components.get("vae")
    if vae is not None and vae.arch == "ldm_vae":
        phases["decode"] = (("vae",), {t: est.vae_decode_bytes(vae.config, width, height, dtype=dtype, tiled=t,
                                                               batch=batch, downscale=family.latent.downscale)
                                       for t in (False, True)})
    blocks = {role: _structure(c.arch, c.config)[2] for role, c in components.items()
              if role == den_role or role in conditioning}
    return _Model(family, components, weights, phases, fp8_capable, max(linear_sizes, default=0), blocks, assumed)


_STRUCTURES: dict = {}


def _structure(arch: str, config) -> tuple[bool, list[int], list[tuple[int, int]]]:
    """Of ``arch`` built at ``config`` on the meta device: whether it may store float8 weights, the sizes of its
    Linear weights, and (parameters, Linear weight parameters) of each block sequential offload moves."""
    from diffstudio.components import ARCHS
    from diffstudio.memory.offload import sequential_units

    key = (arch, repr(config))
    if key not in _STRUCTURES:
        with torch.device("meta"):
            module = ARCHS[arch].build(config)
        linear = [m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear)]
        blocks = [(sum(p.numel() for p in unit.parameters()),
                   sum(m.weight.numel() for m in unit.modules() if isinstance(m, torch.nn.Linear)))
                  for unit in sequential_units(module)]
        _STRUCTURES[key] = (bool(getattr(module, "lowbit_storage", False)), linear, blocks)
    return _STRUCTURES[key]


def _weights(model: _Model, dtype: torch.dtype, fp8: bool) -> dict[str, int]:
    den = model.family.denoiser_role
    return {role: w.bytes(dtype, fp8 and role == den) for role, w in model.weights.items()}


def _estimate(model: _Model, option: Option, dtype: torch.dtype) -> tuple[int, int, dict[str, int]]:
    """(device peak, host peak, device peak per phase) of ``option``."""
    weights = _weights(model, dtype, option.fp8)
    upcast = model.largest_linear * est.dtype_bytes(dtype) if option.fp8 else 0  # one layer's weight, upcast
    den = model.family.denoiser_role
    all_weights = sum(weights.values())
    phases = {}
    for name, (roles, act) in model.phases.items():
        activation = act[option.tiled_vae] + (upcast if den in roles else 0)
        if option.offload is None:
            phases[name] = all_weights + activation
        elif option.offload in ("group", "sequential") and model.blocks.get(roles[0]):
            fp8 = option.fp8 and roles[0] == den
            blocks = [est.ComponentWeights("", "", n, linear).bytes(dtype, fp8) for n, linear in model.blocks[roles[0]]]
            resident = weights[roles[0]] - sum(blocks)  # what is not in a block stays on the device
            phases[name] = resident + 2 * max(blocks) + activation  # the block running and the next one arriving
        else:
            phases[name] = sum(weights[r] for r in roles) + activation
    device = max(phases.values())
    host = HOST_BASELINE + (all_weights if option.offload else 0)
    return device, host, phases


def plan(source, width: int, height: int, *, device_free: int | None = None, host_free: int | None = None,
         device_type: str | None = None, batch: int = 1, dtype: torch.dtype | None = None) -> Plan:
    """Choose how to run ``source`` (a path, a list of paths as ``load`` takes them, or a Detection) at
    ``width`` x ``height``. Free memories default to the machine's; ``device_type`` "cpu" plans for the host
    alone (the default without CUDA). Raises MemoryPlanError when no candidate fits."""
    from diffstudio.detect import Detection
    if isinstance(source, Detection):
        detection = source
    else:
        detection = detect_sources(*(source if isinstance(source, (list, tuple)) else [source]))
    device_type = device_type or ("cuda" if torch.cuda.is_available() or device_free is not None else "cpu")
    host_free = host_free if host_free is not None else free_host_memory()
    if device_type == "cpu":
        device_free = host_free
    elif device_free is None:
        device_free = free_device_memory()
    dtype = dtype or torch.bfloat16
    model = _model(detection, width, height, batch, dtype, device_type)
    candidates = [Option(fp8, offload, tiled)
                  for offload, fp8 in ((None, False), (None, True), ("model", False), ("model", True),
                                       ("group", False), ("group", True))
                  if (not fp8 or model.fp8_capable) and (device_type != "cpu" or offload is None)
                  for tiled in (False, True) if tiled or "decode" in model.phases]
    rejected, last = [], None
    for option in candidates:
        device, host, phases = _estimate(model, option, dtype)
        if device_type == "cpu":
            device += HOST_BASELINE
            fits = device <= HOST_USABLE * host_free
            why = f"needs {_gib(device)} of memory, {_gib(HOST_USABLE * host_free)} usable"
        else:
            fits = device <= DEVICE_USABLE * device_free and host <= HOST_USABLE * host_free
            why = (f"needs {_gib(device)} on the device ({_gib(DEVICE_USABLE * device_free)} usable) and "
                   f"{_gib(host)} on the host ({_gib(HOST_USABLE * host_free)} usable)")
        last = (option, device, host, why)
        if fits:
            return Plan(model.family.name, width, height, batch, dtype, device_type, option, device, host,
                        device_free, host_free, phases, _weights(model, dtype, option.fp8), rejected, model.assumed)
        rejected.append(f"{option.describe()}: {why}")
    option, device, host, why = last
    short = []
    usable_device = (HOST_USABLE * host_free) if device_type == "cpu" else DEVICE_USABLE * device_free
    if device > usable_device:
        short.append(f"{_gib(device - usable_device)} short on the {'host' if device_type == 'cpu' else 'device'}")
    if device_type != "cpu" and host > HOST_USABLE * host_free:
        short.append(f"{_gib(host - HOST_USABLE * host_free)} short on the host")
    raise MemoryPlanError(f"{model.family.name} at {width}x{height} does not fit: the smallest plan "
                          f"({option.describe()}) {why}; {' and '.join(short)}. Free memory, lower the size or the "
                          "batch, or use a smaller checkpoint." + "".join(f" Assumed: {a}." for a in model.assumed))


def free_host_memory() -> int:
    """MemAvailable from /proc/meminfo (Linux), else psutil's figure."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


def free_device_memory() -> int:
    if not torch.cuda.is_available():
        raise MemoryPlanError("no CUDA device here: give the device's memory (--device-memory), or plan for the host")
    return int(torch.cuda.mem_get_info()[0])


def parse_size(text: str) -> int:
    """'8GiB', '8GB' (both read as GiB, as tools report them), '512MiB', '1.5G' -> bytes."""
    units = {"t": 1024 ** 4, "g": GIB, "m": 1024 ** 2, "k": 1024, "": 1}
    cleaned = text.strip().lower().removesuffix("b").removesuffix("i")
    number = cleaned.rstrip("tgmk")
    unit = cleaned[len(number):]
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        from diffstudio.errors import InvalidInputError

        raise InvalidInputError(f"cannot read {text!r} as a memory size; write e.g. 8GiB, 512MiB") from None
