"""Doodle classifiers for 28x28 Quick, Draw! bitmaps.

Every model takes x float32 (B, 1, 28, 28) in [0, 1] (see utils.data.to_float) and returns
logits (B, n_classes).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class QuickDrawCNN_V1(nn.Module):
    """The original study's first network: two 5x5 conv blocks and one linear layer."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),   # (B,16,14,14)
            nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # (B,32,7,7)
        )
        self.classifier = nn.Linear(32 * 7 * 7, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))  # (B,1568) -> (B,C)


class QuickDrawCNN_V2(nn.Module):
    """The original study's second network, layer for layer as its table gives it."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),   # (B,16,14,14)
            nn.Conv2d(16, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # (B,32,7,7)
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),  # (B,64,3,3)
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * 3 * 3, 256), nn.ReLU(), nn.Dropout(0.3),  # (B,256)
            nn.Linear(256, n_classes),                               # (B,C)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class ConvBN(nn.Sequential):
    """Conv (no bias: BN follows) + BatchNorm + ReLU; by default 3x3, same spatial size."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """Two 3x3 ConvBN layers with an identity shortcut (channels and size unchanged)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvBN(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(self.conv1(x))))


class QuickDrawResNet(nn.Module):
    """A small ResNet for 28x28 doodles: widen, pool, one residual block per stage, global pool.

    Stages at 28, 14 and 7 pixels keep the strokes' detail early, and global average pooling keeps
    the head small (no 576x256 dense layer as in V2).
    """

    def __init__(self, n_classes: int, widths: tuple[int, int, int] = (32, 64, 128), dropout: float = 0.2):
        super().__init__()
        w1, w2, w3 = widths
        self.stem = ConvBN(1, w1)                                   # (B,w1,28,28)
        self.stage1 = ResidualBlock(w1)                             # (B,w1,28,28)
        self.stage2 = nn.Sequential(nn.MaxPool2d(2), ConvBN(w1, w2), ResidualBlock(w2))  # (B,w2,14,14)
        self.stage3 = nn.Sequential(nn.MaxPool2d(2), ConvBN(w2, w3), ResidualBlock(w3))  # (B,w3,7,7)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B,w3)
            nn.Dropout(dropout), nn.Linear(w3, n_classes),  # (B,C)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage3(self.stage2(self.stage1(self.stem(x)))))


class Downsample(nn.Sequential):
    """Halve the side with a max-pool, then change the width with a ConvBN: (B,c_in,H,W) -> (B,c_out,H/2,W/2)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.MaxPool2d(2), ConvBN(c_in, c_out))


class QuickDrawNet(nn.Module):
    """A residual network sized for float32 FLOPs on a CPU: no layer at 28 pixels, the work at 14 and 7.

    Layers at 28x28 cost 4x those at 14x14 per channel, in FLOPs and in memory traffic, so the stem is a
    4x4 convolution with stride 2 that maps the bitmap straight to 14x14 (its windows overlap, so no pixel
    is skipped); one residual block runs at 14 and one at 7 pixels, and global average pooling keeps the
    head small. In eval mode the logits are the mean over the drawing and its left-right mirror.
    """

    def __init__(self, n_classes: int, widths: tuple[int, int] = (48, 96), blocks: tuple[int, int] = (1, 1),
                 dropout: float = 0.2, mirror_average: bool = True):
        super().__init__()
        self.mirror_average = mirror_average
        w1, w2 = widths
        self.stem = ConvBN(1, w1, kernel=4, stride=2)                                    # (B,w1,14,14)
        self.stage1 = nn.Sequential(*(ResidualBlock(w1) for _ in range(blocks[0])))     # (B,w1,14,14)
        self.stage2 = nn.Sequential(Downsample(w1, w2), *(ResidualBlock(w2) for _ in range(blocks[1])))  # (B,w2,7,7)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),          # (B,w2)
            nn.Dropout(dropout), nn.Linear(w2, n_classes),  # (B,C)
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage2(self.stage1(self.stem(x))))  # (B,C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.mirror_average:
            return self.logits(x)
        # A left-right mirror is a drawing of the same thing (training flips half the batches), so in
        # eval mode the logits are averaged over the drawing and its mirror image.
        return (self.logits(x) + self.logits(x.flip(-1))) / 2  # (B,C)


MODELS: dict[str, type[nn.Module]] = {
    "v1": QuickDrawCNN_V1,
    "v2": QuickDrawCNN_V2,
    "resnet": QuickDrawResNet,
    "qdnet": QuickDrawNet,
}


def build_model(name: str, n_classes: int) -> nn.Module:
    """Instantiate a registered model by name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    if not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    return MODELS[name](n_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def flops_per_image(model: nn.Module) -> int:
    """Floating-point operations of one training-mode forward pass per 28x28 image (a multiply-add
    counts 2), as torch.utils.flop_counter counts them (convolutions and matrix products). The backward
    pass costs about twice as much again; QuickDrawNet's predictions cost twice this (the mirror image)."""
    from torch.utils.flop_counter import FlopCounterMode

    replica = copy.deepcopy(model).train()  # train mode updates BatchNorm statistics: not the caller's
    with FlopCounterMode(display=False) as counter:
        replica(torch.zeros(2, 1, 28, 28, device=next(model.parameters()).device))
    return counter.get_total_flops() // 2
