"""The second bundled example: scikit-learn's 8x8 digits, with out-of-distribution sets.

``write_probe_files(out_dir)`` writes four ``.npz`` probe files (arrays ``x`` float32 (n, 64)
with pixel values scaled to [0, 1], ``y`` int64, ``ids`` int64 = row in ``load_digits()``):

* ``train.npz`` / ``test.npz`` - the in-distribution digits (all classes except ``holdout``),
  split ``1 - test_fraction`` / ``test_fraction`` by a seeded permutation; labels are
  re-numbered ``0..K-1`` in increasing digit order (with the default holdout ``[8, 9]`` they
  equal the digits 0-7).
* ``heldout.npz`` - every image of the held-out digits (near OOD: same pixels statistics, new
  classes). Their ``y`` is the original digit (outside the model's classes).
* ``transformed.npz`` - the in-distribution **test** images transformed (``transform``:
  ``rot90`` (default), ``flip`` (left-right), ``invert`` (1 - x) or ``noise`` (Gaussian,
  sigma 0.3, clipped to [0, 1], fixed seed)); labels as in ``test.npz``.

The data ship with scikit-learn (no download). The model is
``ibscope.demo.models:digits_mlp`` with ``widths=[64, 64, 32, 16, K]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ibscope._atomic import atomic_path
from ibscope.errors import UsageError

PROBE_NAMES = ("train", "test", "heldout", "transformed")
TRANSFORMS = ("rot90", "flip", "invert", "noise")


def load_digits_data() -> tuple[np.ndarray, np.ndarray]:
    """(x float32 (1797, 64) in [0, 1], y int64 digits 0-9) from scikit-learn's bundled copy."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def transform_images(x: np.ndarray, transform: str, seed: int = 0) -> np.ndarray:
    """Apply one of :data:`TRANSFORMS` to flattened 8x8 images ``x`` (n, 64)."""
    img = np.asarray(x, dtype=np.float32).reshape(-1, 8, 8)
    if transform == "rot90":
        out = np.rot90(img, k=1, axes=(1, 2))
    elif transform == "flip":
        out = img[:, :, ::-1]
    elif transform == "invert":
        out = 1.0 - img
    elif transform == "noise":
        rng = np.random.default_rng(seed)
        out = np.clip(img + rng.normal(0.0, 0.3, size=img.shape), 0.0, 1.0)
    else:
        from ibscope.errors import unknown_name

        raise unknown_name("digits transform", transform, TRANSFORMS)
    return np.ascontiguousarray(out.reshape(len(img), 64), dtype=np.float32)


def split_digits(holdout: Sequence[int] = (8, 9), test_fraction: float = 0.2, split_seed: int = 0,
                 transform: str = "rot90") -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{name: (x, y, ids)} for the four probe sets (see the module docstring)."""
    x, y = load_digits_data()
    hold = sorted({int(h) for h in holdout})
    if any(h < 0 or h > 9 for h in hold):
        raise UsageError(f"data.options.holdout must list digits 0-9. Got {list(holdout)}.")
    keep = [c for c in range(10) if c not in hold]
    if len(keep) < 2:
        raise UsageError(f"data.options.holdout leaves {len(keep)} class(es); at least 2 must remain for training.")
    if not 0.0 < float(test_fraction) < 1.0:
        raise UsageError(f"data.options.test_fraction must be in (0, 1). Got {test_fraction!r}.")
    ids = np.arange(len(x), dtype=np.int64)
    in_mask = np.isin(y, keep)
    remap = {c: i for i, c in enumerate(keep)}
    in_ids = ids[in_mask]
    perm = np.random.default_rng(int(split_seed)).permutation(len(in_ids))
    n_test = int(round(float(test_fraction) * len(in_ids)))
    te = np.sort(in_ids[perm[:n_test]])
    tr = np.sort(in_ids[perm[n_test:]])
    lab = np.array([remap.get(int(v), int(v)) for v in y], dtype=np.int64)
    out = {
        "train": (x[tr], lab[tr], tr),
        "test": (x[te], lab[te], te),
        "heldout": (x[~in_mask], y[~in_mask], ids[~in_mask]),
        "transformed": (transform_images(x[te], transform, seed=int(split_seed)), lab[te], te),
    }
    if len(out["heldout"][0]) == 0:
        out.pop("heldout")
    return out


def write_probe_files(out_dir: str | os.PathLike, holdout: Sequence[int] = (8, 9), test_fraction: float = 0.2,
                      split_seed: int = 0, transform: str = "rot90") -> list[Path]:
    """Write the probe files of :func:`split_digits` to ``out_dir`` (atomically); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (x, y, ids) in split_digits(holdout, test_fraction, split_seed, transform).items():
        p = out / f"{name}.npz"
        with atomic_path(p, out / f"{name}.tmp.npz") as tmp:
            np.savez(tmp, x=x, y=y, ids=ids)
        paths.append(p)
    return paths
