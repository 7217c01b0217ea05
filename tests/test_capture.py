"""ibscope capture: stored values against direct forward passes of really trained tiny models."""

from __future__ import annotations

import argparse

import h5py
import numpy as np
import pytest
import torch

from capture_support import load_models, mlp_data, save_probe, train_checkpoints, write_models
from ibscope.capture import capture
from ibscope.capture.hooks import Reducer
from ibscope.capture.jacobian import jacobian_singular_values
from ibscope.capture.loading import discover_checkpoints, load_checkpoint_into, read_checkpoint
from ibscope.capture.probe import load_probe
from ibscope.errors import CheckpointError, DataError, UsageError
from ibscope.store import open_store

# Float32 tolerance: the stored values come from the same ops on the same CPU as the reference,
# but with another batch size, which may change BLAS blocking and so the summation order; that
# moves float32 results by a few ulps (~1e-7 relative), far below 1e-5.
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture()
def mlp_run(tmp_path):
    mods = load_models(tmp_path)
    x, y = mlp_data()
    torch.manual_seed(1)
    net = mods.MLP()
    paths = train_checkpoints(net, x, y, tmp_path / "ckpts")
    probe = save_probe(tmp_path / "probe.npz", x.numpy(), y.numpy())
    return mods, x, y, paths, probe


def test_mlp_round_trip_against_direct_forward(tmp_path, mlp_run):
    mods, x, y, paths, probe = mlp_run
    store = capture(f"{write_models(tmp_path)}:MLP", str(tmp_path / "ckpts" / "*.pt"), str(probe),
                    ["type:Linear", "act", "fc2:in"], tmp_path / "acts", batch_size=24, progress=False)
    st = open_store(store)
    assert st.layers == ["fc1", "act", "fc2:in", "fc2"]  # execution order (an input comes before its module)
    assert [c.epoch for c in st.checkpoints] == [0, 1, 2]
    assert np.array_equal(st.sample_ids, np.arange(64)) and np.array_equal(st.labels, y.numpy())
    np.testing.assert_array_equal(st.inputs(), x.numpy())
    assert st.config["split"] == "probe" and st.config["run"] == "run"
    for c, p in zip(st.checkpoints, paths):
        ref = mods.MLP()
        ref.load_state_dict(torch.load(p, weights_only=True)["state_dict"])
        ref.eval()
        with torch.no_grad():
            h = ref.fc1(x)
            a = torch.tanh(h)
            o = ref.fc2(a)
        np.testing.assert_allclose(st.activations(c, "fc1"), h.numpy(), **TOL)
        np.testing.assert_allclose(st.activations(c, "act"), a.numpy(), **TOL)
        np.testing.assert_allclose(st.activations(c, "fc2:in"), a.numpy(), **TOL)
        np.testing.assert_allclose(st.activations(c, "fc2"), o.numpy(), **TOL)
        saved = torch.load(p, weights_only=True)
        assert c.metrics == pytest.approx({"accuracy": saved["accuracy"], "loss": saved["loss"]})
    # training really happened: the checkpoints differ
    assert not np.allclose(st.activations(0, "fc2"), st.activations(2, "fc2"))


def _cnn_reference(net, x):
    """Hand-written forward of capture_support.CNN that keeps every intermediate."""
    with torch.no_grad():
        stem = net.stem(x)
        r0 = torch.relu(stem)
        b = net.block
        c1 = b.bn1(b.conv1(r0))
        relu0 = torch.relu(c1)
        bn2 = b.bn2(b.conv2(relu0))
        relu1 = torch.relu(bn2 + r0)
    return dict(stem=stem, relu0=relu0, bn2=bn2, relu1=relu1)


