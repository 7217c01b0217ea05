"""`ibscope capture` / `layers` / `info` through the CLI: outputs, every error path's message and exit code."""

from __future__ import annotations

import argparse
import json

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from capture_support import load_models, mlp_data, save_probe, train_checkpoints, write_models
from ibscope.cli.main import app
from ibscope.errors import UsageError
from ibscope.store import open_store


@pytest.fixture()
def run_dir(tmp_path):
    mods = load_models(tmp_path)
    x, y = mlp_data(n=32)
    torch.manual_seed(0)
    train_checkpoints(mods.MLP(), x, y, tmp_path / "ck", epochs=(0, 2), steps=3)
    save_probe(tmp_path / "probe.npz", x.numpy(), y.numpy())
    return tmp_path


def invoke(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


def base(d, out="acts", *extra, layer="type:Linear"):
    return ["capture", "-m", f"{write_models(d)}:MLP", "-c", str(d / "ck" / "*.pt"), "-p", d / "probe.npz",
            "-l", layer, "-o", d / out, "-q", *extra]


def test_cli_capture_info_and_layers(run_dir):
    d = run_dir
    res = invoke(*base(d), "--batch-size", "8", "--max-samples", "20", "--jacobian-samples", "3", "--split", "test",
                 "--run", "seed1", "--dtype", "float16")
    assert res.exit_code == 0, res.output
    st = open_store(d / "acts")
    assert st.n_samples == 20 and st.config["split"] == "test" and st.config["run"] == "seed1"
    assert [c.epoch for c in st.checkpoints] == [0, 2] and st.jacobian(1, "fc1")[0].shape == (3, 10)
    assert st.activations(0, "fc1").dtype == np.float16
    res = invoke("info", d / "acts", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["n_samples"] == 20 and list(info["layers"]) == ["fc1", "fc2"]
    assert [c["epoch"] for c in info["checkpoints"]] == [0, 2] and info["checkpoints"][0]["order_from"] == "checkpoint"
    assert info["checkpoints"][1]["metrics"]["accuracy"] >= 0 and info["inputs"] == [12]
    res = invoke("info", d / "acts")
    assert res.exit_code == 0 and "fc1" in res.output and "Checkpoints (2 complete)" in res.output
    res = invoke("layers", "-m", f"{write_models(d)}:MLP", "-p", d / "probe.npz", "--checkpoint", d / "ck" / "epoch_002.pt",
                 "-l", "act", "--json")
    assert res.exit_code == 0, res.output
    listing = json.loads(res.output)
    assert [m["name"] for m in listing["modules"]] == ["fc1", "act", "fc2", "(model)"]
    assert listing["modules"][0]["output"] == "Tensor[4, 10] float32" and listing["selected"]["act"]["dims"] == 10
    # --reduce overrides per layer, seeded subset
    res = invoke(*base(d, "acts2"), "--reduce", "fc1=rp:4", "--max-samples", "10", "--sample-seed", "1")
    assert res.exit_code == 0, res.output
    st2 = open_store(d / "acts2")
    assert st2.layer_meta("fc1")["reduction"] == "rp:4" and st2.activations(0, "fc1").shape == (10, 4)
    assert len(st2.sample_ids) == 10 and not np.array_equal(st2.sample_ids, np.arange(10))


def test_library_inspect_layers_and_store_summary_are_what_the_cli_prints(run_dir):
    """The CLI only prints: `layers --json` is ibscope.capture.inspect.inspect_layers and `info
    --json` is Store.summary()."""
    from ibscope.capture.inspect import inspect_layers
    from ibscope.store import Store

    d = run_dir
    assert invoke(*base(d)).exit_code == 0
    got = inspect_layers(f"{write_models(d)}:MLP", str(d / "probe.npz"), checkpoint=d / "ck" / "epoch_002.pt",
                         layers=["act"], batch_size=3)
    assert got["batch"] == 3 and [m["name"] for m in got["modules"]] == ["fc1", "act", "fc2", "(model)"]
    assert got["modules"][0]["output"] == "Tensor[3, 10] float32" and got["modules"][0]["params"] == 12 * 10 + 10
    # a container counts its children's parameters (the whole model here: fc1 + fc2)
    by = {m["name"]: m["params"] for m in got["modules"]}
    assert by["(model)"] == by["fc1"] + by["fc2"] > 0 and by["act"] == 0
    assert got["selected"]["act"]["dims"] == 10 and got["selected"]["act"]["reduction"] == "none"
    res = invoke("layers", "-m", f"{write_models(d)}:MLP", "-p", d / "probe.npz", "--checkpoint",
                 d / "ck" / "epoch_002.pt", "-l", "act", "-b", "3", "--json")
    assert json.loads(res.output) == {k: got[k] for k in ("inputs", "modules", "selected")}
    summary = Store(d / "acts").summary()
    assert summary["n_samples"] == 32 and summary["labels"] == {"dtype": "int64", "classes": 2}
    assert [c["epoch"] for c in summary["checkpoints"]] == [0, 2] and summary["skipped"] == []
    assert json.loads(invoke("info", d / "acts", "--json").output) == json.loads(json.dumps(summary, default=str))
    with pytest.raises(UsageError, match="--batch-size must be >= 1. Got 0"):
        inspect_layers(f"{write_models(d)}:MLP", str(d / "probe.npz"), batch_size=0)


def test_cli_layers_shows_reuse(tmp_path):
    mods = load_models(tmp_path)
    save_probe(tmp_path / "img.npz", np.random.default_rng(0).normal(size=(4, 1, 5, 5)).astype("float32"))
    res = invoke("layers", "-m", f"{write_models(tmp_path)}:CNN", "-p", tmp_path / "img.npz")
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if "block.relu" in ln)
    assert "ReLU" in line and " 2 " in line
    assert mods.CNN  # the models file is the one the CLI imported


def _expect(res, code, *needles):
    assert res.exit_code == code, (res.exit_code, res.output)
    for n in needles:
        assert n in res.output, (n, res.output)


def test_cli_usage_errors_exit_2(run_dir, tmp_path):
    d = run_dir
    m = f"{write_models(d)}:MLP"
    _expect(invoke("capture", "-m", "nocolon", "-c", d / "ck", "-p", d / "probe.npz", "-l", "fc1", "-o", d / "o"), 2,
            "--model expects 'pkg.module:factory'")
    _expect(invoke("capture", "-m", "missing_file.py:Net", "-c", d / "ck", "-p", d / "probe.npz", "-l", "fc1", "-o", d / "o"),
            2, "file 'missing_file.py' not found")
    _expect(invoke("capture", "-m", "ibscope_no_such_pkg.models:Net", "-c", d / "ck", "-p", d / "probe.npz", "-l", "fc1",
                   "-o", d / "o"), 2, "cannot import module 'ibscope_no_such_pkg.models'")
    _expect(invoke("capture", "-m", f"{write_models(d)}:MPL", "-c", d / "ck", "-p", d / "probe.npz", "-l", "fc1", "-o", d / "o"),
            2, "has no attribute 'MPL'", "Did you mean 'MLP'")
    _expect(invoke("capture", "-m", m, "--model-args", "{'hidden': ", "-c", d / "ck", "-p", d / "probe.npz", "-l", "fc1",
                   "-o", d / "o"), 2, "--model-args must be a JSON or YAML mapping")
    _expect(invoke("capture", "-m", m, "--model-args", '{"hiden": 3}', "-c", d / "ck", "-p", d / "probe.npz", "-l", "fc1",
                   "-o", d / "o"), 2, "Calling the model factory", "hiden")
    _expect(invoke("capture", "-m", m, "-c", d / "nothing" / "*.pt", "-p", d / "probe.npz", "-l", "fc1", "-o", d / "o"), 2,
            "matched no files")
    _expect(invoke("capture", "-m", m, "-c", d / "ck", "-p", d / "nope.npz", "-l", "fc1", "-o", d / "o"), 2,
            "Probe file", "not found")
    _expect(invoke(*base(d, "o", layer="fc3")), 2, "Unknown layer 'fc3'", "Did you mean")
    _expect(invoke(*base(d, "o"), "--reduce", "avgpool"), 2, "Unknown reduction 'avgpool'")
    _expect(invoke(*base(d, "o"), "--reduce", "fc9=gap"), 2, "Unknown layer in --reduce 'fc9'")
    res = invoke(*base(d, "o"), "--dtype", "float64")  # a closed set: listed in --help, checked by the CLI
    assert res.exit_code == 2 and "--dtype must be one of float32, float16. Got 'float64'." in " ".join(
        res.output.replace("│", " ").split()), res.output
    _expect(invoke(*base(d, "o"), "--batch-size", "0"), 2, "--batch-size must be >= 1")
    _expect(invoke(*base(d, "o"), "--device", "tpu"), 2, "--device expects auto, cpu or cuda:N")
    if not torch.cuda.is_available():
        _expect(invoke(*base(d, "o"), "--device", "cuda:0"), 2, "no CUDA device is available")
    _expect(invoke(*base(d, "o"), "--resume", "--overwrite"), 2, "--resume and --overwrite exclude each other")
    (d / "busy").mkdir()
    (d / "busy" / "notes.txt").write_text("mine")
    _expect(invoke(*base(d, "busy")), 2, "non-empty directory that is not an activation store")
    assert (d / "busy" / "notes.txt").read_text() == "mine"
    assert invoke(*base(d, "acts")).exit_code == 0
    _expect(invoke(*base(d, "acts")), 2, "already exists", "--resume")
    assert not (d / "o").exists()


def test_cli_data_errors_exit_4(run_dir):
    d = run_dir
    mods = load_models(d)
    m = f"{write_models(d)}:MLP"
    # a checkpoint for another architecture: strict loading lists the mismatch
    torch.save({"epoch": 5, "state_dict": mods.MLP(hidden=6).state_dict()}, d / "other.pt")
    _expect(invoke("capture", "-m", m, "-c", d / "other.pt", "-p", d / "probe.npz", "-l", "fc1", "-o", d / "o1", "-q"), 4,
            "does not match the model", "fc1.weight: checkpoint (6, 12) vs model (10, 12)")
    # unsafe pickle: names the class and the opt-in flag; the opt-in works
    torch.save({"epoch": 1, "state_dict": mods.MLP().state_dict(), "args": argparse.Namespace(a=1)}, d / "unsafe.pt")
    _expect(invoke("capture", "-m", m, "-c", d / "unsafe.pt", "-p", d / "probe.npz", "-l", "fc1", "-o", d / "o2", "-q"), 4,
            "argparse.Namespace", "--trust-checkpoint")
    assert not (d / "o2").exists()
    assert invoke("capture", "-m", m, "-c", d / "unsafe.pt", "-p", d / "probe.npz", "-l", "fc1", "-o", d / "o2", "-q",
                  "--trust-checkpoint").exit_code == 0
    # a corrupt checkpoint
    (d / "junk.pt").write_bytes(b"\x00garbage")
    _expect(invoke("capture", "-m", m, "-c", d / "junk.pt", "-p", d / "probe.npz", "-l", "fc1", "-o", d / "o3", "-q"), 4,
            "not a readable PyTorch checkpoint")
    # non-finite activations name the layer and checkpoint
    torch.save({"epoch": 3, "state_dict": mods.Scaled().state_dict()}, d / "s3.pt")
    save_probe(d / "p4.npz", np.ones((5, 4), "float32"))
    _expect(invoke("capture", "-m", f"{write_models(d)}:Scaled", "--model-args", "scale: .inf", "-c", d / "s3.pt", "-p", d / "p4.npz", "-l", "big", "-o", d / "o4", "-q"), 4,
            "Layer 'big' has 15 non-finite value(s)", "epoch 3", "--allow-nonfinite")
    # probe whose inputs do not fit the model
    save_probe(d / "wrong.npz", np.ones((5, 7), "float32"))
    _expect(invoke("capture", "-m", m, "-c", d / "ck", "-p", d / "wrong.npz", "-l", "fc1", "-o", d / "o5", "-q"), 4,
            "forward pass failed on the probe batch")
    # labels that do not match the inputs
    np.savez(d / "mism.npz", x=np.ones((5, 12), "float32"), y=np.arange(4))
    _expect(invoke("capture", "-m", m, "-c", d / "ck", "-p", d / "mism.npz", "-l", "fc1", "-o", d / "o6", "-q"), 4,
            "5 samples but labels have 4")
    # resume on a store made with other layers / from other data
    assert invoke(*base(d, "acts")).exit_code == 0
    _expect(invoke(*base(d, "acts", "--resume", layer="fc2")), 4,
            "Cannot resume", "different settings")
    _expect(invoke(*base(d, "acts"), "--resume", "--max-samples", "7"), 4, "different probe data")
    # info on a foreign or corrupt HDF5 file / a missing store
    (d / "foreign").mkdir()
    with h5py.File(d / "foreign" / "manifest.h5", "w") as f:
        f.attrs["format"] = "something-else"
    _expect(invoke("info", d / "foreign"), 4, "is not an ibscope activation store")
    (d / "corrupt").mkdir()
    (d / "corrupt" / "manifest.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    _expect(invoke("info", d / "corrupt"), 4, "manifest.h5' is truncated, corrupt or not HDF5")
    _expect(invoke("info", d / "missing"), 4, "Activation store not found")


def test_unsafe_alias_is_named_not_an_unknown_layer():
    from ibscope.capture.selectors import parse_spec
    from ibscope.errors import UsageError

    assert parse_spec("fc1=fc1_out").alias == "fc1_out" and parse_spec("re:a=b").alias == "b"
    for raw in ("fc1=../../evil", "fc1=", "fc1=a/b"):
        with pytest.raises(UsageError, match="is not a valid layer name"):
            parse_spec(raw)
