"""Augmentation on whole batches: rotations and flips on the same 28x28 canvas.

Images are uint8 or float, (B,28,28) or (B,1,28,28); the output keeps the input's dtype and shape.
Positive angles turn the drawing counter-clockwise as displayed (as torch.rot90 and torchvision do).
"""
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from utils.data import QuickDrawSet


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[1] != 1):
        raise ValueError(f"expected images (B,H,W) or (B,1,H,W), got {tuple(x.shape)}")
    return x.unsqueeze(1) if x.ndim == 3 else x


def _theta(degrees: torch.Tensor, scale=None, flip=None, shift=None) -> torch.Tensor:
    """(B,2,3) maps from output to input coordinates (what affine_grid wants) for the forward warp
    p -> scale * R(degrees) @ flip * p + shift, in normalized coordinates ([-1, 1], y down)."""
    a = torch.deg2rad(degrees)
    cos, sin = a.cos(), a.sin()
    # The inverse of R (a counter-clockwise turn with y pointing down) is its transpose.
    inverse = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B,2,2)
    if flip is not None:  # (B,2) of +1/-1: a flip is its own inverse, applied last on the way back
        inverse = inverse * flip[:, :, None]
    if scale is not None:  # (B,)
        inverse = inverse / scale[:, None, None]
    offset = torch.zeros_like(inverse[:, :, :1]) if shift is None else -inverse @ shift[:, :, None]
    return torch.cat([inverse, offset], -1)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample a batch by per-sample affine maps theta (B,2,3), bilinear, empty (0) outside."""
    batch = _as_batch(x)
    image = batch if batch.is_floating_point() else batch.float()
    grid = F.affine_grid(theta.to(image), list(image.shape), align_corners=False)  # (B,H,W,2)
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if not x.is_floating_point():
        out = out.round_().clamp_(0, 255).to(x.dtype)
    return out.view(x.shape)


def rotate(x: torch.Tensor, degrees) -> torch.Tensor:
    """Turn every image by degrees (a number, or a (B,) tensor: one angle per image)."""
    degrees = torch.as_tensor(degrees, dtype=torch.float32, device=x.device).expand(len(x))
    return _warp(x, _theta(degrees))


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left-right."""
    return torch.flip(_as_batch(x), dims=(-1,)).view(x.shape)


def vflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror top-bottom."""
    return torch.flip(_as_batch(x), dims=(-2,)).view(x.shape)


FLIPS = {"h": hflip, "v": vflip}


def xl_augment(ds: QuickDrawSet, angles=(-15, 15), flips=("h", "v"), chunk=8192) -> QuickDrawSet:
    """The original "XL" training set: ds, then one turned copy per angle, one flipped copy per flip.

    Apply it to the training split only, after splitting. Copies are made chunk images at a time to
    bound the float working memory.
    """
    unknown = [f for f in flips if f not in FLIPS]
    if unknown:
        raise ValueError(f"unknown flips {unknown}; choose from {sorted(FLIPS)}")
    ops = [partial(rotate, degrees=a) for a in angles] + [FLIPS[f] for f in flips]
    n = len(ds)
    images = torch.empty((n * (1 + len(ops)), *ds.images.shape[1:]), dtype=ds.images.dtype)
    images[:n] = ds.images
    for k, op in enumerate(ops, start=1):
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            images[k * n + s:k * n + e] = op(ds.images[s:e])
    return QuickDrawSet(images, ds.labels.repeat(1 + len(ops)), ds.classes)


class RandomAugment(nn.Module):
    """A fresh random turn, flips and (optionally) zoom and shift for every image of a training batch.

    One grid_sample for the whole batch. Identity in eval mode. The defaults stay mild: the bitmaps
    are already centred and scaled to their bounding box, so large zooms or shifts are unlike real
    drawings.
    """

    def __init__(self, max_degrees=15.0, p_hflip=0.5, p_vflip=0.0, max_scale=0.0, max_shift=0.0):
        super().__init__()
        for name, p in (("p_hflip", p_hflip), ("p_vflip", p_vflip)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if max_degrees < 0 or not 0 <= max_scale < 1 or max_shift < 0:
            raise ValueError("max_degrees and max_shift must be >= 0 and max_scale in [0, 1)")
        self.max_degrees, self.max_scale, self.max_shift = max_degrees, max_scale, max_shift
        self.p_flip = (p_hflip, p_vflip)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x float (B,1,28,28) -> same shape; generator (on x's device) makes the draw reproducible."""
        if not self.training:
            return x
        u = torch.rand(len(x), 6, device=x.device, generator=generator)  # (B,6) in [0, 1)
        sym = 2 * u - 1  # (B,6) in [-1, 1)
        degrees = sym[:, 0] * self.max_degrees
        flip = torch.where(u[:, 1:3] < torch.tensor(self.p_flip, device=x.device), -1.0, 1.0)  # (B,2)
        scale = 1 + sym[:, 3] * self.max_scale
        shift = sym[:, 4:6] * (2 * self.max_shift)  # a fraction of the side; the side spans 2 units
        return _warp(x, _theta(degrees, scale, flip, shift))

    def extra_repr(self) -> str:
        return (f"max_degrees={self.max_degrees}, p_hflip={self.p_flip[0]}, p_vflip={self.p_flip[1]}, "
                f"max_scale={self.max_scale}, max_shift={self.max_shift}")