def test_cnn_always_copy_inplace_relu_residual_and_reuse(tmp_path):
    mods = load_models(tmp_path)
    torch.manual_seed(2)
    x = torch.randn(24, 1, 6, 6)
    y = torch.arange(24) % 3
    net = mods.CNN()
    paths = train_checkpoints(net, x, y, tmp_path / "ck", epochs=(0, 3), steps=3)
    probe = save_probe(tmp_path / "p.npz", x.numpy(), y.numpy())
    store = capture(f"{write_models(tmp_path)}:CNN", [str(p) for p in paths], str(probe),
                    ["stem", "block.relu@all", "block.bn2", "block"], tmp_path / "acts", batch_size=10,
                    reduce={"stem": "flatten", "block.bn2": "flatten", "block.relu@0": "flatten", "*": "gap"},
                    progress=False)
    st = open_store(store)
    assert st.layers == ["stem", "block.relu@0", "block.bn2", "block.relu@1", "block"]
    assert st.layer_meta("block")["reduction"] == "gap" and st.layer_meta("stem")["raw_shape"] == [4, 6, 6]
    ref_net = mods.CNN()
    for c, p in zip(st.checkpoints, paths):
        ref_net.load_state_dict(torch.load(p, weights_only=True)["state_dict"])
        ref_net.eval()
        ref = _cnn_reference(ref_net, x)
        stem = st.activations(c, "stem")
        # ReLU(inplace=True) runs right after stem: without the copy the store would hold no negatives
        assert (stem < 0).any()
        np.testing.assert_allclose(stem, ref["stem"].reshape(24, -1).numpy(), **TOL)
        # `out += identity` rewrites bn2's output after its hook ran
        np.testing.assert_allclose(st.activations(c, "block.bn2"), ref["bn2"].reshape(24, -1).numpy(), **TOL)
        np.testing.assert_allclose(st.activations(c, "block.relu@0"), ref["relu0"].reshape(24, -1).numpy(), **TOL)
        np.testing.assert_allclose(st.activations(c, "block.relu@1"), ref["relu1"].mean((2, 3)).numpy(), **TOL)
        np.testing.assert_allclose(st.activations(c, "block"), ref["relu1"].mean((2, 3)).numpy(), **TOL)
    # the module reused twice without a call index is refused, naming the fix
    with pytest.raises(UsageError, match=r"called 2 times.*") as ei:
        capture(f"{write_models(tmp_path)}:CNN", [str(paths[0])], str(probe), ["block.relu"], tmp_path / "a2", progress=False)
    assert "block.relu@0" in ei.value.hint and not (tmp_path / "a2" / "manifest.h5").exists()


def test_tuple_and_dict_outputs_and_sequence_reductions(tmp_path):
    mods = load_models(tmp_path)
    torch.manual_seed(3)
    net = mods.TupleOut().eval()
    ck = tmp_path / "tuple_epoch1.pt"
    torch.save(net.state_dict(), ck)
    x = torch.randn(10, 7, 3)
    probe = save_probe(tmp_path / "seq.npz", x.numpy())
    with torch.no_grad():
        out, (h, c) = net.lstm(x)
    store = capture(f"{write_models(tmp_path)}:TupleOut", str(ck), str(probe),
                    ["lstm[0]=last", "lstm[0]=first", "lstm[0]=mean"], tmp_path / "acts",
                    reduce={"last": "last", "first": "first", "mean": "mean"}, progress=False)
    st = open_store(store)
    assert st.labels is None
    np.testing.assert_allclose(st.activations(0, "last"), out[:, -1].numpy(), **TOL)
    np.testing.assert_allclose(st.activations(0, "first"), out[:, 0].numpy(), **TOL)
    np.testing.assert_allclose(st.activations(0, "mean"), out.mean(1).numpy(), **TOL)
    # h_n is (layers, batch, hidden): the batch is not in dim 0, which is refused, not mislabelled
    with pytest.raises(DataError, match=r"returned Tensor\[1, 8, 5\].*batch in dim 0"):
        capture(f"{write_models(tmp_path)}:TupleOut", str(ck), str(probe), ["lstm[1][0]"], tmp_path / "a1",
                reduce="flatten", progress=False)
    # a tuple output without an element selector: the error names the structure and the fix
    with pytest.raises(UsageError, match=r"produced tuple\(Tensor\[8, 7, 5\].*not a tensor") as ei:
        capture(f"{write_models(tmp_path)}:TupleOut", str(ck), str(probe), ["lstm"], tmp_path / "a2", progress=False)
    assert "[0]" in ei.value.hint
    # a sequence without a reduction is refused rather than guessed
    with pytest.raises(UsageError, match="sequence"):
        capture(f"{write_models(tmp_path)}:TupleOut", str(ck), str(probe), ["lstm[0]"], tmp_path / "a3", progress=False)
    # dict outputs: select by key
    dm = mods.DictModel().eval()
    torch.save(dm.state_dict(), tmp_path / "dict_1.pt")
    x4 = torch.randn(8, 4)
    store = capture(f"{write_models(tmp_path)}:DictModel", str(tmp_path / "dict_1.pt"), (x4.numpy(), np.arange(8) % 2),
                    ["enc['hidden']", "enc[pooled]"], tmp_path / "acts_d", progress=False)
    st = open_store(store)
    np.testing.assert_allclose(st.activations(0, "enc['hidden']"), (x4 * 2).numpy(), **TOL)
    np.testing.assert_allclose(st.activations(0, "enc['pooled']"), x4.sum(1, keepdim=True).numpy(), **TOL)


