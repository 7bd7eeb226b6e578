"""Family records, in the order detection tries them.

The order matters where one family's signature is a special case of another's: a
record must come before any record whose test it would also pass. Each record's
``check_denoiser`` is written to be exclusive, and tests/test_detect.py checks the order.
"""

from diffstudio.families.base import Family
from diffstudio.families.sd15 import SD15

FAMILIES: tuple[Family, ...] = (SD15,)


def get_family(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    known = ", ".join(f.name for f in FAMILIES)
    raise KeyError(f"unknown family {name!r}; known families: {known}")
