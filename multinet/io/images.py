"""A folder of images as a tensor, decoded with Pillow.

A folder with one subfolder per class (ImageFolder layout) gives labels: classes in sorted
name order, 0, 1, ...; a flat folder of images gives none. Files are read in sorted order, so
the same folder always gives the same tensor. Pixels become floats in [0, 1], then
``(x - mean) / std`` per channel when a normalisation is given.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MultinetError

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class ImageOptions:
    """How images are turned into model inputs: size (H, W), channels (1 or 3), per-channel mean and std."""

    size: tuple[int, int] | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.size, self.channels, self.mean, self.std))

    @classmethod
    def parse(cls, size=None, channels: int | None = None, mean=None, std=None) -> ImageOptions:
        """From command-line text or scenario values: ``size`` 32, "32x48" or [32, 48]; mean/std "0.5,0.5" or lists."""
        return cls(size=parse_size(size) if size is not None else None, channels=channels,
                   mean=parse_floats(mean, "mean") if mean is not None else None,
                   std=parse_floats(std, "std") if std is not None else None)


def parse_size(text: str | int | tuple | list) -> tuple[int, int]:
    """``32`` or ``"32x48"`` (height x width) or ``[32, 48]`` -> (H, W)."""
    try:
        parts = [int(text)] if isinstance(text, int) else [int(v) for v in
                                                          (text if isinstance(text, (tuple, list)) else
                                                           str(text).lower().split("x"))]
    except ValueError:
        raise MultinetError(f"image size {text!r} must be N or HxW, e.g. 32 or 32x48") from None
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise MultinetError(f"image size {text!r} must be N or HxW with positive sides, e.g. 32 or 32x48")
    return (parts[0], parts[-1])


def parse_floats(text: str | float | list, name: str) -> tuple[float, ...]:
    """``"0.5"`` / ``"0.485,0.456,0.406"`` / a number / a list -> a tuple of floats."""
    try:
        values = (float(text),) if isinstance(text, (int, float)) else tuple(
            float(v) for v in (text if isinstance(text, (tuple, list)) else str(text).split(",")))
    except ValueError:
        raise MultinetError(f"{name} {text!r} must be numbers separated by commas, e.g. 0.5 or 0.485,0.456,0.406") \
            from None
    if not values:
        raise MultinetError(f"{name} needs at least one number")
    return values


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SUFFIXES and not path.name.startswith(".")


def read_folder(folder: Path, options: ImageOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All images under ``folder`` -> (N x C x H x W float32, labels or None)."""
    files, labels = _listing(folder)
    mode = _mode(files, options.channels)
    size = options.size or _common_size(files, folder)
    x = torch.from_numpy(np.stack([_decode(f, mode, size) for f in files])).float().div_(255.0)
    x = x.reshape(len(files), size[0], size[1], -1).permute(0, 3, 1, 2).contiguous()
    return _normalise(x, options), (torch.tensor(labels) if labels is not None else None)


def _listing(folder: Path) -> tuple[list[Path], list[int] | None]:
    """Sorted image files, and their class indices when the folder has one subfolder per class."""
    top = sorted(p for p in folder.iterdir() if is_image(p))
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and any(is_image(p) for p in d.iterdir()))
    if top and classes:
        raise MultinetError(f"{folder} has images both at its top and in subfolders; use one subfolder per class "
                            f"(labelled) or only images at the top (no labels)")
    if not top and not classes:
        raise MultinetError(f"{folder} holds no images ({', '.join(SUFFIXES)})")
    if top:
        return top, None
    pairs = [(p, i) for i, d in enumerate(classes) for p in sorted(p for p in d.iterdir() if is_image(p))]
    return [p for p, _ in pairs], [i for _, i in pairs]


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as exc:
        raise MultinetError(f"cannot decode image {path}: {exc}") from None


def _mode(files: list[Path], channels: int | None) -> str:
    """Pillow mode: "L" for 1 channel, "RGB" for 3; by default 1 only when every image is single-band."""
    if channels not in (None, 1, 3):
        raise MultinetError(f"channels must be 1 or 3, got {channels}")
    if channels is None:
        channels = 1 if all(len(_bands(f)) == 1 for f in files) else 3
    return "L" if channels == 1 else "RGB"


def _bands(path: Path) -> tuple[str, ...]:
    with _open(path) as img:
        return img.getbands()


def _common_size(files: list[Path], folder: Path) -> tuple[int, int]:
    """The one (H, W) all images share; differing sizes need a resize spec."""
    sizes = {}
    for f in files:
        with _open(f) as img:
            sizes.setdefault((img.height, img.width), f)
    if len(sizes) > 1:
        (a, fa), (b, fb) = list(sizes.items())[:2]
        raise MultinetError(f"images in {folder} differ in size ({a[0]}x{a[1]} in {fa.name}, {b[0]}x{b[1]} in "
                            f"{fb.name}); give an image size to resize them (--image-size 32 or 32x32, "
                            f"data.image_size in a scenario)")
    return next(iter(sizes))


def _decode(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    with _open(path) as img:
        try:
            img = img.convert(mode)
        except OSError as exc:
            raise MultinetError(f"cannot decode image {path}: {exc}") from None
        if (img.height, img.width) != size:
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def _normalise(x: torch.Tensor, options: ImageOptions) -> torch.Tensor:
    """(x - mean) / std per channel; one value applies to every channel."""
    channels = x.shape[1]
    mean = _per_channel(options.mean or (0.0,), channels, "mean")
    std = _per_channel(options.std or (1.0,), channels, "std")
    if (std <= 0).any():
        raise MultinetError(f"std must be positive, got {options.std}")
    return (x - mean) / std


def _per_channel(values: tuple[float, ...], channels: int, name: str) -> torch.Tensor:
    if len(values) not in (1, channels):
        raise MultinetError(f"{name} has {len(values)} values for {channels}-channel images; give 1 or {channels}")
    return torch.tensor(values, dtype=torch.float32).expand(channels).reshape(1, channels, 1, 1)