def _fmt_plain(m, e, acc, loss):
    return m.state_dict()


def _fmt_model_state(m, e, acc, loss):
    return {"model_state_dict": m.state_dict(), "epoch": e, "metrics": {"test_accuracy": acc}}


def _fmt_model_key(m, e, acc, loss):
    return {"model": m.state_dict(), "global_step": 100 * e}


def _fmt_lightning(m, e, acc, loss):
    sd = {f"model.{k}": v for k, v in m.state_dict().items()}
    sd["criterion.pos_weight"] = torch.ones(2)  # another attribute of the LightningModule
    return {"epoch": e, "global_step": 10 * e, "pytorch-lightning_version": "2.4.0", "state_dict": sd,
            "loops": {}, "callbacks": {}}


def _fmt_dataparallel(m, e, acc, loss):
    return {"epoch": e, "state_dict": torch.nn.DataParallel(m).state_dict()}


def _fmt_compiled(m, e, acc, loss):
    return {"epoch": e, "state_dict": {f"_orig_mod.{k}": v for k, v in m.state_dict().items()}}


def _fmt_compiled_ddp(m, e, acc, loss):
    return {"epoch": e, "state_dict": {f"module._orig_mod.{k}": v for k, v in m.state_dict().items()}}


@pytest.mark.parametrize("fmt,name,order", [
    (_fmt_plain, "ep{:02d}.pt", "name"),
    (_fmt_model_state, "a{}.pth", "file"),
    (_fmt_model_key, "x{}.bin", "file"),
    (_fmt_lightning, "epoch={}-step={}.ckpt", "file"),
    (_fmt_dataparallel, "dp_{}.pt", "file"),
    (_fmt_compiled, "c_{}.pt", "file"),
    (_fmt_compiled_ddp, "cd_{}.pt", "file"),
])
def test_checkpoint_formats_and_prefixes(tmp_path, fmt, name, order):
    mods = load_models(tmp_path)
    x, y = mlp_data(n=16)
    torch.manual_seed(4)
    net = mods.MLP()
    paths = train_checkpoints(net, x, y, tmp_path / "ck", epochs=(0, 1), steps=2, name=name.replace("{}", "{0}"), fmt=fmt)
    files = discover_checkpoints(tmp_path / "ck")
    assert [f.source for f in files] == [order, order]
    assert [f.path for f in files] == paths  # epoch 0 first
    if fmt is _fmt_model_key:
        assert [f.step for f in files] == [0, 100]
    if fmt is _fmt_model_state:
        assert files[1].metrics["test_accuracy"] == pytest.approx(float((net(x).argmax(1) == y).float().mean()))
    fresh = mods.MLP()
    info = load_checkpoint_into(fresh, files[1])
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(x).numpy(), net.eval()(x).numpy())
    if fmt is _fmt_lightning:
        assert info["prefix"] == "model." and info["dropped"] == 1
    if fmt is _fmt_compiled_ddp:
        assert info["stripped"] == ["module.", "_orig_mod."]


def test_safetensors_checkpoints(tmp_path):
    from safetensors.torch import save_file

    mods = load_models(tmp_path)
    x, _ = mlp_data(n=16)
    a, b = mods.MLP(), mods.MLP()
    save_file(a.state_dict(), str(tmp_path / "w_late.safetensors"), metadata={"epoch": "7"})
    save_file(b.state_dict(), str(tmp_path / "w_early.safetensors"), metadata={"epoch": "2"})
    store = capture(f"{write_models(tmp_path)}:MLP", str(tmp_path / "*.safetensors"), (x, None), ["fc2"],
                    tmp_path / "acts", progress=False)
    st = open_store(store)
    assert [c.epoch for c in st.checkpoints] == [2, 7]
    with torch.no_grad():
        np.testing.assert_allclose(st.activations(0, "fc2"), b(x).numpy(), **TOL)
        np.testing.assert_allclose(st.activations(1, "fc2"), a(x).numpy(), **TOL)


