"""Component architectures: the kinds of weight blocks a checkpoint can hold.

A family record (``diffstudio/families``) says *which* components a model has and
where their keys live; a ``ComponentArch`` says how to recognise one block of keys,
derive its config from shapes, build the module and convert other layouts to ours.
Every family that uses an LDM UNet shares the one ``ldm_unet`` entry.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


def _lazy(path: str) -> Callable:
    """``"pkg.mod:name"`` -> a callable that imports on first use (keeps `import diffstudio` light)."""
    module_name, attr = path.split(":")

    def call(*args, **kwargs):
        target = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
        return target(*args, **kwargs)

    call.__qualname__ = attr
    return call


def _constant(path: str) -> Any:
    module_name, attr = path.split(":")
    return getattr(importlib.import_module(module_name), attr)


@dataclass(frozen=True)
class ComponentArch:
    name: str
    sentinels: str  # "module:CONSTANT" naming a tuple of canonical keys
    diffusers_sentinels: str
    derive_config: Callable  # (state_dict, hints) -> config
    config_from_diffusers: Callable  # (config.json dict) -> config
    build: Callable  # (config) -> nn.Module
    from_diffusers: Callable  # (diffusers state dict) -> canonical state dict
    to_diffusers: Callable  # (canonical state dict, config) -> diffusers state dict
    config_to_dict: Callable  # config -> JSON-able dict
    config_from_dict: Callable  # JSON dict -> config
    # True when from_diffusers also normalises canonical input (CLIP: drops position_ids, adds
    # the `text_model.` level transformers 5 leaves out), so it is applied to every layout.
    normalise_always: bool = False
    # Whose module paths kohya-format LoRA keys use for this architecture: "diffusers" (sd-scripts
    # trains SD 1.x / SDXL UNets as diffusers modules) or "original" (our canonical names: DiTs, CLIP).
    kohya_layout: str = "original"
    # What `diffusers_sentinels` / `from_diffusers` read, as `diffstudio info` names it: "diffusers",
    # or "openclip" for CLIP text encoders (their non-canonical layout in single files).
    other_layout: str = "diffusers"

    def to_canonical(self, sd: Mapping) -> dict:
        """A state dict in any layout this architecture knows -> canonical keys."""
        if self.is_canonical(sd) and not self.normalise_always:
            return dict(sd)
        return self.from_diffusers(sd)

    def is_canonical(self, keys: Mapping | set) -> bool:
        return all(k in keys for k in _constant(self.sentinels))

    def is_diffusers(self, keys: Mapping | set) -> bool:
        return all(k in keys for k in _constant(self.diffusers_sentinels))

    def missing_sentinels(self, keys: Mapping | set) -> list[str]:
        return [k for k in _constant(self.sentinels) if k not in keys]


def _dataclass_to_dict(config) -> dict:
    return dataclasses.asdict(config)


ARCHS: dict[str, ComponentArch] = {
    "ldm_unet": ComponentArch(
        name="ldm_unet",
        sentinels="diffstudio.detect.unet:UNET_SENTINELS",
        diffusers_sentinels="diffstudio.detect.unet:UNET_DIFFUSERS_SENTINELS",
        derive_config=_lazy("diffstudio.detect.unet:derive_unet_config"),
        config_from_diffusers=_lazy("diffstudio.detect.unet:config_from_diffusers"),
        build=_lazy("diffstudio.models.unet:UNetModel"),
        from_diffusers=_lazy("diffstudio.convert.unet:unet_from_diffusers"),
        to_diffusers=_lazy("diffstudio.convert.unet:unet_to_diffusers"),
        config_to_dict=_dataclass_to_dict,
        config_from_dict=_lazy("diffstudio.models.unet:UNetConfig.from_dict"),
        kohya_layout="diffusers",
    ),
    "ldm_vae": ComponentArch(
        name="ldm_vae",
        sentinels="diffstudio.detect.vae:VAE_SENTINELS",
        diffusers_sentinels="diffstudio.detect.vae:VAE_DIFFUSERS_SENTINELS",
        derive_config=_lazy("diffstudio.detect.vae:derive_vae_config"),
        config_from_diffusers=_lazy("diffstudio.detect.vae:config_from_diffusers"),
        build=_lazy("diffstudio.models.vae:AutoencoderKL"),
        from_diffusers=_lazy("diffstudio.convert.vae:vae_from_diffusers"),
        to_diffusers=_lazy("diffstudio.convert.vae:vae_to_diffusers"),
        config_to_dict=_dataclass_to_dict,
        config_from_dict=_lazy("diffstudio.models.vae:VAEConfig.from_dict"),
    ),
    "clip_text": ComponentArch(
        name="clip_text",
        sentinels="diffstudio.detect.clip:CLIP_SENTINELS",
        # The "other" layout of a CLIP text encoder in single files is OpenCLIP's (SD 2.x, SDXL's bigG);
        # the transformers layout is the canonical one.
        diffusers_sentinels="diffstudio.detect.clip:OPENCLIP_SENTINELS",
        derive_config=_lazy("diffstudio.detect.clip:derive_clip_config"),
        config_from_diffusers=_lazy("diffstudio.detect.clip:clip_config_from_dict"),
        build=_lazy("diffstudio.convert.clip:build_clip_text_model"),
        from_diffusers=_lazy("diffstudio.convert.clip:canonical_clip_keys"),
        to_diffusers=lambda sd, config: dict(sd),
        config_to_dict=lambda config: config.to_dict(),
        config_from_dict=_lazy("diffstudio.detect.clip:clip_config_from_dict"),
        normalise_always=True,
        other_layout="openclip",
    ),
    # Kolors' text encoder (ChatGLM3-6B). Canonical = the released names; a bare ChatGLMModel's state dict
    # lacks the `transformer.` level, and the unused LM head and rotary buffer are dropped in every layout.
    "chatglm": ComponentArch(
        name="chatglm",
        sentinels="diffstudio.detect.chatglm:CHATGLM_SENTINELS",
        diffusers_sentinels="diffstudio.detect.chatglm:CHATGLM_DIFFUSERS_SENTINELS",
        derive_config=_lazy("diffstudio.detect.chatglm:derive_chatglm_config"),
        config_from_diffusers=_lazy("diffstudio.detect.chatglm:config_from_json"),
        build=_lazy("diffstudio.models.chatglm:ChatGLMEncoder"),
        from_diffusers=_lazy("diffstudio.convert.chatglm:canonical_chatglm_keys"),
        to_diffusers=_lazy("diffstudio.convert.chatglm:chatglm_to_released"),
        config_to_dict=_dataclass_to_dict,
        config_from_dict=_lazy("diffstudio.models.chatglm:ChatGLMConfig.from_dict"),
        normalise_always=True,
    ),
    # FLUX.1 transformer (dev / schnell). Canonical = BFL's names (flux1-dev.safetensors, bare keys).
    "flux_dit": ComponentArch(
        name="flux_dit",
        sentinels="diffstudio.detect.flux:FLUX_SENTINELS",
        diffusers_sentinels="diffstudio.detect.flux:FLUX_DIFFUSERS_SENTINELS",
        derive_config=_lazy("diffstudio.detect.flux:derive_flux_config"),
        config_from_diffusers=_lazy("diffstudio.detect.flux:config_from_diffusers"),
        build=_lazy("diffstudio.models.flux:FluxTransformer"),
        from_diffusers=_lazy("diffstudio.convert.flux:flux_from_diffusers"),
        to_diffusers=_lazy("diffstudio.convert.flux:flux_to_diffusers"),
        config_to_dict=lambda config: config.to_dict(),
        config_from_dict=_lazy("diffstudio.models.flux:FluxConfig.from_dict"),
    ),
    # SD3 / SD3.5 MMDiT. Canonical = the original release's names (sd3_medium.safetensors,
    # under `model.diffusion_model.`); diffusers' SD3Transformer2DModel is converted.
    "mmdit": ComponentArch(
        name="mmdit",
        sentinels="diffstudio.detect.mmdit:MMDIT_SENTINELS",
        diffusers_sentinels="diffstudio.detect.mmdit:MMDIT_DIFFUSERS_SENTINELS",
        derive_config=_lazy("diffstudio.detect.mmdit:derive_mmdit_config"),
        config_from_diffusers=_lazy("diffstudio.detect.mmdit:config_from_diffusers"),
        build=_lazy("diffstudio.models.mmdit:MMDiT"),
        from_diffusers=_lazy("diffstudio.convert.mmdit:mmdit_from_diffusers"),
        to_diffusers=_lazy("diffstudio.convert.mmdit:mmdit_to_diffusers"),
        config_to_dict=lambda config: config.to_dict(),
        config_from_dict=_lazy("diffstudio.models.mmdit:MMDiTConfig.from_dict"),
    ),
    # T5 / mT5 encoder (SD3's and FLUX's T5-XXL, Hunyuan-DiT's mT5), a transformers T5EncoderModel.
    # Canonical = HF names with the embedding as `shared.weight` only; one layout, normalised always.
    "t5_encoder": ComponentArch(
        name="t5_encoder",
        sentinels="diffstudio.detect.t5:T5_SENTINELS",
        diffusers_sentinels="diffstudio.detect.t5:T5_SENTINELS",
        derive_config=_lazy("diffstudio.detect.t5:derive_t5_config"),
        config_from_diffusers=_lazy("diffstudio.detect.t5:t5_config_from_json"),
        build=_lazy("diffstudio.convert.t5:build_t5_encoder"),
        from_diffusers=_lazy("diffstudio.convert.t5:canonical_t5_keys"),
        to_diffusers=lambda sd, config: dict(sd),
        config_to_dict=lambda config: config.to_dict(),
        config_from_dict=_lazy("diffstudio.detect.t5:t5_config_from_json"),
        normalise_always=True,
    ),
    # Hunyuan-DiT v1.0-v1.2. Canonical = the released t2i/model/pytorch_model_*.pt names.
    "hunyuan_dit": ComponentArch(
        name="hunyuan_dit",
        sentinels="diffstudio.detect.hunyuan_dit:HUNYUAN_DIT_SENTINELS",
        diffusers_sentinels="diffstudio.detect.hunyuan_dit:HUNYUAN_DIT_DIFFUSERS_SENTINELS",
        derive_config=_lazy("diffstudio.detect.hunyuan_dit:derive_hunyuan_dit_config"),
        config_from_diffusers=_lazy("diffstudio.detect.hunyuan_dit:config_from_diffusers"),
        build=_lazy("diffstudio.models.hunyuan_dit:HunyuanDiT"),
        from_diffusers=_lazy("diffstudio.convert.hunyuan_dit:hunyuan_dit_from_diffusers"),
        to_diffusers=_lazy("diffstudio.convert.hunyuan_dit:hunyuan_dit_to_diffusers"),
        config_to_dict=lambda config: config.to_dict(),
        config_from_dict=_lazy("diffstudio.models.hunyuan_dit:HunyuanDiTConfig.from_dict"),
    ),
    # ControlNet for the LDM UNet (SD 1.x, SDXL). Canonical = the cldm release's names (control_model. stripped);
    # not a family role: it is added to a loaded model (models.add_controlnet).
    "controlnet": ComponentArch(
        name="controlnet",
        sentinels="diffstudio.detect.controlnet:CONTROLNET_SENTINELS",
        diffusers_sentinels="diffstudio.detect.controlnet:CONTROLNET_DIFFUSERS_SENTINELS",
        derive_config=_lazy("diffstudio.detect.controlnet:derive_controlnet_config"),
        config_from_diffusers=_lazy("diffstudio.detect.controlnet:controlnet_config_from_diffusers"),
        build=_lazy("diffstudio.models.controlnet:ControlNetModel"),
        from_diffusers=_lazy("diffstudio.convert.controlnet:controlnet_from_diffusers"),
        to_diffusers=_lazy("diffstudio.convert.controlnet:controlnet_to_diffusers"),
        config_to_dict=_dataclass_to_dict,
        config_from_dict=_lazy("diffstudio.detect.controlnet:controlnet_config_from_dict"),
        kohya_layout="diffusers",
    ),
    # AnimateDiff motion modules: an add-on to an LDM UNet (docs/animatediff.md). Canonical = the released
    # mm_*.ckpt names; diffusers' MotionAdapter layout is converted.
    "motion_module": ComponentArch(
        name="motion_module",
        sentinels="diffstudio.detect.motion:MOTION_SENTINELS",
        diffusers_sentinels="diffstudio.detect.motion:MOTION_DIFFUSERS_SENTINELS",
        derive_config=_lazy("diffstudio.detect.motion:derive_motion_config"),
        config_from_diffusers=_lazy("diffstudio.detect.motion:config_from_diffusers"),
        build=_lazy("diffstudio.models.motion:MotionModules"),
        from_diffusers=_lazy("diffstudio.convert.motion:motion_from_diffusers"),
        to_diffusers=_lazy("diffstudio.convert.motion:motion_to_diffusers"),
        config_to_dict=lambda config: config.to_dict(),
        config_from_dict=_lazy("diffstudio.models.motion:MotionConfig.from_dict"),
    ),
    # IP-Adapter (image prompts) for the LDM UNet: an add-on (models.add_ip_adapter, docs/ipadapter.md). Canonical =
    # the released names (image_proj.*, ip_adapter.N.to_k_ip / to_v_ip); there is no other layout.
    "ip_adapter": ComponentArch(
        name="ip_adapter",
        sentinels="diffstudio.detect.ipadapter:IP_ADAPTER_SENTINELS",
        diffusers_sentinels="diffstudio.detect.ipadapter:IP_ADAPTER_SENTINELS",
        derive_config=_lazy("diffstudio.detect.ipadapter:derive_ip_adapter_config"),
        config_from_diffusers=_lazy("diffstudio.detect.ipadapter:ip_adapter_config_from_dict"),
        build=_lazy("diffstudio.models.ipadapter:IPAdapter"),
        from_diffusers=lambda sd: dict(sd),
        to_diffusers=lambda sd, config: dict(sd),
        config_to_dict=lambda config: config.to_dict(),
        config_from_dict=_lazy("diffstudio.detect.ipadapter:ip_adapter_config_from_dict"),
    ),
    # BERT text encoder (Hunyuan-DiT's bilingual CLIP text tower), a transformers BertModel.
    "bert": ComponentArch(
        name="bert",
        sentinels="diffstudio.detect.bert:BERT_SENTINELS",
        diffusers_sentinels="diffstudio.detect.bert:BERT_PREFIXED_SENTINELS",
        derive_config=_lazy("diffstudio.detect.bert:derive_bert_config"),
        config_from_diffusers=_lazy("diffstudio.detect.bert:bert_config_from_json"),
        build=_lazy("diffstudio.convert.bert:build_bert"),
        from_diffusers=_lazy("diffstudio.convert.bert:canonical_bert_keys"),
        to_diffusers=lambda sd, config: dict(sd),
        config_to_dict=lambda config: config.to_dict(),
        config_from_dict=_lazy("diffstudio.detect.bert:bert_config_from_json"),
        normalise_always=True,
    ),
}
