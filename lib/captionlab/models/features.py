"""Cache of frozen-encoder features per dataset: computed once into an .npy memmap in the cache, keyed by the
encoder spec and the image list, so later epochs (and later runs) skip the encoder."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from captionlab.models.specs import parse_spec
from captionlab.utils import atomic_path, cache_dir, file_lock


class FeatureStore:
    """Read-only (N, T, D) features on disk; `store[indices]` (a list, tensor or slice) gives a float32 tensor."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.array = np.load(self.path, mmap_mode="r")

    def __len__(self) -> int:
        return self.array.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def __getitem__(self, indices: Sequence[int] | torch.Tensor | slice) -> torch.Tensor:
        if isinstance(indices, slice):
            indices = range(*indices.indices(len(self)))
        idx = np.asarray(indices.tolist() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        return torch.from_numpy(np.array(self.array[idx], dtype=np.float32))


def _spec_fingerprint(spec: str) -> str:
    """The spec plus size/mtime of the files it points at (so a rebuilt local checkpoint invalidates the cache)."""
    parts = [spec]
    p = parse_spec(spec, what="encoder").local_path
    if p is not None:
        files = sorted(p.iterdir()) if p.is_dir() else [p]
        parts += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()]
    return "\n".join(parts)


def cache_key(encoder_spec: str, image_paths: Sequence[str | os.PathLike], dtype: str = "float16") -> str:
    """Hash of the encoder spec (+ its files) and the image list (names, sizes, mtimes) and the storage dtype."""
    h = hashlib.sha256(_spec_fingerprint(encoder_spec).encode())
    h.update(dtype.encode())
    hash_image_files(h, image_paths)
    return h.hexdigest()[:20]


def hash_image_files(h: hashlib._Hash, image_paths: Sequence[str | os.PathLike]) -> None:
    """Add each image's absolute path, size and mtime to `h` (the image part of the feature and embedding keys)."""
    for p in image_paths:
        st = os.stat(p)
        h.update(f"\n{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}".encode())


@torch.no_grad()
def encode_images(encoder: torch.nn.Module, image_paths: Sequence[str | os.PathLike], batch_size: int = 32,
                  device: torch.device | None = None, desc: str = "encode") -> torch.Tensor:
    """Run the frozen encoder over image files: (N, T, D) float32 on CPU."""
    from captionlab.data import load_image

    encoder.eval()
    device = device or next(encoder.parameters()).device
    out = []
    for i in tqdm(range(0, len(image_paths), batch_size), desc=desc, leave=False, disable=len(image_paths) <= batch_size):
        pixels = encoder.preprocess([load_image(p) for p in image_paths[i:i + batch_size]]).to(device)
        out.append(encoder(pixels).float().cpu())
    return torch.cat(out)


def cached_features(encoder: torch.nn.Module, encoder_spec: str, image_paths: Sequence[str | os.PathLike],
                    batch_size: int = 32, dtype: str = "float16", root: Path | None = None) -> FeatureStore:
    """Features of `image_paths` under `encoder`, computed once (under a lock, written atomically) and memmapped."""
    image_paths = [str(p) for p in image_paths]
    if not image_paths:
        raise ValueError("cached_features: empty image list")
    root = Path(root) if root else cache_dir() / "features"
    path = root / f"{cache_key(encoder_spec, image_paths, dtype)}.npy"
    with file_lock(root / f".{path.stem}.lock"):
        if not path.exists():
            device = next(encoder.parameters()).device
            arr = None
            with atomic_path(path, suffix=".npy") as tmp:
                for i in tqdm(range(0, len(image_paths), batch_size), desc="cache features", leave=False):
                    feats = encode_images(encoder, image_paths[i:i + batch_size], batch_size, device)
                    if arr is None:
                        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype),
                                                        shape=(len(image_paths), *feats.shape[1:]))
                    arr[i:i + len(feats)] = feats.numpy().astype(arr.dtype)
                arr.flush()
                del arr
    return FeatureStore(path)
