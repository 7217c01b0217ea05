"""Checkpoint series: epoch and step from names and metadata (never swapped), the source of
each number, the order, doubtful and undecidable series, ``ibscope checkpoints`` and
``capture --dry-run``; prefixes of wrapper modules; a failed first capture leaves no store.
Every checkpoint here is a real file written by torch or safetensors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file
from typer.testing import CliRunner

from ibscope.capture import capture
from ibscope.capture.loading import discover_checkpoints, load_checkpoint_into
from ibscope.capture.series import parse_name, state_dict_sha256
from ibscope.cli.main import app
from ibscope.errors import CheckpointError, UsageError
from ibscope.store import open_store

TINY = "import torch.nn as nn\ndef net():\n    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))\n"


def net():
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))


@pytest.fixture()
def tiny(tmp_path):
    (tmp_path / "tiny.py").write_text(TINY)
    x = torch.randn(32, 8)
    np.savez(tmp_path / "probe.npz", x=x.numpy(), y=np.arange(32) % 2)
    return tmp_path


@pytest.mark.parametrize("name,epoch,step", [
    ("epoch=3-step=120.ckpt", 3, 120),        # Lightning's default file name
    ("step-200.pt", None, 200),               # the "ep" in "step" is not an epoch
    ("model_step8.bin", None, 8),
    ("gpt2_step16.bin", None, 16),
    ("checkpoint-400", None, 400),            # a Hugging Face Trainer folder
    ("ep12.pt", 12, None),
    ("e012.pth", 12, None),
    ("iter_5000.pt", None, 5000),
    ("checkpoint_step_1000.pt", None, 1000),
    ("epoch_7.pt", 7, None),
    ("global_step=90.ckpt", None, 90),
    ("epoch=0-step=8-val_acc=0.500.ckpt", 0, 8),  # the metric value is not a number of the series
    ("lr1e-3_ep2.pt", 2, None),               # "1e-3" is no epoch
    ("run_7.pt", 7, None),                    # a bare number: an epoch (source "name-number")
    ("model.safetensors", None, None),
])
def test_names_with_word_boundaries(name, epoch, step):
    n = parse_name(name)
    assert (n.epoch, n.step) == (epoch, step)
    assert n.bare == (name == "run_7.pt")
    if "val_acc" in name:
        assert n.metrics == {"val_acc": 0.5}


def test_step_named_files_get_steps_not_epochs(tiny):
    """repro_02 (a): gpt2_step8.bin, gpt2_step16.bin, step-200.pt are steps 8, 16, 200, in that order."""
    d = tiny / "a"
    d.mkdir()
    for n in ["step-200.pt", "gpt2_step16.bin", "gpt2_step8.bin"]:
        torch.save(net().state_dict(), d / n)
    store = capture(f"{tiny}/tiny.py:net", str(d), str(tiny / "probe.npz"), ["0"], tiny / "acts", progress=False)
    st = open_store(store)
    assert [(c.epoch, c.step) for c in st.checkpoints] == [(None, 8), (None, 16), (None, 200)]
    assert [Path(c.path).name for c in st.checkpoints] == ["gpt2_step8.bin", "gpt2_step16.bin", "step-200.pt"]
    assert {(c.epoch_source, c.step_source) for c in st.checkpoints} == {("", "name")}
    assert st.checkpoints[0].label == "step 8"


def test_timm_style_checkpoint_names_holding_the_epoch(tiny):
    """timm writes checkpoint-{epoch}.pth.tar with an 'epoch' key: the number is the epoch, the step
    unknown (not step = epoch)."""
    d = tiny / "timm"
    d.mkdir()
    for e in (0, 1, 2):
        torch.save({"epoch": e, "state_dict": net().state_dict()}, d / f"checkpoint-{e}.pth.tar")
    store = capture(f"{tiny}/tiny.py:net", str(d / "*.pth.tar"), str(tiny / "probe.npz"), ["0"], tiny / "acts_t",
                    progress=False)
    st = open_store(store)
    assert [(c.epoch, c.step) for c in st.checkpoints] == [(0, None), (1, None), (2, None)]
    assert {(c.epoch_source, c.step_source) for c in st.checkpoints} == {("checkpoint", "")}
    # a file whose epoch key differs from the name's number keeps the name's step
    torch.save({"epoch": 1, "state_dict": net().state_dict()}, d / "checkpoint-400.pth.tar")
    store = capture(f"{tiny}/tiny.py:net", str(d / "checkpoint-400.pth.tar"), str(tiny / "probe.npz"), ["0"],
                    tiny / "acts_u", progress=False)
    assert [(c.epoch, c.step) for c in open_store(store).checkpoints] == [(1, 400)]


def test_lightning_file_names_without_keys(tiny):
    """repro_02 (b): epoch=0-step=120.ckpt holding a plain state dict is epoch 0, step 120 (not epoch 120)."""
    d = tiny / "b"
    d.mkdir()
    for e, s in [(1, 240), (0, 120)]:
        torch.save(net().state_dict(), d / f"epoch={e}-step={s}.ckpt")
    files = discover_checkpoints(d)
    assert [(f.epoch, f.step, f.epoch_source, f.step_source) for f in files] == [(0, 120, "name", "name"),
                                                                                  (1, 240, "name", "name")]


def test_metadata_wins_over_names_and_sources_are_recorded(tiny, caplog):
    d = tiny / "m"
    d.mkdir()
    # the name says epoch 9, the file says epoch 2: the file wins, with a warning naming both
    torch.save({"epoch": 2, "global_step": 20, "state_dict": net().state_dict()}, d / "epoch=9.pt")
    save_file(net().state_dict(), str(d / "late.safetensors"), metadata={"epoch": "5", "step": "50"})
    lit = {"epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.4.0",
           "state_dict": {f"model.{k}": v for k, v in net().state_dict().items()}}
    torch.save(lit, d / "last.ckpt")
    with caplog.at_level(logging.WARNING):
        files = discover_checkpoints(d)
    got = [(f.path.name, f.epoch, f.step, f.epoch_source, f.step_source) for f in files]
    assert got == [("epoch=9.pt", 2, 20, "checkpoint", "checkpoint"), ("last.ckpt", 3, 30, "lightning", "lightning"),
                   ("late.safetensors", 5, 50, "safetensors", "safetensors")]
    assert "the name says epoch 9 but the key in the checkpoint says 2; using 2" in caplog.text
    store = capture(f"{tiny}/tiny.py:net", str(d), str(tiny / "probe.npz"), ["2"], tiny / "acts", progress=False)
    st = open_store(store)
    assert [(c.epoch, c.step, c.epoch_source, c.step_source) for c in st.checkpoints] == [
        (2, 20, "checkpoint", "checkpoint"), (3, 30, "lightning", "lightning"), (5, 50, "safetensors", "safetensors")]


def test_one_file_without_numbers_keeps_the_others(tiny, caplog):
    """repro_02 (c): a file without an epoch no longer wipes the epoch of the others."""
    d = tiny / "c"
    d.mkdir()
    save_file(net().state_dict(), str(d / "final.safetensors"), metadata={"epoch": "3"})
    save_file(net().state_dict(), str(d / "export.safetensors"))
    with caplog.at_level(logging.WARNING):
        files = discover_checkpoints([d / "export.safetensors", d / "final.safetensors"])
    assert [(f.path.name, f.epoch, f.epoch_source) for f in files] == [("final.safetensors", 3, "safetensors"),
                                                                        ("export.safetensors", None, "")]
    assert "1 of 2 checkpoints have no epoch or step" in caplog.text and "export.safetensors" in caplog.text
    assert caplog.text.count("have no epoch or step") == 1  # said once
    assert files[1].label == "export.safetensors"


def test_trainer_folders_ordered_by_global_step(tiny):
    """repro_03: checkpoint-{50,100,400}/model.safetensors are captured as steps 50, 100, 400 with the
    (fractional) epochs of trainer_state.json, and the logged loss as a metric."""
    for step in (400, 50, 100):
        d = tiny / "out" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        save_file(net().state_dict(), str(d / "model.safetensors"))
        hist = [{"step": s, "epoch": s / 100, "loss": 1.0 / s} for s in (25, 50, 100, 200, 400) if s <= step]
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": step / 100,
                                                          "log_history": hist}))
    store = capture(f"{tiny}/tiny.py:net", str(tiny / "out/checkpoint-*/model.safetensors"), str(tiny / "probe.npz"),
                    ["0"], tiny / "acts", progress=False)
    st = open_store(store)
    assert [c.step for c in st.checkpoints] == [50, 100, 400]
    assert [c.epoch for c in st.checkpoints] == [None, 1, 4] and [c.epoch_exact for c in st.checkpoints] == [0.5, 1, 4]
    assert {c.step_source for c in st.checkpoints} == {"trainer_state"}
    assert [c.metrics["loss"] for c in st.checkpoints] == [1 / 50, 1 / 100, 1 / 400]
    assert st.checkpoints[0].label == "epoch 0.5, step 50"
    # the folder itself (and the Trainer's output directory) are the same series
    assert [f.step for f in discover_checkpoints(tiny / "out")] == [50, 100, 400]


def test_duplicates_and_backwards_epochs_are_warnings_listing_files(tiny, caplog):
    d = tiny / "dup"
    d.mkdir()
    torch.save({"epoch": 0, "global_step": 10, "state_dict": net().state_dict()}, d / "a.pt")
    torch.save({"epoch": 1, "global_step": 10, "state_dict": net().state_dict()}, d / "b.pt")
    torch.save({"epoch": 0, "global_step": 20, "state_dict": net().state_dict()}, d / "c.pt")
    with caplog.at_level(logging.WARNING):
        files = discover_checkpoints(d)
    assert [f.path.name for f in files] == ["a.pt", "b.pt", "c.pt"]
    assert "2 different checkpoints share step 10" in caplog.text
    assert "the epochs go backwards" in caplog.text and "c.pt (epoch 0, step 20)" in caplog.text


def test_identical_copies_are_captured_once(tiny, caplog):
    d = tiny / "cp"
    d.mkdir()
    torch.save({"epoch": 1, "state_dict": net().state_dict()}, d / "ep1.pt")
    (d / "ep1_copy.pt").write_bytes((d / "ep1.pt").read_bytes())
    with caplog.at_level(logging.WARNING):
        files = discover_checkpoints(d)
    assert len(files) == 1 and "same content and numbers" in caplog.text


def test_undecidable_order_is_a_usage_error_unless_told(tiny):
    d = tiny / "mix"
    d.mkdir()
    torch.save(net().state_dict(), d / "step-200.pt")
    torch.save(net().state_dict(), d / "ep3.pt")
    with pytest.raises(UsageError, match="cannot be decided") as ei:
        discover_checkpoints(d)
    assert "step-200.pt: step 200" in ei.value.message and "ep3.pt: epoch 3" in ei.value.message
    assert "--order name" in ei.value.hint
    assert [f.path.name for f in discover_checkpoints(d, order="name")] == ["ep3.pt", "step-200.pt"]
    with pytest.raises(UsageError, match="--order step: 1 checkpoint"):
        discover_checkpoints(d, order="step")


def test_checkpoints_command_and_dry_run(tiny):
    d = tiny / "lit"
    d.mkdir()
    for e, s in [(0, 8), (1, 16)]:
        torch.save(net().state_dict(), d / f"epoch={e}-step={s}-val_acc=0.{e + 5}00.ckpt")
    res = CliRunner().invoke(app, ["checkpoints", str(d / "*.ckpt"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [(c["epoch"], c["step"], c["epoch_source"], c["metrics"]) for c in doc["checkpoints"]] == [
        (0, 8, "name", {"val_acc": 0.5}), (1, 16, "name", {"val_acc": 0.6})]
    res = CliRunner().invoke(app, ["checkpoints", str(d)])
    assert res.exit_code == 0 and "val_acc=0.6" in res.output and "file name" in res.output
    res = CliRunner().invoke(app, ["capture", "-m", f"{tiny}/tiny.py:net", "-c", str(d), "-p", str(tiny / "probe.npz"),
                                   "-l", "0", "-o", str(tiny / "acts"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "file name" in res.output and "dry run" in res.output and not (tiny / "acts").exists()
    # the Jacobian plan: shown once, with its layer list (no rich markup eats '[0 16, 2 2]')
    res = CliRunner().invoke(app, ["capture", "-m", f"{tiny}/tiny.py:net", "-c", str(d), "-p", str(tiny / "probe.npz"),
                                   "-l", "0", "-l", "2", "--jacobian-samples", "2", "-o", str(tiny / "acts"),
                                   "--dry-run"])
    assert res.exit_code == 0, res.output
    assert res.output.count("vjp/jvp passes") == 1 and "[0 16, 2 2]" in " ".join(res.output.split())
    # --dry-run needs no --out; a real capture does
    args = ["capture", "-m", f"{tiny}/tiny.py:net", "-c", str(d), "-p", str(tiny / "probe.npz"), "-l", "0"]
    res = CliRunner().invoke(app, [*args, "--dry-run"])
    assert res.exit_code == 0 and "dry run" in res.output, res.output
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "--out" in res.output
    torch.save(net().state_dict(), d / "ep3.pt")  # an epoch only: the series still orders by epoch
    res = CliRunner().invoke(app, ["checkpoints", str(d), "--json"])
    assert [c["path"][-6:] for c in json.loads(res.stdout)["checkpoints"]][-1] == "ep3.pt"
    torch.save(net().state_dict(), d / "step-200.pt")  # a step only: no order relates it to ep3.pt
    res = CliRunner().invoke(app, ["checkpoints", str(d)])
    assert res.exit_code == 2 and "cannot be decided" in res.output


WRAP = '''
import torch.nn as nn
class Inner(nn.Module):
    def __init__(s):
        super().__init__(); s.fc1 = nn.Linear(8, 16); s.act = nn.Tanh(); s.fc2 = nn.Linear(16, 2)
    def forward(s, x):
        return s.fc2(s.act(s.fc1(x)))
class Wrapper(nn.Module):
    def __init__(s):
        super().__init__(); s.model = Inner()
    def forward(s, x):
        return s.model(x)
class WrapperPlus(Wrapper):
    def __init__(s):
        super().__init__(); s.extra = nn.Linear(2, 2)
'''


def test_wrapper_prefix_is_added_with_a_note_and_named_in_hints(tmp_path, caplog):
    """repro_05 (b): a wrapper (self.model = Inner()) loads the Inner checkpoint: the prefix 'model.' is added."""
    (tmp_path / "wrap.py").write_text(WRAP)
    from ibscope.capture.loading import _import_file

    mod = _import_file(tmp_path / "wrap.py")
    inner = mod.Inner()
    torch.save({"epoch": 0, "model_state_dict": inner.state_dict()}, tmp_path / "ep0.pt")
    x = torch.randn(16, 8)
    with caplog.at_level(logging.INFO):
        store = capture(f"{tmp_path}/wrap.py:Wrapper", str(tmp_path / "ep0.pt"), (x, None), ["model.fc1"],
                        tmp_path / "acts", progress=False)
    assert caplog.text.count("added the prefix 'model.'") == 1
    with torch.no_grad():
        np.testing.assert_allclose(open_store(store).activations(0, "model.fc1"), inner.fc1(x).numpy(), rtol=1e-6)
    # other keys differ too: strict refusal, and the hint names the prefix rather than --model-args
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint_into(mod.WrapperPlus(), tmp_path / "ep0.pt")
    assert "prefix 'model.'" in ei.value.hint and "--model-args" not in ei.value.hint
    # and the reverse: a wrapper's checkpoint into the inner model (attribute prefix stripped)
    torch.save(mod.Wrapper().state_dict(), tmp_path / "w.pt")
    assert load_checkpoint_into(mod.Inner(), tmp_path / "w.pt")["prefix"] == "model."


def test_failed_first_capture_leaves_no_store_and_retry_works(tmp_path):
    """repro_05 (c): the failed capture leaves nothing; the retry with a fixed factory needs no --overwrite."""
    (tmp_path / "wrap.py").write_text(WRAP)
    from ibscope.capture.loading import _import_file

    mod = _import_file(tmp_path / "wrap.py")
    torch.save(mod.Inner().state_dict(), tmp_path / "ep0.pt")
    x = torch.randn(16, 8)
    with pytest.raises(CheckpointError):
        capture(f"{tmp_path}/wrap.py:WrapperPlus", str(tmp_path / "ep0.pt"), (x, None), ["model.fc1"], tmp_path / "acts",
                progress=False)
    assert not (tmp_path / "acts").exists()
    store = capture(f"{tmp_path}/wrap.py:Inner", str(tmp_path / "ep0.pt"), (x, None), ["fc1"], tmp_path / "acts",
                    progress=False)
    assert len(open_store(store).checkpoints) == 1
    # a store left empty by an older ibscope (manifest, no shard) does not block a capture with other settings
    empty = tmp_path / "old"
    capture(f"{tmp_path}/wrap.py:Inner", str(tmp_path / "ep0.pt"), (x, None), ["fc1"], empty, progress=False)
    for p in (empty / "checkpoints").iterdir():
        p.unlink()
    store = capture(f"{tmp_path}/wrap.py:Inner", str(tmp_path / "ep0.pt"), (x, None), ["fc2"], empty, progress=False)
    assert open_store(store).layers == ["fc2"]


def test_state_dict_sha256_is_stable_and_content_based():
    a = net()
    b = net()
    b.load_state_dict(a.state_dict())
    assert state_dict_sha256(a.state_dict()) == state_dict_sha256(b.state_dict())
    assert state_dict_sha256({k: v.t() if v.ndim == 2 else v for k, v in a.state_dict().items()}) != \
        state_dict_sha256(a.state_dict())
    half = {k: v.to(torch.bfloat16) for k, v in a.state_dict().items()}  # any dtype, no numpy conversion
    assert len(state_dict_sha256(half)) == 64
