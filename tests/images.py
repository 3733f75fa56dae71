"""Small image folders for the tests: one sub-folder per class, each class told apart by
which colour channel is bright, so a few steps of training can learn it."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def colour_folder(root: Path, classes, per_class: int, size: tuple[int, int]) -> Path:
    """Write ``per_class`` PNGs of ``size`` (height, width) for each of ``classes`` (at most
    three: class i is bright in channel i) under ``root``; the pixels are seeded, so the
    folder is the same every time."""
    generator = torch.Generator().manual_seed(0)
    for label, name in enumerate(classes):
        (root / name).mkdir()
        for i in range(per_class):
            pixels = (torch.rand(*size, 3, generator=generator) * 80).to(torch.uint8)
            pixels[..., label] += 150
            Image.fromarray(pixels.numpy()).save(root / name / f"{i}.png")
    return root
