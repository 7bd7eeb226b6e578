"""The FLUX.1 ControlNets of InstantX (as diffusers' ``FluxControlNetModel`` holds them; union included) and XLabs.

References, to read this file with:
  * Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models" (arXiv:2302.05543),
    sec. 3.1: a trainable copy of the network's first part, fed the condition through a zero-initialised
    layer, hands zero-initialised projections of its features back to the frozen network.
  * The InstantX FLUX.1-dev ControlNets (Canny, Depth, Union; InstantX on the Hugging Face Hub, 2024) and
    diffusers' ``FluxControlNetModel``: the facts below (layer names, where the condition enters, the union
    mode token, which tensors come back) are theirs.
  * XLabs' x-flux (github.com/XLabs-AI/x-flux, ``src/flux/controlnet.py``, ``model.py``): ``ControlNetFlux``
    and how ``Flux.forward`` adds its residuals.

For FLUX the "copy" is a shallow FLUX transformer (``FluxTrunk`` of models/flux.py: the same embedders and
blocks, typically 5 double- and 10 single-stream blocks instead of 19 and 38, initialised from the base):

    img = img_in(x_tokens) + controlnet_x_embedder(hint_tokens)       the control image's VAE latent, packed
                                                                      like x; the Linear starts at zero
    txt = [mode token;] txt_in(T5 tokens)                             union: controlnet_mode_embedder[mode]
    double blocks:  after block i, residual_i = controlnet_blocks[i](img)          (B, N_img, hidden)
    single blocks:  after block j, residual_j = controlnet_single_blocks[j](img part of [txt; img])

After its block j the transformer adds residual j // ceil(19 / len(residuals)) to its image tokens
(``models.flux.control_residual``). Every output Linear starts at zero, so an untrained ControlNet changes
nothing.

XLabs' ControlNets (``XLabsFluxControlNet`` below) differ in how the control image enters (a pixel-space
encoder) and in how the transformer's blocks share the residuals.

Union ControlNets (``config.num_modes``) learn one embedding per kind of control image; the chosen one is
prepended to the text tokens (position ids (0, 0, 0) like the text). InstantX's Union numbers its modes
``UNION_MODES`` (canny 0, tile 1, depth 2, blur 3, pose 4, gray 5, low quality 6; the table has 10 rows).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffstudio.errors import InvalidInputError
from diffstudio.models.cpu_linear import Linear
from diffstudio.models.flux import FluxConfig, FluxTrunk, control_residual, image_ids, pack_latents, pad_even

# InstantX FLUX.1-dev-Controlnet-Union's modes, by index (its model card; Shakker-Labs' Union-Pro keeps them).
UNION_MODES = ("canny", "tile", "depth", "blur", "pose", "gray", "lq")


@dataclass
class FluxControlNetConfig(FluxConfig):
    """`FluxConfig`'s fields for the shared trunk (``out_channels`` is unused: a ControlNet has no output
    layer) plus the number of union modes. Defaults: InstantX's FLUX.1-dev ControlNets (5 + 10 blocks); their
    Union adds ``num_modes=10``."""

    depth: int = 5
    depth_single_blocks: int = 10
    num_modes: int | None = None  # rows of controlnet_mode_embedder; None = not a union ControlNet
    hint_channels: int | None = None  # XLabs: its pixel-space hint encoder's input channels (3); None: InstantX
    # Packed channels the control input has beyond the latent's: alimama's inpainting ControlNets read the masked
    # image's latent and the mask (1 channel at latent resolution, 2x2-packed: 4). Their release's config name.
    extra_condition_channels: int = 0


def _zero_linear(width_in: int, width_out: int) -> Linear:
    layer = Linear(width_in, width_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class FluxControlNet(FluxTrunk):
    """See the module docstring. ``mode``: the union mode (an index or a ``UNION_MODES`` name) the pipeline's
    calls use; ``with_mode`` gives a second handle on the same weights with another mode."""

    hint_space = "latent"  # the pipeline hands it the control image's VAE latent (pipeline/control.py)
    takes_network_kwargs = True  # and the transformer's other inputs (guidance, the region mask)
    lowbit_storage = True  # computes in its input's dtype, as the transformer
    kind = "ControlNet"

    def __init__(self, config: FluxControlNetConfig | None = None):
        super().__init__(config or FluxControlNetConfig())
        c, h = self.config, self.config.hidden_size
        self.build_hint_layers(c)
        self.controlnet_blocks = nn.ModuleList(_zero_linear(h, h) for _ in range(c.depth))
        self.controlnet_single_blocks = nn.ModuleList(_zero_linear(h, h) for _ in range(c.depth_single_blocks))
        self.mode: int | str | None = None
        # The (double, single) block counts of the transformer it is added to (the loader sets them): the
        # pipeline's call then gives one residual per transformer block, so that units with different block
        # counts add up place by place. None: one residual per ControlNet block.
        self.transformer_blocks: tuple[int, int] | None = None

    def build_hint_layers(self, c: FluxControlNetConfig) -> None:
        """The layers that bring the control image in: a zero Linear on its packed latent (and packed mask, for the
        inpainting ControlNets); the mode table."""
        self.controlnet_x_embedder = _zero_linear(c.in_channels + c.extra_condition_channels, c.hidden_size)
        self.controlnet_mode_embedder = nn.Embedding(c.num_modes, c.hidden_size) if c.num_modes else None

    @property
    def takes_mask(self) -> bool:
        """An inpainting ControlNet (alimama's): its hint is the masked image's latent and the mask."""
        return self.config.extra_condition_channels > 0

    def latent_hint(self, pixels: torch.Tensor, encode) -> torch.Tensor:
        """The control image (B, 3, H, W) in [0, 1] -> the latent hint, with ``encode`` (pixels in [-1, 1] -> the
        model's latent, (B, 16, H/8, W/8)). The pipeline calls this for every ``hint_space = "latent"`` ControlNet.

        An inpainting ControlNet reads an image from ``annotators.inpaint(image, mask)``: the pixels to repaint
        are negative there (-1). As alimama's pipeline builds its input: the masked image (those pixels black,
        -1 in [-1, 1]) is encoded, the mask is taken to latent resolution (nearest) and flipped (1 = keep,
        0 = repaint), and it is appended as a 17th channel: (B, 17, H/8, W/8), packed 2x2 like the latent."""
        if not self.takes_mask:
            return encode(pixels * 2 - 1)
        hole = (pixels < 0).any(dim=1, keepdim=True)  # (B, 1, H, W), True = repaint
        if not hole.any():
            raise InvalidInputError("this is an inpainting ControlNet (alimama's): its control image is the picture "
                                    "with the part to repaint marked, annotators.inpaint(image, mask); this image "
                                    "marks nothing")
        latent = encode(torch.where(hole, -1.0, pixels * 2 - 1))
        keep = 1 - F.interpolate(hole.float(), size=latent.shape[-2:], mode="nearest")
        return torch.cat([latent, keep.to(latent)], dim=1)

    def hint_input(self, hint: torch.Tensor) -> torch.Tensor:
        """The pipeline's hint (the control image's latent, (B, 16, h, w); an inpainting ControlNet's with the mask,
        (B, 17, h, w)) -> what ``residuals`` takes."""
        return pack_latents(pad_even(hint))

    def embed_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """``residuals``' hint -> (B, N_img, hidden), added to the embedded image tokens."""
        return self.controlnet_x_embedder(hint)

    def spread(self, samples: list[torch.Tensor], index: int, blocks: int) -> torch.Tensor:
        """The residual for transformer block ``index`` of ``blocks`` (InstantX: consecutive blocks share one)."""
        return control_residual(samples, index, blocks)

    @property
    def is_union(self) -> bool:
        return self.controlnet_mode_embedder is not None

    def with_mode(self, mode: int | str) -> FluxControlNet:
        """The same ControlNet (shared weights, no copy of them) set to union ``mode``: one loaded union
        ControlNet serves several units, e.g. ``cn.with_mode("depth")`` and ``cn.with_mode("canny")``."""
        self.mode_index(mode)  # checked now, not at the first step
        twin = copy.copy(self)  # a shallow copy: the same parameter and submodule dicts
        twin.mode = mode
        return twin

    def mode_index(self, mode: int | str | None) -> int | None:
        """A union mode (index or name) as its row of the mode table; None for a ControlNet without modes."""
        if not self.is_union:
            if mode is not None:
                raise InvalidInputError(f"this FLUX ControlNet has no union modes (got mode={mode!r}); only union "
                                        "ControlNets (a controlnet_mode_embedder) take one")
            return None
        rows = self.controlnet_mode_embedder.num_embeddings
        if mode is None:
            raise InvalidInputError(f"this is a union FLUX ControlNet ({rows} modes): say what its control image is, "
                                    f"e.g. controlnet.with_mode('depth'); InstantX's modes: {', '.join(UNION_MODES)} "
                                    "(or an index)")
        if isinstance(mode, str):
            if mode not in UNION_MODES:
                raise InvalidInputError(f"unknown union mode {mode!r}; InstantX's are {', '.join(UNION_MODES)} "
                                        "(or pass an index)")
            return UNION_MODES.index(mode)
        if not 0 <= int(mode) < rows:
            raise InvalidInputError(f"union mode {mode} is out of range: this ControlNet has modes 0..{rows - 1}")
        return int(mode)

    def forward(self, x: torch.Tensor, hint: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor, guidance: torch.Tensor | None = None, joint_bias: torch.Tensor | None = None,
                mode: int | str | None = None, **_) -> dict[str, list[torch.Tensor]]:
        """The pipeline's call (pipeline/control.py): x, the network's input latent (B, 16, h, w), hint the
        control image's latent (B, 16, h, w), t the flow time, context the T5 tokens, y the pooled CLIP vector,
        guidance the distilled guidance scale. Odd sides are padded as ``families.flux.call_dit`` pads them,
        so the residuals fit its token grid. Other network inputs are not read. With ``transformer_blocks``
        set, each list has one entry per transformer block (the same tensor repeated, no copies)."""
        x = pad_even(x)
        h, w = x.shape[-2:]
        txt_ids = torch.zeros(context.shape[1], 3, device=x.device)
        res = self.residuals(pack_latents(x), self.hint_input(hint.to(x.dtype)), image_ids(h, w, x.device), context,
                             txt_ids, t, y, guidance, joint_bias, self.mode if mode is None else mode)
        if self.transformer_blocks is None:
            return res
        return {kind: [self.spread(res[kind], i, blocks) for i in range(blocks)] if res[kind] else []
                for kind, blocks in zip(("double", "single"), self.transformer_blocks)}

    def residuals(self, img: torch.Tensor, hint: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor,
                  txt_ids: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor,
                  guidance: torch.Tensor | None = None, joint_bias: torch.Tensor | None = None,
                  mode: int | str | None = None) -> dict[str, list[torch.Tensor]]:
        """On packed tokens, with the transformer's arguments (models/flux.py) plus ``hint``, the control
        latent packed like ``img`` (B, N_img, in_channels) (XLabs: the control image, see there):
        {"double": [...], "single": [...]}, one (B, N_img, hidden) residual per block, in block order."""
        dtype = img.dtype
        index = self.mode_index(mode)
        vec = self.conditioning_vector(timesteps, y, guidance, img)
        img = self.img_in(img) + self.embed_hint(hint.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        if index is not None:  # the union mode's token goes in front of the text, at position (0, 0, 0)
            token = self.controlnet_mode_embedder.weight[index].to(dtype)
            txt = torch.cat((token.expand(txt.shape[0], 1, -1), txt), dim=1)
            txt_ids = torch.cat((torch.zeros_like(txt_ids[..., :1, :]), txt_ids), dim=-2)
            if joint_bias is not None:  # region prompts: the mode token sees, and is seen by, every token
                joint_bias = torch.nn.functional.pad(joint_bias, (1, 0, 1, 0))
        if joint_bias is not None:
            joint_bias = joint_bias.to(device=img.device, dtype=dtype)
        freqs = self.rope(txt_ids, img_ids, img.device)

        double = []
        for block, out in zip(self.double_blocks, self.controlnet_blocks):
            img, txt = self._run(block, img, txt, vec, freqs, joint_bias)
            double.append(out(img))
        n_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        single = []
        for block, out in zip(self.single_blocks, self.controlnet_single_blocks):
            x = self._run(block, x, vec, freqs, joint_bias)
            single.append(out(x[:, n_txt:]))
        return {"double": double, "single": single}


class XLabsFluxControlNet(FluxControlNet):
    """XLabs' FLUX.1-dev ControlNets (x-flux ``ControlNetFlux``; ``flux-canny-controlnet-v3.safetensors`` ...), in
    their release's names: BFL's for the trunk (2 double blocks, no single blocks), ``controlnet_blocks.N``, and

        hint = input_hint_block(control image in [-1, 1])        cldm's tiny encoder at 16 channels: 8 convs,
                                                                 three of stride 2, (B, 16, H/8, W/8)
        img  = img_in(x_tokens) + pos_embed_input(pack(hint))     2x2 patches, as the latent is packed

    The transformer's double block j gets residual j % n (x-flux's rule, diffusers' ``controlnet_blocks_repeat``):
    the residuals repeat along the 19 blocks instead of each serving consecutive ones, so the pipeline's call
    spreads them with that rule (``transformer_blocks``, FLUX.1's 19 / 38 until the loader sets the base's).
    """

    hint_space = "pixels"  # the pipeline hands it the control image (B, 3, H, W) in [0, 1]

    def build_hint_layers(self, c: FluxControlNetConfig) -> None:
        from diffstudio.models.controlnet import hint_block

        if c.in_channels % 4:
            raise ValueError(f"an XLabs ControlNet packs 2x2 patches of its hint: in_channels {c.in_channels} is "
                             "not a multiple of 4")
        self.input_hint_block = hint_block(c.hint_channels or 3, [XLABS_HINT_WIDTH] * 4, c.in_channels // 4)
        nn.init.zeros_(self.input_hint_block[-1].weight)
        nn.init.zeros_(self.input_hint_block[-1].bias)
        self.pos_embed_input = Linear(c.in_channels, c.hidden_size)
        self.controlnet_mode_embedder = None

    def hint_input(self, hint: torch.Tensor) -> torch.Tensor:
        return hint * 2 - 1  # x-flux feeds the control image in [-1, 1]

    def embed_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """The control image (B, C, H, W) in [-1, 1] -> (B, N_img, hidden); an odd latent side is padded as the
        latent is."""
        return self.pos_embed_input(pack_latents(pad_even(self.input_hint_block(hint, None, None))))

    def spread(self, samples: list[torch.Tensor], index: int, blocks: int) -> torch.Tensor:
        return samples[index % len(samples)]

    def __init__(self, config: FluxControlNetConfig | None = None):
        super().__init__(config or FluxControlNetConfig(depth=2, depth_single_blocks=0, hint_channels=3))
        # Its residuals only make sense spread by its own rule: FLUX.1's block counts until the loader says.
        self.transformer_blocks = (FLUX1_DEPTH, FLUX1_SINGLE_DEPTH)


XLABS_HINT_WIDTH = 16  # x-flux's input_hint_block: 16 channels throughout
FLUX1_DEPTH, FLUX1_SINGLE_DEPTH = 19, 38