def test_weights_only_refusal_names_globals_and_opt_in(tmp_path):
    mods = load_models(tmp_path)
    net = mods.MLP()
    p = tmp_path / "hp_epoch1.pt"
    torch.save({"epoch": 1, "state_dict": net.state_dict(), "hparams": argparse.Namespace(lr=0.1)}, p)
    with pytest.raises(CheckpointError) as ei:
        read_checkpoint(p)
    assert "argparse.Namespace" in ei.value.message and "--trust-checkpoint" in ei.value.hint
    with pytest.raises(CheckpointError, match="argparse.Namespace"):  # refused before anything is written
        capture(f"{write_models(tmp_path)}:MLP", str(p), (torch.randn(4, 12), None), ["fc1"], tmp_path / "acts",
                progress=False)
    assert not (tmp_path / "acts").exists()
    obj = read_checkpoint(p, trust_checkpoint=True)
    assert obj["hparams"].lr == 0.1
    store = capture(f"{write_models(tmp_path)}:MLP", str(p), (torch.randn(4, 12), None), ["fc1"], tmp_path / "acts",
                    trust_checkpoint=True, progress=False)
    assert len(open_store(store).checkpoints) == 1


def test_strict_loading_lists_missing_unexpected_and_shapes(tmp_path):
    mods = load_models(tmp_path)
    sd = mods.MLP(hidden=8).state_dict()
    torch.save(sd, tmp_path / "small.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch.*fc1.weight: checkpoint \(8, 12\) vs model \(10, 12\)"):
        load_checkpoint_into(mods.MLP(), tmp_path / "small.pt")
    sd = mods.MLP().state_dict()
    sd.pop("fc2.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint_into(mods.MLP(), tmp_path / "broken.pt")
    msg = ei.value.message
    assert "1 missing key(s): fc2.bias" in msg and "1 unexpected key(s): extra.weight" in msg
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")


def test_selectors_globs_regex_types_and_order(tmp_path):
    from ibscope.capture import plan_layers

    mods = load_models(tmp_path)
    net = mods.CNN().eval()
    x = torch.randn(2, 1, 5, 5)
    names = lambda specs: list(plan_layers(net, x, specs)[2])  # noqa: E731
    assert names(["block.*"]) == ["block.conv1", "block.bn1", "block.relu@0", "block.conv2", "block.bn2", "block.relu@1"]
    assert names(["**.relu"]) == ["relu", "block.relu@0", "block.relu@1"]
    assert names([r"re:block\.bn\d"]) == ["block.bn1", "block.bn2"]
    assert names(["type:Linear,BatchNorm2d"]) == ["block.bn1", "block.bn2", "fc"]
    assert names(["fc", "stem=first_conv", "output", "block.relu@last"]) == ["first_conv", "block.relu@1", "fc", "output"]
    assert names(["block.conv1:in"]) == ["block.conv1:in"]
    with pytest.raises(UsageError, match=r"Unknown layer 'block.bn3'. Did you mean.*'block.bn2'"):
        names(["block.bn3"])
    with pytest.raises(UsageError, match="call 5 does not exist"):
        names(["block.relu@5"])
    with pytest.raises(UsageError, match="matched no module"):
        names(["decoder.*"])
    with pytest.raises(UsageError, match="Unknown reduction 'avgpool'"):
        plan_layers(net, x, ["stem"], "avgpool")


def test_random_projection_is_fixed_across_checkpoints_and_gap_gmp(tmp_path):
    mods = load_models(tmp_path)
    torch.manual_seed(5)
    net = mods.CNN().eval()
    for e in (1, 2):  # identical weights under two epochs: identical projections
        torch.save({"epoch": e, "state_dict": net.state_dict()}, tmp_path / f"c{e}.pt")
    x = torch.randn(12, 1, 6, 6)
    store = capture(f"{write_models(tmp_path)}:CNN", str(tmp_path / "c*.pt"), (x, None),
                    ["stem=rp", "stem=flat", "stem=gmp", "stem=gap"], tmp_path / "acts",
                    reduce={"rp": "rp:7", "flat": "flatten", "gmp": "gmp", "gap": "gap"}, progress=False)
    st = open_store(store)
    rp0, rp1, flat = st.activations(0, "rp"), st.activations(1, "rp"), st.activations(0, "flat")
    assert rp0.shape == (12, 7)
    np.testing.assert_array_equal(rp0, rp1)
    # the projection is linear in the flattened map with a matrix fixed by (seed, layer name)
    r = Reducer("rp:7", "rp").projection(flat.shape[1], "cpu", torch.float32).numpy()
    np.testing.assert_allclose(rp0, flat @ r, rtol=1e-4, atol=1e-5)
    assert not np.allclose(r, Reducer("rp:7:1", "rp").projection(flat.shape[1], "cpu", torch.float32).numpy())
    maps = flat.reshape(12, 4, 36)
    np.testing.assert_allclose(st.activations(0, "gmp"), maps.max(2), **TOL)
    np.testing.assert_allclose(st.activations(0, "gap"), maps.mean(2), **TOL)


def test_float16_storage_falls_back_to_float32_on_overflow(tmp_path, caplog):
    mods = load_models(tmp_path)
    torch.manual_seed(6)
    big = mods.Scaled(scale=1e6).eval()
    torch.save({"epoch": 1, "state_dict": big.state_dict()}, tmp_path / "s1.pt")
    x = torch.randn(40, 4)
    store = capture(f"{write_models(tmp_path)}:Scaled", str(tmp_path / "s1.pt"), (x, None), ["fc", "big"],
                    tmp_path / "acts", model_args={"scale": 1e6}, dtype="float16", batch_size=8, progress=False)
    st = open_store(store)
    with torch.no_grad():
        fc = big.fc(x).numpy()
    with h5py.File(st.checkpoints[0].shard, "r") as f:
        assert f["acts/fc"].dtype == np.float16 and "dtype_fallback" not in f["acts/fc"].attrs
        assert f["acts/big"].dtype == np.float32 and f["acts/big"].attrs["dtype_fallback"] == "float32"
    # float16 keeps ~3 significant digits: relative error <= 2**-11 (plus subnormal range)
    np.testing.assert_allclose(st.activations(0, "fc"), fc, rtol=2**-10, atol=1e-4)
    np.testing.assert_allclose(st.activations(0, "big"), fc * 1e6, rtol=1e-5)
    assert np.isfinite(st.activations(0, "big")).all()
    assert any("beyond float16" in r.message for r in caplog.records)


def test_nonfinite_activations_are_an_error_unless_allowed(tmp_path):
    mods = load_models(tmp_path)
    net = mods.Scaled().eval()
    torch.save({"epoch": 4, "state_dict": net.state_dict()}, tmp_path / "n4.pt")
    x = torch.randn(6, 4)
    spec = f"{write_models(tmp_path)}:Scaled"
    with pytest.raises(DataError, match=r"Layer 'big' has 18 non-finite value\(s\).*epoch 4") as ei:
        capture(spec, str(tmp_path / "n4.pt"), (x, None), ["big"], tmp_path / "acts",
                model_args={"scale": float("inf")}, progress=False)
    assert "--allow-nonfinite" in ei.value.hint
    assert not (tmp_path / "acts").exists()  # nothing half-written, and no empty store blocking the retry
    store = capture(spec, str(tmp_path / "n4.pt"), (x, None), ["big"], tmp_path / "acts", model_args={"scale": float("inf")},
                    allow_nonfinite=True, progress=False)
    with h5py.File(open_store(store).checkpoints[0].shard, "r") as f:
        assert f["acts/big"].attrs["nonfinite_count"] == 18


def test_jacobian_spectra_match_closed_form_and_autograd(tmp_path):
    mods = load_models(tmp_path)
    x, y = mlp_data(n=20)
    torch.manual_seed(7)
    net = mods.MLP().eval()
    torch.save({"epoch": 0, "state_dict": net.state_dict()}, tmp_path / "m0.pt")
    store = capture(f"{write_models(tmp_path)}:MLP", str(tmp_path / "m0.pt"), (x, y), ["fc1", "act"], tmp_path / "acts",
                    jacobian_samples=6, progress=False)
    st = open_store(store)
    sv, rows = st.jacobian(0, "fc1")
    assert sv.shape == (6, 10) and np.array_equal(rows, np.arange(6))
    # d fc1(x) / dx = W1 for every sample: closed form
    w_sv = torch.linalg.svdvals(net.fc1.weight.detach()).numpy()
    np.testing.assert_allclose(sv, np.tile(w_sv, (6, 1)), rtol=1e-5, atol=1e-6)
    # tanh layer: slow reference with torch.autograd.functional.jacobian, one sample at a time
    sv_act, _ = st.jacobian(0, "act")
    for i in range(6):
        j = torch.autograd.functional.jacobian(lambda v: torch.tanh(net.fc1(v)), x[i])
        np.testing.assert_allclose(sv_act[i], torch.linalg.svdvals(j).numpy(), rtol=1e-4, atol=1e-6)
    assert (np.diff(sv_act, axis=1) <= 1e-6).all()  # descending
    # the CNN with in-place ReLUs and a residual: gap of block output vs autograd reference
    cnn = mods.CNN().eval()
    xi = torch.randn(3, 1, 5, 5)

    def block_gap(v):
        r = torch.relu(cnn.stem(v))
        b = cnn.block
        return torch.relu(b.bn2(b.conv2(torch.relu(b.bn1(b.conv1(r))))) + r).mean((2, 3))

    with torch.enable_grad():
        from ibscope.capture import plan_layers
        from ibscope.capture.hooks import CaptureEngine

        targets, reducers, _, _ = plan_layers(cnn, xi, ["block"])
        with CaptureEngine(cnn, targets, reducers, grad=True) as eng:
            got = jacobian_singular_values(eng.run, xi, chunk=2)["block"]
    for i in range(3):
        j = torch.autograd.functional.jacobian(lambda v: block_gap(v.unsqueeze(0))[0], xi[i]).reshape(4, -1)
        np.testing.assert_allclose(got[i].numpy(), torch.linalg.svdvals(j).numpy(), rtol=1e-4, atol=1e-6)


def test_probe_sources_agree_and_max_samples(tmp_path):
    import h5py as _h5

    x, y = mlp_data(n=30)
    np.savez(tmp_path / "p.npz", x=x.numpy(), y=y.numpy())
    with _h5.File(tmp_path / "p.h5", "w") as f:
        f["x"], f["y"] = x.numpy(), y.numpy()
    torch.save({"x": x, "y": y}, tmp_path / "p.pt")
    (tmp_path / "probe_factory.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def make():\n    x = torch.randn(30, 12, generator=torch.Generator().manual_seed(0))\n"
        "    return TensorDataset(x, (x[:, 0] + 0.5 * x[:, 1] > 0).long())\n")
    sources = [str(tmp_path / "p.npz"), str(tmp_path / "p.h5"), str(tmp_path / "p.pt"),
               f"{tmp_path / 'probe_factory.py'}:make", (x, y)]
    for src in sources:
        pr = load_probe(src, max_samples=10)
        np.testing.assert_array_equal(pr.x.numpy(), x[:10].numpy())
        np.testing.assert_array_equal(pr.y, y[:10].numpy())
        np.testing.assert_array_equal(pr.ids, np.arange(10))
        sub = load_probe(src, max_samples=10, sample_seed=3)
        assert np.all(np.diff(sub.ids) > 0) and len(sub.ids) == 10 and sub.ids.max() < 30
        np.testing.assert_array_equal(sub.x.numpy(), x[sub.ids].numpy())
        np.testing.assert_array_equal(sub.ids, load_probe(src, max_samples=10, sample_seed=3).ids)
    assert not np.array_equal(load_probe((x, y), max_samples=10, sample_seed=4).ids, sub.ids)
    with pytest.raises(DataError, match="holds no input array. Found: y, ids"):
        np.savez(tmp_path / "bad.npz", y=np.zeros(3), ids=np.arange(3))
        load_probe(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "kw.npz", a=np.zeros((3, 2)))  # any other name: a keyword input, a=...
    kw = load_probe(str(tmp_path / "kw.npz"))
    assert list(kw.inputs) == ["a"] and kw.keyword == ["a"] and kw.primary == "a" and kw.n == 3
    with pytest.raises(DataError, match="30 samples but labels have 29"):
        load_probe((x, y[:29]))


def test_resume_skips_done_and_refuses_other_settings(tmp_path, mlp_run):
    mods, x, y, paths, probe = mlp_run
    spec = f"{write_models(tmp_path)}:MLP"
    store = capture(spec, [str(p) for p in paths[:2]], str(probe), ["fc1"], tmp_path / "acts", progress=False)
    shards = sorted((store / "checkpoints").glob("*.h5"))
    stamps = [s.stat().st_mtime_ns for s in shards]
    with pytest.raises(UsageError, match="already exists"):
        capture(spec, [str(p) for p in paths], str(probe), ["fc1"], tmp_path / "acts", progress=False)
    capture(spec, [str(p) for p in paths], str(probe), ["fc1"], tmp_path / "acts", resume=True, progress=False)
    assert [s.stat().st_mtime_ns for s in shards] == stamps  # the two done ones were not rewritten
    assert len(open_store(store).checkpoints) == 3
    with pytest.raises(DataError, match=r"different settings \(.*layers: \['fc1'\] then, \['fc2'\] now\)"):
        capture(spec, [str(p) for p in paths], str(probe), ["fc2"], tmp_path / "acts", resume=True, progress=False)
    with pytest.raises(DataError, match="different probe data"):
        capture(spec, [str(p) for p in paths], str(probe), ["fc1"], tmp_path / "acts", resume=True, max_samples=10,
                progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capture_on_cuda_matches_cpu(tmp_path, mlp_run):
    mods, x, y, paths, probe = mlp_run
    spec = f"{write_models(tmp_path)}:MLP"
    gpu = open_store(capture(spec, [str(p) for p in paths], str(probe), ["fc1", "act"], tmp_path / "gpu", device="cuda:0",
                             jacobian_samples=4, progress=False))
    cpu = open_store(capture(spec, [str(p) for p in paths], str(probe), ["fc1", "act"], tmp_path / "cpu", device="cpu",
                             jacobian_samples=4, progress=False))
    for a, b in zip(gpu.checkpoints, cpu.checkpoints):
        for layer in ("fc1", "act"):
            # different kernels sum in a different order: float32 agreement to ~1e-5
            np.testing.assert_allclose(gpu.activations(a, layer), cpu.activations(b, layer), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(gpu.jacobian(a, layer)[0], cpu.jacobian(b, layer)[0], rtol=1e-4, atol=1e-5)


def test_wrapped_models_are_unwrapped(tmp_path, mlp_run):
    """A factory returning DataParallel(...) or a compiled module captures the plain module:
    layer names and checkpoint keys without 'module.' / '_orig_mod.'."""
    mods, x, y, paths, probe = mlp_run
    (tmp_path / "wrapped.py").write_text(
        "import torch\nimport models\n"
        "def dp():\n    return torch.nn.DataParallel(models.MLP())\n"
        # torch.compile's OptimizedModule keeps the eager module as `_orig_mod`; building a real one
        # costs ~10 s of imports, so this stand-in has the same structure
        "class Compiled(torch.nn.Module):\n"
        "    def __init__(self, m):\n        super().__init__()\n        self._orig_mod = m\n"
        "    def forward(self, x):\n        return self._orig_mod(x)\n"
        "def compiled():\n    return Compiled(torch.nn.DataParallel(models.MLP()))\n")
    ref = open_store(capture(f"{write_models(tmp_path)}:MLP", str(paths[-1]), str(probe), ["fc1"], tmp_path / "ref",
                             progress=False))
    for fn in ("dp", "compiled"):
        st = open_store(capture(f"{tmp_path / 'wrapped.py'}:{fn}", str(paths[-1]), str(probe), ["fc1"], tmp_path / fn,
                                progress=False))
        assert st.layers == ["fc1"]
        np.testing.assert_array_equal(st.activations(0, "fc1"), ref.activations(0, "fc1"))


def test_a_model_file_edited_in_the_same_session_is_imported_again(tmp_path):
    """A notebook that edits its model file and captures again gets the new code (the module
    is cached per content, not per path); an edit that breaks the file is a UsageError and the
    earlier version stays importable."""
    from ibscope.capture.factory import resolve_factory

    f = tmp_path / "net.py"
    f.write_text("import torch.nn as nn\n\ndef build():\n    return nn.Sequential(nn.Linear(3, 4))\n")
    first = resolve_factory(f"{f}:build")()
    assert first[0].out_features == 4
    assert resolve_factory(f"{f}:build")()[0].out_features == 4  # unchanged: same module
    f.write_text("import torch.nn as nn\n\ndef build():\n    return nn.Sequential(nn.Linear(3, 7))\n")
    assert resolve_factory(f"{f}:build")()[0].out_features == 7
    f.write_text("import torch.nn as nn\n\ndef build(:\n")
    with pytest.raises(UsageError, match="Importing .* failed: SyntaxError"):
        resolve_factory(f"{f}:build")
    import sys

    name = next(k for k in sys.modules if k.startswith("ibscope_user_") and k.endswith("net_py"))
    assert sys.modules[name].build()[0].out_features == 7
