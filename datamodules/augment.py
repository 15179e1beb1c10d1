"""Batch augmentation on tensors, on whatever device holds the batch: random crop, flip, Cutout.

The per-sample PIL transforms of torchvision cost more than the training step of a small net;
here one batch is cropped, flipped and cut out with a few indexing operations.
"""

from __future__ import annotations

import torch

from lightning_modules.errors import require


class BatchAugment:
    """Random crop with zero padding, horizontal flip and Cutout for a normalised (N, C, H, W) batch.

    Padding is filled with the normalised value of a black pixel (what torchvision's RandomCrop pads
    the raw image with); Cutout fills its square with 0, the dataset mean (DeVries & Taylor, 2017).
    Randomness comes from torch's generator of the batch's device, seeded by `seed_everything`.
    """

    def __init__(self, crop_padding: int = 0, flip: bool = False, cutout: int = 0, fill: tuple[float, ...] = (0.0,)):
        """
        Args:
            crop_padding: pad each side by this many pixels, then crop back to the original size at a
                random offset per sample; 0 = no crop.
            flip: flip half of the samples left-right.
            cutout: side of the square zeroed at a random centre per sample (may overlap the border); 0 = off.
            fill: per-channel value of the padding (the normalised black pixel, -mean/std).
        """
        require("non_negative", crop_padding=crop_padding, cutout=cutout)
        self.crop_padding, self.flip, self.cutout, self.fill = crop_padding, flip, cutout, tuple(fill)

    def __bool__(self) -> bool:
        return bool(self.crop_padding or self.flip or self.cutout)

    def __repr__(self) -> str:
        return f"BatchAugment(crop_padding={self.crop_padding}, flip={self.flip}, cutout={self.cutout})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.crop_padding:
            x = self.random_crop(x)
        if self.flip:
            flipped = torch.rand(len(x), device=x.device) < 0.5
            x = torch.where(flipped.view(-1, 1, 1, 1), x.flip(3), x)
        if self.cutout:
            x = self.random_cutout(x)
        return x

    def random_crop(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.crop_padding
        fill = torch.tensor(self.fill, dtype=x.dtype, device=x.device).expand(c).view(1, c, 1, 1)
        padded = fill.expand(n, c, h + 2 * p, w + 2 * p).clone()
        padded[:, :, p : p + h, p : p + w] = x
        dy = torch.randint(0, 2 * p + 1, (n, 1), device=x.device)
        dx = torch.randint(0, 2 * p + 1, (n, 1), device=x.device)
        rows = (dy + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * p)
        cropped_rows = padded.gather(2, rows)
        cols = (dx + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
        return cropped_rows.gather(3, cols)

    def random_cutout(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cy = torch.randint(0, h, (n, 1, 1), device=x.device)
        cx = torch.randint(0, w, (n, 1, 1), device=x.device)
        ys = torch.arange(h, device=x.device).view(1, h, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, w)
        half = self.cutout // 2
        inside = (ys >= cy - half) & (ys < cy - half + self.cutout) & (xs >= cx - half) & (xs < cx - half + self.cutout)
        return x.masked_fill(inside.unsqueeze(1), 0.0)
