"""Non-destructive weight patches: LoRA, LoCon, LoHa, LoKr, DoRA (docs/lora.md).

    handle = models.apply_lora("style.safetensors", strength=0.8)   # or apply_lora(models, ...)
    handle.set_strength(0.5, text_strength=1.0)
    handle.remove()                                                   # the base, bit for bit

``inspect_lora(path, models=None)`` is the LoRA doctor (``diffstudio lora inspect``).
"""

from diffstudio.patches.apply import LoRAHandle, active_loras, apply_lora
from diffstudio.patches.doctor import LoRAReport, inspect_lora
from diffstudio.patches.patcher import ModulePatcher, Patch, patcher_for

__all__ = ["LoRAHandle", "LoRAReport", "ModulePatcher", "Patch", "active_loras", "apply_lora", "inspect_lora",
           "patcher_for"]
