"""compressed (Butakov et al. 2024): autoencoder and PCA compressors, their weighted
Kozachenko-Leonenko step against an independent numpy re-implementation, and a synthetic task
of their kind (2-dim latents with known MI rendered as images)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from scipy.special import digamma, gammaln, loggamma, ndtr

import ibscope
from ibscope.errors import DataError, UsageError
from ibscope.estimators import registry
from ibscope.estimators.compressed import kl_entropy, kl_weights


def latent_pair(n, mi, seed):
    """2-dim Zx, Zy with two correlated pairs, I(Zx; Zy) = mi."""
    rho = math.sqrt(1 - math.exp(-mi))
    rng = np.random.default_rng(seed)
    zx = rng.standard_normal((n, 2))
    zy = rho * zx + math.sqrt(1 - rho ** 2) * rng.standard_normal((n, 2))
    return zx, zy


def blob_images(z, size=16, width=0.12):
    """A Gaussian blob on a size x size grid centred at Phi(z): injective in z, so the images
    carry exactly the latents' information (Butakov et al.'s synthetic images)."""
    u = ndtr(z)
    g = (np.arange(size) + 0.5) / size
    gx = np.exp(-(g[None, :] - u[:, :1]) ** 2 / (2 * width ** 2))
    gy = np.exp(-(g[None, :] - u[:, 1:2]) ** 2 / (2 * width ** 2))
    return (gx[:, :, None] * gy[:, None, :]).reshape(len(z), -1)


@pytest.mark.slow
def test_images_of_latents_autoencoder_keeps_the_information():
    # I = 1 nat between 2-dim latents, each rendered as a 256-pixel image. Autoencoders to 2 dims
    # (the latents' dimension) recover most of it (measured 0.86-0.91 for 400-2000 training
    # steps; tolerance 0.25 below the truth for a short training, 0.1 above: a lower bound plus
    # KSG noise); PCA to 2 dims loses more (0.73: the blob images are a curved 2-dim manifold).
    zx, zy = latent_pair(2000, 1.0, 0)
    x, y = blob_images(zx), blob_images(zy)
    ae = ibscope.mutual_information(x, y, method="compressed", latent_dim=2, compressor_x="autoencoder",
                                    compressor_y="autoencoder", ae_steps=400)
    pca = ibscope.mutual_information(x, y, method="compressed", latent_dim=2, compressor_x="pca",
                                     compressor_y="pca")
    assert 0.75 < ae.value < 1.1
    assert ae.value > pca.value + 0.05
    assert ae.extra["latent_dims"] == [2, 2] and ae.extra["compressor_x"] == "autoencoder"
    assert ae.extra["reconstruction_mse_x"] < 0.15
    # the autoencoder of a given input is trained once and reused (X is the same for every cell)
    again = ibscope.mutual_information(x, y, method="compressed", latent_dim=2, compressor_x="autoencoder",
                                       compressor_y="autoencoder", ae_steps=400)
    assert again.value == ae.value


def test_low_variance_dependence_needs_standardize():
    # the science case: the dependence sits in the two smallest-variance columns. As published
    # (PCA, or an autoencoder on the raw scale) compression keeps the large columns and finds
    # nothing; standardize=True z-scores the columns first and keeps part of it.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 6)) * np.array([10, 10, 10, 10, 1, 1])
    y = x[:, 4:6] + 0.5 * rng.standard_normal((3000, 2))
    truth = 2 * 0.5 * math.log(1 + 1 / 0.25)
    assert abs(ibscope.mutual_information(x, y, method="compressed", compressor_x="pca").value) < 0.05
    assert abs(ibscope.mutual_information(x, y, method="compressed", ae_steps=400).value) < 0.1
    kept = ibscope.mutual_information(x, y, method="compressed", standardize=True, ae_steps=400).value
    assert 0.4 < kept < truth


def test_kl_weights_cancel_the_bias_terms():
    # Berrett, Samworth & Yuan: sum w = 1 and sum_j w_j Gamma(j + 2l/d) / Gamma(j) = 0, l <= d/4
    for d in (5, 8, 12):
        w = kl_weights(5, d).numpy()
        j = np.arange(1, 6)
        assert w.sum() == pytest.approx(1.0, abs=1e-9)
        for ell in range(1, d // 4 + 1):
            assert float(w @ np.exp(loggamma(j + 2 * ell / d) - loggamma(j)).real) == pytest.approx(0.0, abs=1e-6)
    assert kl_weights(5, 4).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def np_kl_entropy(x, k=5):
    """Independent numpy version of their entropy step: whiten with the sample covariance,
    (weighted) Kozachenko-Leonenko with Euclidean distances, add log det(cov) / 2 back."""
    n, d = x.shape
    cov = np.cov(x, rowvar=False).reshape(d, d)
    evals, evecs = np.linalg.eigh(cov)
    z = (x - x.mean(0)) @ evecs / np.sqrt(evals)          # any whitening: distances are the same
    kk = k if d > 4 else 1
    dist, _ = cKDTree(z).query(z, kk + 1)
    rho = dist[:, 1:]
    if d <= 4:
        w = np.array([1.0])
    else:
        rows = [np.ones(kk) / kk]
        j = np.arange(1, kk + 1)
        for ell in range(1, d // 4 + 1):
            r = np.exp(gammaln(j + 2 * ell / d) - gammaln(j))
            rows.append(r / np.linalg.norm(r))
        support = {i * kk // d - 1 for i in range(1, d + 1)}
        rows += [np.eye(kk)[c] for c in range(kk) if c not in support]
        rhs = np.zeros(len(rows))
        rhs[0] = 1 / kk
        w = np.linalg.lstsq(np.vstack(rows), rhs, rcond=1e-6)[0]
    log_vd = d / 2 * math.log(math.pi) - gammaln(d / 2 + 1)
    log_dens = digamma(np.arange(1, kk + 1)) - log_vd - d * np.log(rho) - math.log(n - 1)
    return -(log_dens @ w).mean() + 0.5 * np.linalg.slogdet(cov)[1]


@pytest.mark.parametrize("d", [2, 4, 6, 8])
def test_kl_entropy_matches_numpy_and_the_gaussian_closed_form(d):
    rng = np.random.default_rng(d)
    a = rng.standard_normal((d, d))
    x = rng.standard_normal((3000, d)) @ a.T
    got = kl_entropy(torch.from_numpy(x), 5, jitter=0.0)
    assert got == pytest.approx(np_kl_entropy(x), abs=1e-9)
    # closed form 1/2 log det(2 pi e cov): within the estimator's error at n = 3000: measured
    # |error| <= 0.07 up to d = 4 (1-NN), -0.17 to +0.40 at d = 6-8 over seeds (the weighted
    # estimator with k = 5 is noisy there: one reason ibscope's default MI step is KSG)
    truth = 0.5 * np.linalg.slogdet(2 * math.pi * math.e * a @ a.T)[1]
    assert got == pytest.approx(truth, abs=0.1 if d <= 4 else 0.5)


def test_kl_mi_step_is_their_three_entropy_formula():
    zx, zy = latent_pair(1500, 0.8, 3)
    x, y = zx @ np.array([[1.0, 0.3], [0.2, 1.0]]), np.tanh(zy)
    e = ibscope.mutual_information(x, y, method="compressed", mi_step="kl")
    xs = (x - x.mean(0)) / np.sqrt(((x - x.mean(0)) ** 2).mean())
    ys = (y - y.mean(0)) / np.sqrt(((y - y.mean(0)) ** 2).mean())
    want = np_kl_entropy(xs) + np_kl_entropy(ys) - np_kl_entropy(np.hstack([xs, ys]))
    assert e.value == pytest.approx(want, abs=1e-6)  # the seeded 1e-10 jitter moves it by < 1e-8
    lab = (zy[:, 0] > 0).astype(int)
    e = ibscope.mutual_information(x, lab, method="compressed", mi_step="kl")
    want = np_kl_entropy(xs) - sum(np.mean(lab == c) * np_kl_entropy(xs[lab == c]) for c in (0, 1))
    assert e.value == pytest.approx(want, abs=1e-6)
    assert e.cap == pytest.approx(-sum(p * math.log(p) for p in np.bincount(lab) / len(lab)))


def test_discrete_side_with_ksg_step_is_ross():
    zx, _ = latent_pair(1000, 0.5, 4)
    lab = (zx[:, 0] > 0).astype(int)
    e = ibscope.mutual_information(zx, lab, method="compressed")
    ref = ibscope.mutual_information((zx - zx.mean(0)) / np.sqrt(((zx - zx.mean(0)) ** 2).mean()), lab,
                                     method="ksg", k=5)
    assert e.value == pytest.approx(ref.value, abs=1e-6)


def test_errors():
    rng = np.random.default_rng(0)
    for params, match in [({"compressor_x": "vae"}, "compressor_x"), ({"mi_step": "kde"}, "mi_step"),
                          ({"latent_dim": 0}, "latent_dim"), ({"ae_lr": 0.0}, "ae_lr"),
                          ({"standardize": 1}, "standardize")]:
        with pytest.raises(UsageError, match=match):
            registry.create("compressed", **params)
    with pytest.raises(DataError, match="compressed needs at least 10 samples"):
        ibscope.mutual_information(rng.standard_normal((6, 3)), rng.standard_normal((6, 3)), method="compressed")
    lab = np.r_[np.zeros(40, int), np.ones(4, int)]
    with pytest.raises(DataError, match="every class needs more than"):
        ibscope.mutual_information(rng.standard_normal((44, 2)), lab, method="compressed", mi_step="kl")
