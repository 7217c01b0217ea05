"""The demo's own parts: the 12-bit task, the networks, deterministic training, digits data."""

import math

import numpy as np
import pytest
import torch

from ibscope.demo import digits, tasks
from ibscope.demo.models import IB_WIDTHS, digits_mlp, ib_net
from ibscope.demo.train import TrainConfig, log_spaced_epochs, train_classifier
from ibscope.errors import UsageError


# ---------------------------------------------------------------------------- the 12-bit task
def test_task_is_all_patterns_with_balanced_labels():
    x, y = tasks.twelve_bit_task()
    assert x.shape == (4096, 12) and x.dtype == np.float32
    assert len(np.unique(x, axis=0)) == 4096  # every 12-bit pattern exactly once
    assert np.array_equal(x[5], [1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # row i = binary expansion of i
    assert set(np.unique(y)) == {0, 1}
    assert int(y.sum()) == 2036 and int((1 - y).sum()) == 2060  # the documented balance
    # H(Y) is 1 bit up to 3e-5 bits for a 2036/2060 split
    assert tasks.label_entropy(y) / math.log(2) == pytest.approx(1.0, abs=3e-5)


def test_rule_matches_slow_reference_and_is_deterministic():
    x, y = tasks.twelve_bit_task()
    u = tasks.icosahedron()
    assert np.allclose(np.linalg.norm(u, axis=1), 1.0)
    g = u @ u.T  # icosahedron: neighbours at cos = +-1/sqrt(5), antipodes at -1
    off = np.round(np.abs(g[~np.eye(12, dtype=bool)]), 9)
    assert set(off) == {round(1 / math.sqrt(5), 9), 1.0}
    rng = np.random.default_rng(1)
    for i in rng.choice(4096, 64, replace=False):  # slow double loop over pairs of bits
        s = 2 * x[i].astype(float) - 1
        d = sum(s[a] * s[b] * float(u[a] @ u[b]) for a in range(12) for b in range(12))
        assert int(d > tasks.THRESHOLD) == y[i]
    assert np.array_equal(tasks.twelve_bit_task()[1], y)


def _rotation_permutation(rot):
    u = tasks.icosahedron()
    ru = u @ rot.T
    perm = np.array([int(np.argmin(np.linalg.norm(u - v, axis=1))) for v in ru])
    assert np.allclose(u[perm], ru, atol=1e-9)  # the rotation maps vertices onto vertices
    return perm


def test_rule_is_invariant_under_icosahedral_symmetries_and_bit_flip():
    x, y = tasks.twelve_bit_task()
    u = tasks.icosahedron()
    axis = u[0]
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    ang = 2 * math.pi / 5  # 5-fold rotation about a vertex
    rot5 = np.eye(3) + math.sin(ang) * k + (1 - math.cos(ang)) * k @ k
    for rot in (rot5, -np.eye(3)):  # a rotation and the central inversion
        perm = _rotation_permutation(rot)
        assert sorted(perm) == list(range(12)) and not np.array_equal(perm, np.arange(12))
        assert np.array_equal(tasks.labels(x[:, perm]), y)
    assert np.array_equal(tasks.labels(1 - x), y)  # global spin flip
    # a non-symmetric permutation of the bits does change labels (the rule is not trivial)
    assert not np.array_equal(tasks.labels(x[:, [1, 0, *range(2, 12)]]), y)


def test_split_and_probe_files(tmp_path):
    tr, te = tasks.train_test_split()
    assert len(tr) == round(0.85 * 4096) and len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 4096
    paths = tasks.write_probe_files(tmp_path)
    assert [p.name for p in paths] == ["all.npz", "train.npz", "test.npz"]
    with np.load(tmp_path / "train.npz") as z:
        x, y = tasks.twelve_bit_task()
        assert np.array_equal(z["x"], x[tr]) and np.array_equal(z["y"], y[tr]) and np.array_equal(z["ids"], tr)
    with pytest.raises(UsageError, match="train_fraction"):
        tasks.train_test_split(train_fraction=1.5)


# ---------------------------------------------------------------------------- networks
def test_ib_net_architecture_and_layers():
    net = ib_net("tanh")
    assert net.layer_names == ["hidden1", "hidden2", "hidden3", "hidden4", "hidden5", "output"]
    widths = [net.hidden1[0].in_features] + [getattr(net, n)[0].out_features for n in net.layer_names]
    assert tuple(widths) == IB_WIDTHS == (12, 10, 7, 5, 4, 3, 2)
    p = net(torch.randn(7, 12))
    assert p.shape == (7, 2) and torch.allclose(p.sum(1), torch.ones(7))
    h = ib_net("relu").hidden1(torch.randn(50, 12))
    assert (h >= 0).all() and (h == 0).any()
    assert digits_mlp(widths=[64, 32, 8])(torch.rand(3, 8, 8)).shape == (3, 8)


def test_bad_model_options_are_usage_errors():
    with pytest.raises(UsageError, match="Unknown activation 'tahn'. Did you mean 'tanh'"):
        ib_net("tahn")
    with pytest.raises(UsageError, match="at least two positive integers"):
        ib_net("tanh", widths=[12])


# ---------------------------------------------------------------------------- training
def test_log_spaced_epochs():
    e = log_spaced_epochs(1000, 24)
    assert e[0] == 0 and e[-1] == 1000 and e == sorted(set(e))
    assert 15 <= len(e) <= 25
    ratios = np.diff(np.log(e[-8:]))  # log-spaced at the end: equal steps in log epoch
    assert np.ptp(ratios) < 0.05
    assert log_spaced_epochs(5, 30) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(UsageError, match="epochs must be >= 1"):
        log_spaced_epochs(0, 3)


def test_training_is_deterministic_and_writes_canonical_checkpoints(tmp_path):
    x, y = tasks.twelve_bit_task()
    tr, te = tasks.train_test_split()
    cfg = TrainConfig(epochs=60, checkpoints=5, lr=0.005, seed=3)
    a = train_classifier(lambda: ib_net("tanh"), x[tr], y[tr], x[te], y[te], tmp_path / "a", cfg)
    b = train_classifier(lambda: ib_net("tanh"), x[tr], y[tr], x[te], y[te], tmp_path / "b", cfg)
    assert [p.name for p in a] == [f"epoch_{e:06d}.pt" for e in log_spaced_epochs(60, 5)]
    ca, cb = torch.load(a[-1]), torch.load(b[-1])
    assert set(ca) == {"epoch", "state_dict", "accuracy", "loss", "test_accuracy", "test_loss"}
    assert ca["epoch"] == 60
    for k in ca["state_dict"]:
        assert torch.equal(ca["state_dict"][k], cb["state_dict"][k])
    # the stored metrics are those of the stored weights
    net = ib_net("tanh")
    net.load_state_dict(ca["state_dict"])
    with torch.no_grad():
        p = net(torch.as_tensor(x[tr]))
    assert ca["accuracy"] == pytest.approx((p.argmax(1).numpy() == y[tr]).mean(), abs=1e-6)
    loss = -np.log(np.clip(p.numpy()[np.arange(len(tr)), y[tr]], 1e-12, None)).mean()
    assert ca["loss"] == pytest.approx(loss, rel=1e-4)
    # a different seed gives different weights; stale checkpoints are removed on re-training
    (tmp_path / "a" / "epoch_999999.pt").write_bytes(b"old")
    c = train_classifier(lambda: ib_net("tanh"), x[tr], y[tr], None, None, tmp_path / "a",
                         TrainConfig(epochs=10, checkpoints=2, lr=0.005, seed=4))
    assert sorted(p.name for p in (tmp_path / "a").glob("epoch_*.pt")) == [p.name for p in c]
    assert "test_accuracy" not in torch.load(c[-1])


def test_minibatch_training_learns_and_bad_config_is_rejected(tmp_path):
    x, y = tasks.twelve_bit_task()
    paths = train_classifier(lambda: ib_net("tanh"), x, y, None, None, tmp_path,
                             TrainConfig(epochs=30, checkpoint_epochs=[0, 30], lr=0.01, batch_size=256))
    first, last = torch.load(paths[0]), torch.load(paths[-1])
    # 480 minibatch Adam steps fit the task (measured: loss 0.69 -> 0.09, accuracy 0.50 -> 0.97)
    assert first["accuracy"] < 0.6 and last["accuracy"] > 0.9 and last["loss"] < 0.3
    # SGD (momentum 0.9) on an easy rule, y = first bit: 80 steps lift accuracy from chance (measured 0.50 -> 0.71)
    sgd = train_classifier(lambda: ib_net("tanh"), x, x[:, 0].astype(np.int64), None, None, tmp_path / "sgd",
                           TrainConfig(epochs=5, checkpoint_epochs=[0, 5], lr=0.5, batch_size=256, optimizer="sgd"))
    assert torch.load(sgd[0])["accuracy"] < 0.55 and torch.load(sgd[-1])["accuracy"] > 0.65
    for bad, msg in ((dict(lr=0), "lr must be > 0"), (dict(optimizer="adamw"), "Unknown optimizer 'adamw'"),
                     (dict(batch_size=0), "batch_size must be >= 1"),
                     (dict(checkpoint_epochs=[5, 99], epochs=10), r"checkpoint_epochs must lie in \[0, epochs=10\]")):
        with pytest.raises(UsageError, match=msg):
            TrainConfig(**bad).validate()
    with pytest.raises(UsageError, match="same, non-zero number of rows"):
        train_classifier(lambda: ib_net("relu"), x, y[:10], None, None, tmp_path, TrainConfig(epochs=1))


# ---------------------------------------------------------------------------- digits
def test_digits_probe_sets(tmp_path):
    paths = digits.write_probe_files(tmp_path)
    assert sorted(p.name for p in paths) == ["heldout.npz", "test.npz", "train.npz", "transformed.npz"]
    z = {p.stem: dict(np.load(p)) for p in paths}
    xall, yall = digits.load_digits_data()
    assert xall.shape == (1797, 64) and 0.0 <= xall.min() and xall.max() == 1.0
    assert len(np.intersect1d(z["train"]["ids"], z["test"]["ids"])) == 0
    assert set(yall[z["heldout"]["ids"]]) == {8, 9} and len(z["heldout"]["ids"]) == int(np.isin(yall, [8, 9]).sum())
    assert set(z["train"]["y"]) == set(range(8))
    img = z["test"]["x"].reshape(-1, 8, 8)
    assert np.array_equal(z["transformed"]["x"].reshape(-1, 8, 8), np.rot90(img, 1, axes=(1, 2)))
    # holding out digit 3 renumbers the rest to 0..8
    parts = digits.split_digits(holdout=[3])
    ids, lab = parts["train"][2], parts["train"][1]
    assert np.array_equal(lab, np.where(yall[ids] > 3, yall[ids] - 1, yall[ids]))
    assert np.allclose(digits.transform_images(xall[:4], "invert"), 1 - xall[:4])
    with pytest.raises(UsageError, match="Unknown digits transform 'rot45'"):
        digits.transform_images(xall[:4], "rot45")
    with pytest.raises(UsageError, match="at least 2 must remain"):
        digits.split_digits(holdout=list(range(9)))
