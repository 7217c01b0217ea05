"""Neural bounds (infonce, mine, smile): early stopping on a validation split with the best state
kept, honest test-split values, the bounds' formulas, MINE's gradient correction, critics.

Kept small (n <= 3000, small critics, a few hundred steps) so the file runs in seconds on CPU.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import ibscope
from ibscope.errors import DataError, UsageError
from ibscope.estimators import registry
from ibscope.estimators.neural import MINE, dv_bound, infonce_bound, js_bound

SMALL = dict(batch_size=64, hidden=32, embed=16, eval_every=20)


def gaussian(n, d, rho, seed, extra_dims=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d + extra_dims))
    y = rng.standard_normal((n, d + extra_dims))
    y[:, :d] = rho * x[:, :d] + math.sqrt(1 - rho ** 2) * y[:, :d]
    return x, y, -d / 2 * math.log(1 - rho ** 2)


def test_infonce_is_stable_when_training_is_3x_longer():
    # the case, scaled down: 25 + 25 dims, two pairs at rho = 0.8 (I = 1.02 nats). A
    # critic trained 3x longer overfits the training split; without early stopping the held-out
    # bound falls (below 0 here), with it the best validation state is kept and the estimate
    # does not move.
    x, y, truth = gaussian(2000, 2, 0.8, 0, extra_dims=23)
    short = ibscope.mutual_information(x, y, method="infonce", steps=300, **SMALL)
    long = ibscope.mutual_information(x, y, method="infonce", steps=900, **SMALL)
    assert long.value == pytest.approx(short.value, abs=0.05)
    assert 0.4 < long.value < truth + 3 * long.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the overfitted critic's negative value warns
        no_stop = ibscope.mutual_information(x, y, method="infonce", steps=900, patience=10 ** 6, eval_every=900,
                                             **{k: v for k, v in SMALL.items() if k != "eval_every"})
    assert no_stop.value < long.value - 0.3   # what 900 steps do without early stopping
    assert long.extra["stopped_early"] and long.extra["best_step"] < 300


@pytest.mark.parametrize("method,params", [("infonce", {}), ("mine", {}), ("smile", {}),
                                           ("smile", {"clip": 1.0}), ("infonce", {"critic": "concat"}),
                                           ("mine", {"critic": "concat"})])
def test_lower_bounds_on_gaussian_ground_truth(method, params):
    # 2 + 2 dims, rho = 0.8: I = 1.022 nats. Every value is a held-out lower bound: above the
    # truth only by test-split noise (3 stderr + 0.05 for the DV pooling); a trained critic gets
    # within 0.35 of it (these critics are small and stop early).
    x, y, truth = gaussian(3000, 2, 0.8, 1)
    e = ibscope.mutual_information(x, y, method=method, steps=600, **SMALL, **params)
    assert truth - 0.35 < e.value < truth + 3 * (e.stderr or 0) + 0.05, e.value
    assert e.extra["n_train"] + e.extra["n_val"] + e.extra["n_test"] == 3000
    assert e.extra["n_test"] == 900 and e.extra["critic"] == params.get("critic", "separable")
    if method == "infonce":
        assert e.cap == pytest.approx(math.log(64))
    else:
        assert e.cap is None


def test_discrete_side_is_one_hot():
    rng = np.random.default_rng(2)
    lab = rng.integers(0, 4, 3000)
    x = lab[:, None] + 0.5 * rng.standard_normal((3000, 1))
    e = ibscope.mutual_information(x, lab, method="smile", steps=400, **SMALL)
    assert 0.5 < e.value < math.log(4) + 0.05


def test_bound_formulas():
    s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0], [1.0, -2.0, 0.5]], dtype=torch.float64)
    diag, off = np.diag(s.numpy()), s.numpy()[~np.eye(3, dtype=bool)]
    rows = np.log(np.exp(s.numpy()).sum(1))
    assert float(infonce_bound(s)) == pytest.approx(math.log(3) + np.mean(diag - rows), abs=1e-12)
    assert float(dv_bound(s)) == pytest.approx(diag.mean() - np.log(np.mean(np.exp(off))), abs=1e-12)
    assert float(dv_bound(s, clip=1.0)) == pytest.approx(
        diag.mean() - np.log(np.mean(np.exp(np.clip(off, -1, 1)))), abs=1e-12)
    sp = lambda v: np.log1p(np.exp(v))  # noqa: E731
    assert float(js_bound(s)) == pytest.approx(np.mean(-sp(-diag)) - np.mean(sp(off)), abs=1e-12)


def test_mine_gradient_uses_the_moving_average():
    # the surrogate's gradient w.r.t. an off-diagonal score is exp(f_ij) / (N_off * ema), not
    # exp(f_ij) / (N_off * batch mean of exp f), with ema = decay * old + (1 - decay) * batch
    est = MINE(ema_decay=0.9)
    s = torch.tensor([[1.0, 0.2, -0.3], [0.4, 0.8, 1.5], [-1.0, 0.1, 0.6]], dtype=torch.float64, requires_grad=True)
    state = {"ema": 2.0}
    est._loss(s, state).backward()
    off = ~torch.eye(3, dtype=torch.bool)
    batch = float(torch.exp(s.detach()[off]).mean())
    ema = 0.9 * 2.0 + 0.1 * batch
    assert state["ema"] == pytest.approx(ema)
    expected = torch.exp(s.detach()) / (6 * ema)
    assert torch.allclose(s.grad[off], expected[off], rtol=1e-12)
    assert torch.allclose(s.grad.diagonal(), torch.full((3,), -1 / 3, dtype=torch.float64))


def test_negative_held_out_value_is_reported_with_a_note():
    # independent variables, few samples, a big critic: the test-split bound is often below 0;
    # it is reported as it is (not clamped), with a note and a warning
    rng = np.random.default_rng(0)
    for seed in range(10):
        x, y = rng.standard_normal((400, 10)), rng.standard_normal((400, 10))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            e = ibscope.mutual_information(x, y, method="mine", steps=200, batch_size=32, hidden=64, seed=seed)
        if e.value < 0:
            assert "negative" in e.extra["note"] and "not generalise" in e.extra["note"]
            assert any("held-out bound is negative" in str(m.message) for m in w)
            return
        assert "note" not in e.extra
    pytest.fail("no negative held-out value in 10 seeds")


def test_seeded_and_deterministic():
    x, y, _ = gaussian(1000, 1, 0.7, 3)
    a = ibscope.mutual_information(x, y, method="smile", steps=100, **SMALL).value
    b = ibscope.mutual_information(x, y, method="smile", steps=100, **SMALL).value
    c = ibscope.mutual_information(x, y, method="smile", steps=100, seed=1, **SMALL).value
    assert a == b and a != c


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["infonce", "mine", "smile"])
def test_runs_on_the_gpu(method):
    x, y, truth = gaussian(2000, 2, 0.8, 4)
    e = ibscope.mutual_information(torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda(), method=method,
                                   steps=400, **SMALL)
    assert truth - 0.4 < e.value < truth + 3 * (e.stderr or 0) + 0.05


def test_errors():
    x, y, _ = gaussian(300, 1, 0.5, 5)
    with pytest.raises(DataError, match=r"infonce needs at least 638 samples.*batch_size=128.*Got 300 samples "
                                        r"\(150 / 60 / 90\)"):
        ibscope.mutual_information(x, y, method="infonce")
    for name, params, match in [("infonce", {"critic": "mlp"}, "critic"),
                                ("mine", {"val_fraction": 0.7}, "val_fraction"),
                                ("mine", {"ema_decay": 1.0}, "ema_decay"),
                                ("smile", {"clip": 0.0}, "clip"),
                                ("smile", {"eval_every": 0}, "eval_every"),
                                ("infonce", {"batch_size": 1}, "batch_size")]:
        with pytest.raises(UsageError, match=match):
            registry.create(name, **params)
    with pytest.raises(UsageError, match="both x and y are discrete"):
        ibscope.mutual_information(np.arange(300) % 3, np.arange(300) % 2, method="smile")
