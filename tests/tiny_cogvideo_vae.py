"""A tiny CogVideoX VAE: diffusers' AutoencoderKLCogVideoX with seeded random weights, and ours loaded from it.

Four levels (8x in space), the first two halving time (4x), as released; widths 8-32, one resnet per encoder
level, 4 latent channels. Shared by the VAE tests and the CogVideoX pipeline tests.
"""

from __future__ import annotations

from diffusers import AutoencoderKLCogVideoX as DiffusersCogVideoXVAE

from diffstudio.detect.cogvideo_vae import derive_cogvideox_vae_config
from diffstudio.models.cogvideo_vae import AutoencoderKLCogVideoX
from tests.tiny_sd15 import randomise

TINY_VAE = dict(block_out_channels=(8, 16, 16, 32), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                temporal_compression_ratio=4, down_block_types=("CogVideoXDownBlock3D",) * 4,
                up_block_types=("CogVideoXUpBlock3D",) * 4)


def reference_vae(seed: int = 0) -> DiffusersCogVideoXVAE:
    model = DiffusersCogVideoXVAE(**TINY_VAE).eval()
    randomise(model, seed)
    return model


def ours_from(reference: DiffusersCogVideoXVAE) -> AutoencoderKLCogVideoX:
    sd = reference.state_dict()
    config = derive_cogvideox_vae_config(sd, {"norm_groups": reference.config.norm_num_groups})
    model = AutoencoderKLCogVideoX(config).eval()
    model.load_state_dict(sd)
    return model
