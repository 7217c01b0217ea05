"""The 12-bit task of the information-plane papers, generated deterministically in code.

Shwartz-Ziv & Tishby (2017) trained a 12-10-7-5-4-3-2 network on all 4096 binary patterns of
12 bits placed on a sphere, labelled by a rule invariant under rotations of the sphere. We
rebuild a task of the same kind without shipping their ``var_u.mat``:

* **Inputs.** ``x`` runs over all ``2**12 = 4096`` vectors in ``{0, 1}^12``; row ``i`` is the
  binary expansion of ``i`` (bit ``j`` = ``(i >> j) & 1``). Inputs are fed to the network as
  ``0.0``/``1.0`` floats.
* **Geometry.** Bit ``j`` sits on vertex ``u_j`` of a regular icosahedron (12 vertices on the
  unit sphere, :func:`icosahedron`).
* **Rule.** With spins ``s_j = 2 x_j - 1`` the pattern defines the signal ``sum_j s_j delta(u_j)``
  on the sphere. Its dipole (degree-1 spherical-harmonic) power is
  ``D(x) = || sum_j s_j u_j ||^2`` (up to the constant ``3 / 4 pi``). The label is
  ``y = 1`` if ``D(x) > THRESHOLD`` and ``y = 0`` otherwise.
* **Symmetry.** ``D`` is invariant under every rotation/reflection of the icosahedron (they
  permute the bits) and under flipping all bits (``s -> -s``), so the rule is symmetric in the
  same sense as the original one (a rotation-invariant spherical-harmonic statistic).
* **Balance.** ``D`` takes 20 distinct values on the 4096 patterns; the threshold is the
  median, giving 2060 zeros and 2036 ones (``p(y=1) = 0.497``, ``H(Y) = 0.99999 bits``).

Nothing here is random: the same 4096 rows and labels come out on every machine. The
train/test split (85% / 15%, as in Shwartz-Ziv & Tishby) is a seeded permutation.
"""

from __future__ import annotations

import math

import numpy as np

N_BITS = 12
N_PATTERNS = 2 ** N_BITS


def icosahedron() -> np.ndarray:
    """The 12 vertices of a regular icosahedron on the unit sphere, shape (12, 3), fixed order."""
    phi = (1.0 + math.sqrt(5.0)) / 2.0
    verts = []
    for a in (-1.0, 1.0):
        for b in (-phi, phi):
            verts += [(0.0, a, b), (a, b, 0.0), (b, 0.0, a)]
    u = np.asarray(verts, dtype=np.float64)
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def all_patterns() -> np.ndarray:
    """All 4096 12-bit vectors as float32 0/1, shape (4096, 12); row i = binary expansion of i."""
    idx = np.arange(N_PATTERNS, dtype=np.int64)[:, None]
    return ((idx >> np.arange(N_BITS)) & 1).astype(np.float32)


def dipole_power(x: np.ndarray) -> np.ndarray:
    """``D(x) = ||sum_j (2 x_j - 1) u_j||^2`` for each row of ``x`` (n, 12)."""
    s = 2.0 * np.asarray(x, dtype=np.float64) - 1.0
    v = s @ icosahedron()
    return np.round((v * v).sum(axis=1), 9)  # rounding makes exact ties robust to summation order


def _threshold() -> float:
    d = np.sort(dipole_power(all_patterns()))
    vals = np.unique(d)
    # the split between two consecutive distinct values whose lower share is closest to 1/2
    below = np.searchsorted(d, vals, side="right") / len(d)
    k = int(np.argmin(np.abs(below - 0.5)))
    return float((vals[k] + vals[k + 1]) / 2.0)


#: midway between the two distinct D values around the median (= 10.2111...)
THRESHOLD = _threshold()


def labels(x: np.ndarray) -> np.ndarray:
    """The rule: ``1`` where the dipole power exceeds :data:`THRESHOLD`, else ``0`` (int64)."""
    return (dipole_power(x) > THRESHOLD).astype(np.int64)


def twelve_bit_task() -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: the 4096 patterns (float32, (4096, 12)) and their labels (int64, (4096,))."""
    x = all_patterns()
    return x, labels(x)


def train_test_split(n: int = N_PATTERNS, train_fraction: float = 0.85, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded random split (sorted within each part)."""
    if not 0.0 < train_fraction < 1.0:
        from ibscope.errors import UsageError

        raise UsageError(f"train_fraction must be in (0, 1). Got {train_fraction!r}.")
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(train_fraction * n))
    return np.sort(perm[:k]), np.sort(perm[k:])


def label_entropy(y: np.ndarray) -> float:
    """Plug-in entropy H(Y) in nats (the cap of I(T;Y))."""
    _, c = np.unique(np.asarray(y), return_counts=True)
    p = c / c.sum()
    return float(-(p * np.log(p)).sum())


def write_probe_files(out_dir, train_fraction: float = 0.85, split_seed: int = 0) -> list:
    """Write ``all.npz`` (the 4096 patterns), ``train.npz`` and ``test.npz`` to ``out_dir``.

    Each file holds ``x`` (float32, (n, 12)), ``y`` (int64) and ``ids`` (the pattern index
    ``0..4095``, so rows of different files can be matched). Written atomically.
    """
    from pathlib import Path

    from ibscope._atomic import atomic_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x, y = twelve_bit_task()
    tr, te = train_test_split(len(x), float(train_fraction), int(split_seed))
    ids = np.arange(len(x), dtype=np.int64)
    paths = []
    for name, rows in (("all", ids), ("train", tr), ("test", te)):
        p = out / f"{name}.npz"
        with atomic_path(p, out / f"{name}.tmp.npz") as tmp:
            np.savez(tmp, x=x[rows], y=y[rows], ids=ids[rows])
        paths.append(p)
    return paths
