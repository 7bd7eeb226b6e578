"""The learned ControlNet annotators' networks, in the layouts of their released weight files.

`HEDNetwork`: the Apache-2 re-implementation of HED (Xie & Tu 2015, "Holistically-Nested Edge Detection") that
lllyasviel released as ``ControlNetHED.pth`` (lllyasviel/Annotators) and that the softedge ControlNet was trained
with. An RGB input in 0-255 minus a learned per-channel ``norm``; five VGG-16 stages (2, 2, 3, 3, 3 convs of 3x3,
ReLU after each; 2x2 max-pool before stages 2-5), each stage ending in a 1x1 projection to one side output. The
side outputs (at 1, 1/2, ..., 1/16 of the input's size) are logits; the annotator upsamples and averages them.

`LineartGenerator`: the ``Generator`` of informative-drawings (Chan, Durand & Isola 2022, "Learning to generate
line drawings that convey geometry and semantics"), released as ``sk_model.pth`` (lineart, "realistic") and
``sk_model2.pth`` (lineart, "coarse"). A ResNet-style image-to-image network (Johnson et al. 2016): reflection-
padded 7x7 conv to 64, two stride-2 3x3 convs (128, 256), ``n_blocks`` residual blocks at 256, two stride-2
transposed convs back (128, 64), a reflection-padded 7x7 conv to one channel, sigmoid. Instance norm without
affine parameters and ReLU after every conv but the last. Input RGB in [0, 1]; output 1 = background, 0 = line.

The ``nn.Sequential`` indices below are the released files' key names (``model2.0.conv_block.5.weight``...).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

HED_WIDTHS = (64, 128, 256, 512, 512)
HED_DEPTHS = (2, 2, 3, 3, 3)


class HEDStage(nn.Module):
    """``depth`` 3x3 convs with ReLU, and the 1x1 projection of the result to a side output."""

    def __init__(self, in_channels: int, width: int, depth: int):
        super().__init__()
        self.convs = nn.Sequential(*(nn.Conv2d(in_channels if i == 0 else width, width, 3, padding=1)
                                     for i in range(depth)))
        self.projection = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HEDNetwork(nn.Module):
    """(B, 3, H, W) RGB in 0-255 -> five side-output logits, (B, 1, H / 2^i, W / 2^i) for i = 0..4."""

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        channels = (3,) + HED_WIDTHS
        for i, depth in enumerate(HED_DEPTHS):
            self.add_module(f"block{i + 1}", HEDStage(channels[i], channels[i + 1], depth))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x - self.norm
        sides = []
        for i in range(len(HED_DEPTHS)):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x, side = getattr(self, f"block{i + 1}")(x)
            sides.append(side)
        return sides


def _conv_norm_relu(conv: nn.Module, channels: int) -> list[nn.Module]:
    return [conv, nn.InstanceNorm2d(channels), nn.ReLU()]


class ResidualBlock(nn.Module):
    """x + (pad, conv, norm, ReLU, pad, conv, norm)(x), 3x3 convs at constant width."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), *_conv_norm_relu(nn.Conv2d(channels, channels, 3), channels),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineartGenerator(nn.Module):
    """(B, 3, H, W) RGB in [0, 1], H and W multiples of 4 -> (B, 1, H, W) in [0, 1], 0 where a line is drawn."""

    def __init__(self, n_blocks: int = 3):
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), *_conv_norm_relu(nn.Conv2d(3, 64, 7), 64))
        self.model1 = nn.Sequential(*_conv_norm_relu(nn.Conv2d(64, 128, 3, stride=2, padding=1), 128),
                                    *_conv_norm_relu(nn.Conv2d(128, 256, 3, stride=2, padding=1), 256))
        self.model2 = nn.Sequential(*(ResidualBlock(256) for _ in range(n_blocks)))
        up = {"kernel_size": 3, "stride": 2, "padding": 1, "output_padding": 1}
        self.model3 = nn.Sequential(*_conv_norm_relu(nn.ConvTranspose2d(256, 128, **up), 128),
                                    *_conv_norm_relu(nn.ConvTranspose2d(128, 64, **up), 64))
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, 1, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))
