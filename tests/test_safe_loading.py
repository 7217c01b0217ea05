"""Safe checkpoint loading without all-or-nothing: numpy scalars/arrays load with
weights_only=True by default, --safe-globals allow-lists more, --trust-checkpoint stays the
last resort, and the refusal is printed once, in plain text."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from capture_support import load_models, mlp_data, save_probe, write_models
from ibscope.capture import capture
from ibscope.capture.loading import discover_checkpoints, load_checkpoint_into, read_checkpoint, resolve_safe_globals
from ibscope.errors import CheckpointError, UsageError
from ibscope.store import open_store

TRAINLIB = textwrap.dedent('''
    class RunConfig:
        """A training script's own settings object, pickled next to the weights."""
        def __init__(self, lr=0.1, tag="base"):
            self.lr = lr
            self.tag = tag
''')


def _cli(cwd, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "IBSCOPE_DEBUG")}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "ibscope.cli.main", *map(str, args)], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)


@pytest.fixture()
def numpy_ckpt(tmp_path):
    mods = load_models(tmp_path)
    torch.manual_seed(3)
    net = mods.MLP()
    x, _ = mlp_data(n=24)
    torch.save({"epoch": np.int64(5), "state_dict": net.state_dict(), "accuracy": np.float64(0.8125),
                "val_loss": np.float32(0.25), "class_weights": np.array([1.0, 2.0]),
                "confusion": np.arange(4, dtype=np.int32).reshape(2, 2)}, tmp_path / "ep5.pt")
    save_probe(tmp_path / "probe.npz", x.numpy())
    return tmp_path, net, x


@pytest.mark.slow
def test_numpy_scalar_checkpoint_captures_without_trust_subprocess(numpy_ckpt):
    d, net, x = numpy_ckpt
    r = _cli(d, "capture", "-m", f"{write_models(d)}:MLP", "-c", d / "ep5.pt", "-p", d / "probe.npz", "-l", "fc1",
             "-o", d / "acts", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == ""
    st = open_store(d / "acts")
    (ck,) = st.checkpoints
    assert ck.epoch == 5  # read from an np.int64
    assert ck.metrics == {"accuracy": 0.8125, "val_loss": 0.25}  # numpy scalars kept as metrics
    with torch.no_grad():
        np.testing.assert_allclose(st.activations(0, "fc1"), net.fc1(x).numpy(), rtol=1e-6, atol=1e-6)


def test_numpy_arrays_and_dtypes_come_back_intact(numpy_ckpt):
    d, _, _ = numpy_ckpt
    obj = read_checkpoint(d / "ep5.pt")
    assert type(obj["accuracy"]) is np.float64 and obj["accuracy"] == 0.8125
    assert type(obj["val_loss"]) is np.float32
    np.testing.assert_array_equal(obj["class_weights"], [1.0, 2.0])
    assert obj["confusion"].dtype == np.int32 and obj["confusion"][1, 1] == 3
    (ck,) = discover_checkpoints(d / "ep5.pt")
    assert (ck.epoch, ck.source, ck.metrics["accuracy"]) == (5, "file", 0.8125)


def test_numpy1_module_path_loads(tmp_path):
    """Files written under numpy 1.x name numpy.core.multiarray.scalar; they load too."""
    p = tmp_path / "old.pt"
    torch.save({"epoch": 1, "acc": np.float64(0.5), "w": torch.ones(2)}, p, _use_new_zipfile_serialization=False)
    raw = p.read_bytes()
    assert b"numpy._core.multiarray\n" in raw  # protocol-2 GLOBAL opcodes: newline-terminated names
    p.write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    obj = read_checkpoint(p)
    assert obj["acc"] == 0.5 and type(obj["acc"]) is np.float64
    assert torch.equal(obj["w"], torch.ones(2))


def test_object_arrays_do_not_open_a_hole(tmp_path):
    """An object array's elements go through the same restricted unpickler."""
    p = tmp_path / "objarr.pt"
    torch.save({"w": torch.ones(1), "meta": np.array([argparse.Namespace(a=1)], dtype=object)}, p)
    with pytest.raises(CheckpointError) as ei:
        read_checkpoint(p)
    assert "argparse.Namespace" in ei.value.message and "numpy" not in ei.value.message
    assert "--safe-globals argparse.Namespace" in ei.value.hint and "--trust-checkpoint" in ei.value.hint
    obj = read_checkpoint(p, safe_globals=["argparse.Namespace"])
    assert obj["meta"][0].a == 1


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_in_a_pickle_is_refused_and_never_run(tmp_path):
    ev = _Evil()
    ev.marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "acc": np.float64(0.9), "x": ev}, p)
    with pytest.raises(CheckpointError) as ei:
        read_checkpoint(p)
    assert f"{os.system.__module__}.system" in ei.value.message
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_custom_class_refused_once_then_allowed_subprocess(tmp_path):
    (tmp_path / "trainlib.py").write_text(TRAINLIB)
    mods = load_models(tmp_path)
    sys.path.insert(0, str(tmp_path))
    try:
        import trainlib

        torch.save({"epoch": 2, "state_dict": mods.MLP().state_dict(), "config": trainlib.RunConfig(0.3, "x"),
                    "accuracy": np.float64(0.7)}, tmp_path / "ep2.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("trainlib", None)
    x, _ = mlp_data(n=16)
    save_probe(tmp_path / "probe.npz", x.numpy())
    base = ["capture", "-m", f"{write_models(tmp_path)}:MLP", "-c", "ep2.pt", "-p", "probe.npz", "-l", "fc2"]

    r = _cli(tmp_path, *base, "-o", "acts")
    assert r.returncode == 4
    err = r.stderr
    assert "\x1b[" not in err  # plain text on a non-TTY
    assert err.count("trainlib.RunConfig") == 2  # once in the message, once in the suggested option
    assert err.count("Error:") == 1 and err.count("safe loading") == 1
    assert "numpy" not in err  # numpy scalars are allowed, so not named
    assert "--safe-globals trainlib.RunConfig" in err and "--trust-checkpoint" in err
    assert "Traceback" not in err
    assert not (tmp_path / "acts").exists()

    r = _cli(tmp_path, *base, "-o", "acts", "--safe-globals", "trainlib.Nope", "-q")
    assert r.returncode == 2
    assert "trainlib.Nope" in r.stderr and "no attribute 'Nope'" in r.stderr
    assert not (tmp_path / "acts").exists()

    r = _cli(tmp_path, *base, "-o", "acts", "--safe-globals", "trainlib.RunConfig", "-q")
    assert r.returncode == 0, r.stderr
    (ck,) = open_store(tmp_path / "acts").checkpoints
    assert (ck.epoch, ck.metrics) == (2, {"accuracy": 0.7})


def test_safe_globals_in_python_api(tmp_path):
    mods = load_models(tmp_path)
    net = mods.MLP()
    p = tmp_path / "hp.pt"
    torch.save({"epoch": 4, "state_dict": net.state_dict(), "hparams": argparse.Namespace(lr=0.1)}, p)
    x = torch.randn(6, 12)
    with pytest.raises(CheckpointError, match="argparse.Namespace"):
        load_checkpoint_into(mods.MLP(), p)
    fresh = mods.MLP()
    load_checkpoint_into(fresh, p, safe_globals=[argparse.Namespace])
    assert torch.equal(fresh.fc1.weight, net.fc1.weight)
    store = capture(f"{write_models(tmp_path)}:MLP", str(p), (x, None), ["fc1"], tmp_path / "acts",
                    safe_globals=["argparse.Namespace"], progress=False)
    with torch.no_grad():
        np.testing.assert_allclose(open_store(store).activations(0, "fc1"), net.fc1(x).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", ["not a name", "os.path.nope_nothing", "no_such_module_xyz.Thing", ""])
def test_bad_safe_globals_names_are_usage_errors(bad):
    with pytest.raises(UsageError) as ei:
        resolve_safe_globals([bad])
    assert repr(bad.strip()) in ei.value.message or repr(bad) in ei.value.message
