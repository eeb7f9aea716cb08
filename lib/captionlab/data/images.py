"""Robust image loading: any common mode to RGB, EXIF rotation, clear errors for broken files; label masks."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from captionlab.errors import DataError, ImageLoadError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a high-bit-depth single-channel array to 0..255."""
    arr = arr.astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
        arr = arr / 65535.0 * 255.0
    elif mode == "F" and arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited on `background`, 16-bit/float scaled, CMYK/palette converted."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = Image.fromarray(_to_uint8(np.asarray(img), img.mode), "L")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as an RGB PIL image (EXIF orientation applied); raise ImageLoadError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"{path}: image file not found" if not path.exists() else f"{path}: not a file")
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone flipped the global: we still want truncation to be an error
        warnings.warn("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; truncated images will load partially")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img).copy()
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"{path}: cannot decode image ({exc})") from None


def list_images(directory: str | os.PathLike, on_error: Literal["raise", "skip"] = "raise",
                check: bool = True) -> list[Path]:
    """Image files in `directory` (any case of extension), sorted; `check` decodes each, bad ones raise or warn+skip."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: image directory not found")
    paths = sorted(p for p in directory.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not check:
        return paths
    good: list[Path] = []
    for p in paths:
        try:
            load_image(p)
        except ImageLoadError as exc:
            if on_error == "raise":
                raise
            warnings.warn(f"skipping unreadable image: {exc}", stacklevel=2)
            continue
        good.append(p)
    return good


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """A label mask PNG as an (H, W) uint8 array (0 background, k = object k); raise ImageLoadError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"{path}: mask file not found")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P", "1"):
                raise ImageLoadError(f"{path}: a mask must be a single-channel 8-bit image, got mode {img.mode}")
            return np.array(img, dtype=np.uint8)
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image (unrecognised format)") from None
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"{path}: cannot decode mask ({exc})") from None
