"""Family records, in the order detection tries them.

The order matters where one family's signature is a special case of another's: a
record must come before any record whose test it would also pass. Each record's
``check_denoiser`` is written to be exclusive, and tests/test_detect.py checks the order.
"""

from diffstudio.families.base import Family
from diffstudio.families.cogvideox import COGVIDEOX
from diffstudio.families.flux import FLUX
from diffstudio.families.hunyuan import HUNYUAN_DIT
from diffstudio.families.kolors import KOLORS
from diffstudio.families.sd3 import SD3
from diffstudio.families.sd15 import SD15
from diffstudio.families.sdxl import SDXL, SDXL_REFINER
from diffstudio.families.svd import SVD

# SDXL base and refiner exclude each other by the lowest level's transformer blocks, and SD 1.x
# (no label_emb, conv proj_in) excludes both.
# Kolors (an SDXL UNet + encoder_hid_proj) goes before SDXL: the more specific signature first, although
# SDXL's test refuses an encoder_hid_proj too.
# FLUX (a flux_dit transformer, no UNet) excludes every UNet family.
# SD3 (an mmdit transformer) excludes every other family by its denoiser architecture.
# Hunyuan-DiT (a hunyuan_dit transformer) likewise, and CogVideoX (a cogvideo_dit transformer).
# SVD (an svd_unet: time_stack blocks, 8 input channels) is refused by every LDM UNet family's test.
FAMILIES: tuple[Family, ...] = (SD15, KOLORS, SDXL, SDXL_REFINER, FLUX, SD3, HUNYUAN_DIT, COGVIDEOX, SVD)


def get_family(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    known = ", ".join(f.name for f in FAMILIES)
    raise KeyError(f"unknown family {name!r}; known families: {known}")
