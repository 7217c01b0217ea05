"""Local rank: Jacobians of known rank (torch.func), the W1 = W2 = I ReLU case, scale
(in)variance of the tolerance conventions, the store reader and capture's Jacobian spectra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import jacrev, vmap

import ibscope
from ibscope.errors import DataError, UsageError
from ibscope.estimators import registry
from ibscope.estimators.local_rank import LocalRank, jacobian_from_store, jacobian_spectra


def spectra_of(f, x):
    """Per-sample Jacobian singular values of f at the rows of x (torch.func)."""
    return jacobian_spectra(vmap(jacrev(f))(x))


def test_linear_layer_of_known_rank():
    g = torch.Generator().manual_seed(0)
    d0, m, r = 12, 9, 4
    w = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, d0, generator=g, dtype=torch.float64)
    x = torch.randn(50, d0, generator=g, dtype=torch.float64)
    s = spectra_of(lambda v: w @ v, x)
    assert s.shape == (50, min(m, d0))
    est = ibscope.measure(s, "local-rank")
    # J = W for every x, so every sample has rank exactly r
    assert est.value == r and est.extra["std"] == 0.0
    assert est.extra["histogram"][r] == 50 and sum(est.extra["histogram"]) == 50
    assert est.extra["quantiles"]["0.0"] == r == est.extra["quantiles"]["1.0"]
    assert est.cap == min(m, d0) and est.unit == "dimensions" and est.quantity == "local_rank"
    assert est.extra["fraction"] == pytest.approx(r / min(m, d0))


def relu_net(w1, w2):
    return lambda v: w2 @ torch.relu(w1 @ v)


def test_relu_identity_weights_gives_half_the_dimension():
    # z2 = W2 ReLU(W1 x) with W1 = W2 = I: J(x) = diag(1[x > 0]), so rank J(x) = #positive
    # coordinates exactly, and LR = E[Bin(d, 1/2)] = d / 2.
    d, n = 20, 1000
    x = torch.randn(n, d, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    s = spectra_of(relu_net(eye, eye), x)
    lr = LocalRank()
    assert torch.equal(lr.ranks(s), (x > 0).sum(1))
    est = lr.estimate(s)
    # sd of the mean of Bin(20, 1/2) over 1000 samples = sqrt(5 / 1000) = 0.071; 4 sd = 0.28
    assert est.value == pytest.approx(d / 2, abs=0.28)
    assert est.stderr == pytest.approx(float((x > 0).sum(1).double().std()) / n ** 0.5)


def test_capture_jacobian_kernel_feeds_local_rank():
    # teammate A's capture kernel (what `capture --jacobian-samples` stores) on the W1 = W2 = I
    # ReLU net: its float32 spectra give exactly the per-sample ranks #positive coordinates
    from ibscope.capture.jacobian import jacobian_singular_values

    d = 12
    x = torch.randn(200, d)
    eye = torch.eye(d)
    s = jacobian_singular_values(lambda b: torch.relu(b @ eye.T) @ eye.T, x, chunk=64)
    assert s.shape == (200, d)
    assert torch.equal(LocalRank().ranks(s), (x > 0).sum(1))
    assert torch.allclose(s.double(), spectra_of(relu_net(eye.double(), eye.double()), x.double()), atol=1e-6)


def test_bottleneck_rank_is_number_of_active_units():
    # W1 (5 x 20), W2 (7 x 5) Gaussian: rank J = #active hidden units (<= 5); E = 2.5
    g = torch.Generator().manual_seed(1)
    w1 = torch.randn(5, 20, generator=g, dtype=torch.float64)
    w2 = torch.randn(7, 5, generator=g, dtype=torch.float64)
    x = torch.randn(600, 20, generator=g, dtype=torch.float64)
    s = spectra_of(relu_net(w1, w2), x)
    assert torch.equal(LocalRank().ranks(s), (x @ w1.T > 0).sum(1))
    # sd of the mean of Bin(5, 1/2) over 600 samples = 0.046; 4 sd = 0.18
    assert LocalRank().estimate(s).value == pytest.approx(2.5, abs=0.18)


def test_relative_tolerance_is_scale_invariant_absolute_is_not():
    # the note's pitfall: W1 -> 1e-3 W1 drops Patel's absolute atol = 0.01 rank to 0,
    # while the default relative tolerance reads the same rank as before.
    d = 20
    x = torch.randn(300, d, dtype=torch.float64)
    w2 = torch.randn(d, d, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    s1 = spectra_of(relu_net(eye, w2), x)
    s_small = spectra_of(relu_net(1e-3 * eye, w2), x)
    rel = LocalRank()
    assert rel.estimate(s_small).value == rel.estimate(s1).value == float((x > 0).sum(1).double().mean())
    patel = LocalRank(rtol=0.0, atol=0.01)
    assert patel.estimate(s_small).value == 0.0
    assert patel.estimate(s1).extra["threshold"] == "absolute"


def test_threshold_semantics_on_explicit_spectra():
    s = torch.tensor([[10.0, 1.0, 0.011, 0.009], [1.0, 0.5, 0.0011, 0.0]], dtype=torch.float64)
    assert LocalRank(rtol=1e-3).ranks(s).tolist() == [3, 3]  # thresholds 0.01 and 0.001
    assert LocalRank(rtol=1e-4).ranks(s).tolist() == [4, 3]
    assert LocalRank(rtol=0.0, atol=0.01).ranks(s).tolist() == [3, 2]
    # the larger of the two thresholds applies when both are given
    assert LocalRank(rtol=0.05, atol=0.01).ranks(s).tolist() == [2, 2]
    # order of the singular values does not matter
    assert LocalRank(rtol=1e-4).ranks(s.flip(1)).tolist() == [4, 3]


def test_errors():
    with pytest.raises(DataError, match="singular values must be >= 0; got 1 negative"):
        ibscope.measure(torch.tensor([[1.0, -0.5]]), "local-rank")
    with pytest.raises(UsageError, match="'rtol' parameter of local-rank must be > 0 when atol is 0"):
        LocalRank(rtol=0.0)
    with pytest.raises(UsageError, match="'atol' parameter of local-rank must be a finite number >= 0"):
        LocalRank(atol=-1.0)
    with pytest.raises(DataError, match=r"shape \(n, m, d\)"):
        jacobian_spectra(torch.ones(3, 4))
    info = registry.describe(registry.get("local-rank"))
    assert info["kind"] == "jacobian" and "Patel" in info["reference"]


def _tiny_run(tmp_path, steps=30):
    """A tiny MLP really trained for a few steps; one canonical checkpoint on disk."""
    torch.manual_seed(0)

    def build():
        return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))

    net = build()
    x = torch.randn(64, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
    ck = tmp_path / "ckpt_e1.pt"
    torch.save({"epoch": 1, "state_dict": net.state_dict(), "accuracy": 0.5, "loss": loss.item()}, ck)
    return build, net, ck, x.numpy(), y.numpy()


def test_through_capture_store(tmp_path):
    from ibscope.capture import capture

    build, net, ck, x, y = _tiny_run(tmp_path)
    store = capture(build, [ck], (x, y), ["0", "2"], tmp_path / "acts", jacobian_samples=40, device="cpu",
                    progress=False)
    st = ibscope.open_store(store)
    s_out = jacobian_from_store(st, 0, "2")
    assert s_out.shape == (40, 3)
    # reference: Jacobians of the trained model computed here with torch.func, in float64
    net = net.double().eval()
    xs = torch.from_numpy(x[:40]).double()
    ref = spectra_of(lambda v: net(v.unsqueeze(0)).squeeze(0), xs)
    assert torch.allclose(s_out.double(), ref, rtol=1e-4, atol=1e-5)
    # capture stores float32 singular values: same per-sample ranks as the float64 reference
    assert torch.equal(LocalRank().ranks(s_out), LocalRank().ranks(ref))
    # hidden pre-activation: #active of 10 hidden units bounds the rank of the 3-dim output
    active = (xs @ net[0].weight.T + net[0].bias > 0).sum(1)
    assert bool((LocalRank().ranks(s_out) <= torch.clamp(active, max=3)).all())
    # first layer: J = W1 (10 x 6) for every sample, rank 6
    est0 = LocalRank().estimate(jacobian_from_store(store, 0, "0"))
    assert est0.value == 6.0 and est0.n_samples == 40


def test_store_without_jacobians_says_how_to_capture(tmp_path):
    from ibscope.store import StoreWriter

    w = StoreWriter(tmp_path / "acts", config={"split": "probe", "run": "run"}, sample_ids=np.arange(4),
                    labels=None, layers={"fc": {}})
    with w.checkpoint(epoch=0, step=0, path="c.pt", sha256="a" * 64) as sh:
        sh.append("fc", np.zeros((4, 2), dtype=np.float32))
    with pytest.raises(DataError, match="holds no Jacobian spectra for layer 'fc' at checkpoint 0") as ei:
        jacobian_from_store(tmp_path / "acts", 0, "fc")
    assert "--jacobian-samples" in ei.value.hint
    assert ei.value.exit_code == 4
    with pytest.raises(UsageError, match="Unknown layer 'fx'"):
        jacobian_from_store(tmp_path / "acts", 0, "fx")


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 30), r=st.integers(1, 8), scale=st.floats(1e-6, 1e6), seed=st.integers(0, 2**31 - 1))
def test_invariant_to_sample_and_value_order_and_scale(n, r, scale, seed):
    # local rank with a relative tolerance depends neither on the order of the samples, nor on
    # the order of each sample's singular values, nor on a common scale of the Jacobians
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n, r, generator=g, dtype=torch.float64) * (torch.rand(n, r, generator=g) > 0.3)
    s[:, 0] += 0.5  # every sample has a clearly non-zero largest singular value
    est = LocalRank()
    base = est.ranks(s)
    perm = torch.randperm(n, generator=g)
    cols = torch.randperm(r, generator=g)
    assert torch.equal(est.ranks(s[perm]), base[perm])
    assert torch.equal(est.ranks(s[:, cols]), base)
    assert torch.equal(est.ranks(s * scale), base)
    assert est.estimate(s[perm]).value == pytest.approx(float(base.double().mean()))
