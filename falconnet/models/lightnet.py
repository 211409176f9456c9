"""LightNet (paper 3.1, SPEC section 1): stem, four stages of one block type, subsampling, head."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..layers.activation import DEFAULT_ACTIVATION, check_activation
from ..layers.blocks import BLOCKS, make_block
from ..layers.conv_bn import ConvBN


class Stem(nn.Module):
    """conv3x3/2 (3 -> C) + act; [DW3x3 + act -> PW + act] + shortcut; DW3x3/2 (linear).

    The paper's "there also exists a shortcut" (its figure is lost) is read as the residual
    around the DW3x3 + PW pair, the only pair with equal input and output shapes.
    """

    def __init__(self, in_chans: int, width: int, activation: str):
        super().__init__()
        self.conv = ConvBN(in_chans, width, 3, stride=2, activation=activation)
        self.dw = ConvBN(width, width, 3, groups=width, activation=activation)
        self.pw = ConvBN(width, width, 1, activation=activation)
        self.down = ConvBN(width, width, 3, stride=2, groups=width, activation="none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.pw(self.dw(x), residual=x)
        return self.down(x)


class LightNet(nn.Module):
    """LightNet with any Table 1 block type.

    block: a name in falconnet.layers.BLOCKS, used in every stage unless stage_blocks names one
    per stage (FalconNet puts "falcon" blocks in stage 3 only, docs/design.md).
    block_kwargs / stage_block_kwargs: keyword arguments for the blocks (all / per stage).
    """

    def __init__(
        self,
        block: str = "irb",
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 9, 3),
        widths: Sequence[int] = (32, 64, 128, 256),
        head_width: int = 1280,
        activation: str = DEFAULT_ACTIVATION,
        drop_rate: float = 0.0,
        in_chans: int = 3,
        block_kwargs: Optional[dict] = None,
        stage_blocks: Optional[Sequence[str]] = None,
        stage_block_kwargs: Optional[Sequence[Optional[dict]]] = None,
    ):
        super().__init__()
        check_activation(activation)
        if len(depths) != len(widths):
            raise ValueError(f"depths and widths must have the same length, got {len(depths)} and {len(widths)}")
        for a, b in zip(widths, widths[1:]):
            if b % a:
                raise ValueError(f"each stage width must be a multiple of the previous one (grouped subsampling), got {a} -> {b}")
        stage_blocks = list(stage_blocks) if stage_blocks is not None else [block] * len(depths)
        stage_block_kwargs = list(stage_block_kwargs) if stage_block_kwargs is not None else [None] * len(depths)
        if len(stage_blocks) != len(depths) or len(stage_block_kwargs) != len(depths):
            raise ValueError(f"stage_blocks and stage_block_kwargs need one entry per stage ({len(depths)})")
        for name in stage_blocks:
            if name not in BLOCKS:
                raise ValueError(f"unknown block type {name!r}; expected one of {sorted(BLOCKS)}")
        self.in_chans, self.num_classes, self.num_features = in_chans, num_classes, head_width
        self.stem = Stem(in_chans, widths[0], activation)
        self.stages = nn.ModuleList()
        for i, (depth, width) in enumerate(zip(depths, widths)):
            layers = []
            if i > 0:
                # subsampling: conv with groups = C_in, stride 2, C -> 2C, then BN (paper 3.1)
                layers.append(ConvBN(widths[i - 1], width, 3, stride=2, groups=widths[i - 1], activation="none"))
            kwargs = {"activation": activation, **(block_kwargs or {}), **(stage_block_kwargs[i] or {})}
            layers += [make_block(stage_blocks[i], width, **kwargs) for _ in range(depth)]
            self.stages.append(nn.Sequential(*layers))
        self.head = ConvBN(widths[-1], head_width, 1, activation=activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(head_width, num_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Xavier-uniform conv and linear weights (paper 4.1), zero biases; SF-Convs keep their own
        fan-based init (falconnet.layers.sf_conv), BatchNorm the PyTorch default (1, 0)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, stages and the 1x1 head conv: (N, head_width, H/32, W/32)."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"LightNet expects input of shape (N, {self.in_chans}, H, W), got {tuple(x.shape)}")
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(self.pool(x).flatten(1))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh Xavier-initialised classifier for `num_classes` (fine-tuning, timm convention)."""
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes).to(self.classifier.weight.device)
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
