"""Jacobian spectra in bounded memory: the chunked exact path equals building the whole Jacobian
at once (ResNet with BatchNorm and in-place ReLU), peak memory stays within the budget, the
randomized sketch against the exact values, and impossible requests fail before any work."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from ibscope.capture import capture, plan_layers
from ibscope.capture.hooks import CaptureEngine
from ibscope.capture.jacobian import (frozen_parameters, jacobian_singular_values, jacobian_spectra, parse_memory,
                                      parse_method, plan_jacobians)
from ibscope.capture.probe import ModelInput
from ibscope.cli.main import app
from ibscope.errors import UsageError
from ibscope.store import open_store

RESNET_SRC = textwrap.dedent('''
    import torch
    import torch.nn as nn


    class Block(nn.Module):  # torchvision BasicBlock: BatchNorm, one in-place ReLU used twice, out += identity
        def __init__(self, i, o, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(i, o, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(o)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(o, o, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(o)
            self.downsample = (nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))
                               if stride != 1 or i != o else None)

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += identity
            return self.relu(out)


    class SmallResNet(nn.Module):
        def __init__(self, widths=(8, 16), n_out=10):
            super().__init__()
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            self.relu = nn.ReLU(inplace=True)
            i = widths[0]
            for k, o in enumerate(widths):
                setattr(self, f"layer{k + 1}", nn.Sequential(Block(i, o, 1 if k == 0 else 2), Block(o, o, 1)))
                i = o
            self.depth = len(widths)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(i, n_out)
            g = torch.Generator().manual_seed(0)
            for m in self.modules():  # running statistics that are not the identity
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)

        def forward(self, x):
            x = self.relu(self.bn1(self.conv1(x)))
            for k in range(self.depth):
                x = getattr(self, f"layer{k + 1}")(x)
            return self.fc(self.avgpool(x).flatten(1))
''')


@pytest.fixture()
def resnet_mod(tmp_path):
    from ibscope.capture.loading import _import_file

    p = tmp_path / "rn_small.py"
    p.write_text(RESNET_SRC)
    return _import_file(p)


def spectra(net, x, layers, reference=None, **plan_kw):
    """(spectra by plan, plan, whole-Jacobian reference) for ``layers`` of ``net`` at ``x``."""
    targets, reducers, meta, _ = plan_layers(net, x[:2], layers)
    dims = {t.name: meta[t.name]["dims"] for t in targets}
    with frozen_parameters(net), CaptureEngine(net, targets, reducers, grad=True) as eng:
        plan = plan_jacobians(eng.run, ModelInput.of(x[:1]), dims, len(x), **plan_kw)
        got = jacobian_spectra(eng.run, ModelInput.of(x), plan)
    if reference is None:  # False: not needed
        with torch.enable_grad(), CaptureEngine(net, targets, reducers, grad=True) as eng:
            reference = jacobian_singular_values(eng.run, x, chunk=len(x))
    return got, plan, reference


def test_chunked_exact_equals_whole_jacobian_on_a_resnet(resnet_mod):
    torch.manual_seed(0)
    net = resnet_mod.SmallResNet().eval()
    x = torch.randn(3, 3, 16, 16)
    layers = ["layer1.0.relu@0", "layer1", "layer2", "fc"]
    ref = None
    for budget, chunked in (("1M", True), ("256M", False)):
        got, plan, ref = spectra(net, x, layers, budget=budget, reference=ref)
        lp = {p.name: p for p in plan.layers}
        if chunked:  # a few rows per backward pass, one sample at a time
            assert lp["layer2"].rows_per_pass < 16 and lp["layer2"].samples_per_pass == 1
        else:  # whole Jacobians of several samples per vmap
            assert lp["layer2"].rows_per_pass == 16 and lp["layer2"].samples_per_pass == 3
        assert plan.est_peak <= parse_memory(budget)
        for k in layers:
            assert got[k].shape == ref[k].shape == (3, min(plan.d_in, lp[k].d_out))
            np.testing.assert_allclose(got[k].numpy(), ref[k].numpy(), rtol=1e-5, atol=1e-6 * float(ref[k].max()),
                                       err_msg=f"{k} at {budget}")
    # the parameters keep requiring grad afterwards, and the model is unchanged
    assert all(p.requires_grad for p in net.parameters())


def test_capture_stores_the_same_spectra_as_the_whole_jacobian(tmp_path, resnet_mod):
    torch.manual_seed(1)
    net = resnet_mod.SmallResNet().eval()
    torch.save({"epoch": 0, "state_dict": net.state_dict()}, tmp_path / "rn.pt")
    x = torch.randn(10, 3, 16, 16)
    np.savez(tmp_path / "p.npz", x=x.numpy(), y=np.arange(10) % 3)
    st = open_store(capture(f"{tmp_path / 'rn_small.py'}:SmallResNet", str(tmp_path / "rn.pt"), str(tmp_path / "p.npz"),
                            ["layer1", "layer2", "fc"], tmp_path / "acts", jacobian_samples=4, jacobian_memory="2M",
                            progress=False))
    targets, reducers, _, _ = plan_layers(net, x[:2], ["layer1", "layer2", "fc"])
    with torch.enable_grad(), CaptureEngine(net, targets, reducers, grad=True) as eng:
        ref = jacobian_singular_values(eng.run, x[:4])
    for k in ("layer1", "layer2", "fc"):
        sv, rows = st.jacobian(0, k)
        np.testing.assert_array_equal(rows, np.arange(4))
        np.testing.assert_allclose(sv, ref[k].numpy(), rtol=1e-5, atol=1e-6 * float(ref[k].max()))


def test_layers_whose_whole_jacobians_fit_share_one_vmap(resnet_mod, monkeypatch):
    """Whole-Jacobian layers whose Jacobians of all the samples fit the budget together are
    computed in one vmap(jacrev) (one progress tick per vmap); one byte less than that splits the
    group, each layer then with as many samples per vmap as the budget holds; the values are
    those of the whole Jacobian either way."""
    torch.manual_seed(2)
    net = resnet_mod.SmallResNet().eval()
    x = torch.randn(5, 3, 16, 16)
    layers = ["layer1", "layer2", "fc"]
    targets, reducers, meta, _ = plan_layers(net, x[:2], layers)
    dims = {t.name: meta[t.name]["dims"] for t in targets}
    total = sum(dims.values())  # 16 + 16 + 10
    with torch.enable_grad(), CaptureEngine(net, targets, reducers, grad=True) as eng:
        ref = jacobian_singular_values(eng.run, x, chunk=5)

    def run(budget, cap=None):
        ticks = []
        with frozen_parameters(net), CaptureEngine(net, targets, reducers, grad=True) as eng:
            plan = plan_jacobians(eng.run, ModelInput.of(x[:1]), dims, 5, budget=budget, max_samples_per_pass=cap)
            got = jacobian_spectra(eng.run, ModelInput.of(x), plan, ticks.append)
        for k in layers:
            np.testing.assert_allclose(got[k].numpy(), ref[k].numpy(), rtol=1e-5, atol=1e-6 * float(ref[k].max()),
                                       err_msg=f"{k} at {budget}, cap {cap}")
        assert list(got) == layers and sum(ticks) == plan.total_passes == 5 * total
        assert plan.est_peak <= parse_memory(budget)
        return plan, ticks

    plan, ticks = run("256M")
    # the forward's bytes, as measured once, for every plan below (a second measurement can differ
    # by a few storages the allocator reused), so that the budgets at the boundary are exact
    monkeypatch.setattr("ibscope.capture.jacobian.forward_bytes", lambda fn, *args, _a=plan.act_bytes: _a)
    assert {lp.group for lp in plan.layers} == {0} and {lp.samples_per_pass for lp in plan.layers} == {5}
    assert ticks == [5 * total] and plan.per_vmap == 5 * total  # one vmap for all layers and samples
    assert f"up to {5 * total} per vmap" in plan.summary()
    plan, ticks = run("256M", cap=2)  # an explicit cap on the samples per vmap
    assert ticks == [2 * total, 2 * total, total]
    joint = plan.layers[0].est_bytes // 2  # the group's bytes per sample
    assert all(lp.est_bytes == 2 * joint for lp in plan.layers)
    # the module docstring's estimate: the graph (A) once, then per layer its d_out passes (2A
    # each), its Jacobian and the SVD's copy (2 x 4 d_out d_in) and workspace (8 min(d_out, d_in)^2)
    a, d_in = plan.act_bytes, plan.d_in
    assert joint == a + sum(2 * 4 * d * d_in + 8 * min(d, d_in) ** 2 + d * int(2 * a) for d in dims.values())
    plan, ticks = run(5 * joint)  # exactly all five samples of the whole group fit
    assert {lp.group for lp in plan.layers} == {0} and {lp.samples_per_pass for lp in plan.layers} == {5}
    assert ticks == [5 * total]
    plan, ticks = run(5 * joint - 1)  # not all five: no group of all layers; each alone takes all it can
    assert len(plan.units()) >= 2 and all(lp.rows_per_pass == lp.d_out for lp in plan.layers)
    assert len(ticks) == sum(-(-5 // unit[0].samples_per_pass) for unit in plan.units())  # one tick per vmap
    alone = [u[0] for u in plan.units() if len(u) == 1]
    assert alone and all(lp.samples_per_pass * (a + 2 * 4 * lp.d_out * d_in + 8 * min(lp.d_out, d_in) ** 2
                                                + lp.d_out * int(2 * a)) == lp.est_bytes for lp in alone)
    plan, ticks = run(2 * joint, cap=2)  # with a cap of 2 samples per vmap, 2 samples of the group fit
    assert {lp.group for lp in plan.layers} == {0} and ticks == [2 * total, 2 * total, total]


MEMORY_SCRIPT = textwrap.dedent('''
    import sys
    import torch
    sys.path.insert(0, sys.argv[3])
    from rn_small import SmallResNet
    from ibscope.capture import plan_layers
    from ibscope.capture.hooks import CaptureEngine
    from ibscope.capture.jacobian import frozen_parameters, jacobian_singular_values, jacobian_spectra, plan_jacobians
    from ibscope.capture.probe import ModelInput

    import threading, time

    def anon():  # resident anonymous memory (no shared libraries or page cache)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    peak = [0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.002)

    torch.set_num_threads(1)
    mode, budget, m = sys.argv[1], sys.argv[2], int(sys.argv[4]) if len(sys.argv) > 4 else 8
    torch.manual_seed(0)
    net = SmallResNet(widths=(16, 32)).eval()
    x = torch.randn(m, 3, 32, 32)
    targets, reducers, meta, _ = plan_layers(net, x[:2], ["layer1", "layer2", "fc"])
    dims = {t.name: meta[t.name]["dims"] for t in targets}
    with frozen_parameters(net), CaptureEngine(net, targets, reducers, grad=True) as eng:
        plan = plan_jacobians(eng.run, ModelInput.of(x[:1]), dims, m, budget=budget)
        one = plan.__class__(**{**plan.__dict__, "m": 1})
        jacobian_spectra(eng.run, ModelInput.of(x[:1]), one)  # warm up the allocator and kernels
        base = anon()
        t = threading.Thread(target=watch)
        t.start()
        if mode == "chunked":
            jacobian_spectra(eng.run, ModelInput.of(x), plan)
        else:
            with torch.enable_grad():
                jacobian_singular_values(eng.run, x, chunk=m)
        peak[0] = max(peak[0], anon())
        done.set()
        t.join()
    print((peak[0] - base) / 2**20, plan.est_peak / 2**20, len(plan.units()))
''')


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_stays_within_the_budget(tmp_path, resnet_mod):
    """Peak resident anonymous memory above the warmed-up process (sampled every 2 ms), in a fresh
    interpreter: the chunked path within its 32 MiB budget, and within 256 MiB where the three
    layers of 2 samples share one vmap; the whole-Jacobian path (8 samples at once) far above
    32 MiB."""
    (tmp_path / "mem.py").write_text(MEMORY_SCRIPT)

    def peak(mode, budget="32M", m=8):
        out = subprocess.run([sys.executable, str(tmp_path / "mem.py"), mode, budget, str(tmp_path), str(m)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return [float(v) for v in out.stdout.split()]

    chunked, est, _ = peak("chunked")
    whole, _, _ = peak("whole")
    assert est <= 32
    assert chunked <= 32, (chunked, est)
    assert whole > 4 * max(chunked, 8), (whole, chunked)
    joint, est, units = peak("chunked", "256M", m=2)
    assert units == 1 and est <= 256 and joint <= 256, (joint, est, units)


def test_sketch_against_the_exact_values(resnet_mod):
    torch.manual_seed(0)
    # rank <= K: the sketch equals the exact values
    mlp = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 6), nn.Tanh(), nn.Linear(6, 50)).eval()
    x = torch.randn(6, 40)
    exact, _, _ = spectra(mlp, x, ["0", "1", "4"], reference=False, budget="64M")
    sk, plan, _ = spectra(mlp, x, ["0", "1", "4"], reference=False, budget="64M", method="sketch:8")
    assert [lp.method for lp in plan.layers] == ["sketch"] * 3 and sk["4"].shape == (6, 8)
    e4 = exact["4"][:, :8]
    np.testing.assert_allclose(sk["4"].numpy(), e4.numpy(), rtol=0, atol=1e-5 * float(e4.max()))
    assert float(e4[:, 6:].max()) < 1e-5 * float(e4.max())  # rank 6: the last two are zero in both
    # full rank (30, then a ResNet stage's 32): lower bounds; top K/2 within 2 %, all K within 6 %
    net = resnet_mod.SmallResNet(widths=(16, 32)).eval()
    xr = torch.randn(4, 3, 16, 16)
    xr = xr[:2]
    rex, _, _ = spectra(net, xr, ["layer2"], reference=False, budget="64M")
    rsk, _, _ = spectra(net, xr, ["layer2"], reference=False, budget="64M", method="sketch:8")
    for e, s in ((exact["1"][:, :8], sk["1"]), (exact["0"][:, :8], sk["0"]), (rex["layer2"][:, :8], rsk["layer2"])):
        rel = ((e - s) / e).numpy()
        assert (s <= e * (1 + 1e-4) + 1e-6 * e[:, :1]).all()
        assert rel[:, :4].max() < 0.02 and rel.max() < 0.06, rel.max(0)
    # layers no bigger than K + 10 are computed exactly
    small, plan, ref = spectra(net, xr, ["fc"], budget="64M", method="sketch:8")
    assert plan.layers[0].method == "exact" and small["fc"].shape == (2, 10)
    np.testing.assert_allclose(small["fc"].numpy(), ref["fc"].numpy(), rtol=1e-5, atol=1e-7)


def test_impossible_budget_is_an_error_before_any_work(tmp_path, resnet_mod):
    net = resnet_mod.SmallResNet().eval()
    torch.save({"epoch": 0, "state_dict": net.state_dict()}, tmp_path / "rn.pt")
    np.savez(tmp_path / "p.npz", x=np.random.default_rng(0).normal(size=(6, 3, 32, 32)).astype("float32"))
    args = (f"{tmp_path / 'rn_small.py'}:SmallResNet", str(tmp_path / "rn.pt"), str(tmp_path / "p.npz"),
            ["layer1.0.conv1"], tmp_path / "acts")
    with pytest.raises(UsageError) as ei:
        capture(*args, reduce="flatten", jacobian_samples=2, jacobian_memory="8M", progress=False)
    msg = str(ei.value)
    assert "Jacobians of layer 'layer1.0.conv1' need at least" in msg and "8192 x 3072 Jacobian (96.0 MiB)" in msg
    assert "more than the 8.0 MiB budget (--jacobian-memory)" in msg
    hint = ei.value.hint
    assert hint.startswith("Raise the budget: --jacobian-memory ")
    assert "keep the top 64 singular values: --jacobian-method sketch:64 --jacobian-memory " in hint
    assert not (tmp_path / "acts").exists()
    # the sketch it suggests fits the memory it names
    mem = hint.split("sketch:64 --jacobian-memory ")[1].split()[0]
    x = torch.randn(1, 3, 32, 32)
    targets, reducers, meta, _ = plan_layers(net, x, ["layer1.0.conv1"], "flatten")
    with frozen_parameters(net), CaptureEngine(net, targets, reducers, grad=True) as eng:
        plan = plan_jacobians(eng.run, ModelInput.of(x), {"layer1.0.conv1": 8192}, 2, method="sketch:64", budget=mem)
    assert plan.layers[0].method == "sketch" and plan.est_peak <= parse_memory(mem)
    # and a sketch runs within a small budget
    st = open_store(capture(*args, reduce="flatten", jacobian_samples=1, jacobian_memory="16M",
                            jacobian_method="sketch:4", progress=False))
    assert st.jacobian(0, "layer1.0.conv1")[0].shape == (1, 4) and st.config["jacobian_method"] == "sketch:4"


def test_cli_options_progress_and_bad_values(tmp_path, resnet_mod):
    net = resnet_mod.SmallResNet().eval()
    torch.save({"epoch": 0, "state_dict": net.state_dict()}, tmp_path / "rn.pt")
    np.savez(tmp_path / "p.npz", x=np.random.default_rng(0).normal(size=(6, 3, 16, 16)).astype("float32"))
    base = ["capture", "-m", f"{tmp_path / 'rn_small.py'}:SmallResNet", "-c", str(tmp_path / "rn.pt"), "-p",
            str(tmp_path / "p.npz"), "-l", "layer2", "-o", str(tmp_path / "acts"), "--jacobian-samples", "3"]
    for extra, needle in ((["--jacobian-method", "svd"], "must be 'exact' or 'sketch:K'"),
                          (["--jacobian-memory", "12 parsecs"], "expects a size such as 512M"),
                          (["--jacobian-memory", "100K"], "at least 1M")):
        res = CliRunner().invoke(app, base + extra)
        assert res.exit_code == 2 and needle in res.output, res.output
    assert not (tmp_path / "acts").exists()
    res = CliRunner().invoke(app, base + ["--jacobian-memory", "16M"])
    assert res.exit_code == 0, res.output
    # the plan is printed; the progress bars are transient (see test_capture_progress_goes_to_the_reporter)
    assert "Jacobians (exact): 3 sample(s) of 'x' (768 inputs)" in " ".join(res.output.split())
    assert open_store(tmp_path / "acts").jacobian(0, "layer2")[0].shape == (3, 16)


class RecordingReporter:
    """A Reporter that keeps every task's label, total and the steps it was advanced by."""

    silent = False

    def __init__(self):
        self.tasks: list[dict] = []
        self.messages: list[str] = []

    def info(self, msg):
        self.messages.append(msg)

    def warning(self, msg):
        self.messages.append(msg)

    def task(self, label, total=None):
        import contextlib

        rec = {"label": label, "total": total, "done": 0, "notes": [], "open": True}
        self.tasks.append(rec)

        class T:
            def advance(self, n=1, *, note=""):
                rec["done"] += n
                rec["notes"].append(note)

            def update(self, *, completed, total=None, note=""):
                rec["done"] = completed
                rec["total"] = total if total is not None else rec["total"]
                rec["notes"].append(note)

        @contextlib.contextmanager
        def cm():
            try:
                yield T()
            finally:
                rec["open"] = False

        return cm()


def test_capture_progress_goes_to_the_reporter(tmp_path, resnet_mod):
    """Checkpoints, batches and Jacobian passes are tasks of the given reporter, nested, each
    advanced to its total; none is left open; without a reporter the API shows nothing."""
    net = resnet_mod.SmallResNet().eval()
    for e in (0, 1):
        torch.save({"epoch": e, "state_dict": net.state_dict()}, tmp_path / f"rn{e}.pt")
    np.savez(tmp_path / "p.npz", x=np.random.default_rng(0).normal(size=(10, 3, 16, 16)).astype("float32"))
    rep = RecordingReporter()
    capture(f"{tmp_path / 'rn_small.py'}:SmallResNet", str(tmp_path / "rn*.pt"), str(tmp_path / "p.npz"), ["layer2"],
            tmp_path / "acts", batch_size=4, jacobian_samples=2, jacobian_memory="16M", reporter=rep)
    by = {t["label"]: t for t in rep.tasks}
    assert [t["label"] for t in rep.tasks] == ["checkpoints", "batches", "jacobian passes"]
    assert by["checkpoints"]["total"] == 2 and by["checkpoints"]["done"] == 2
    assert by["checkpoints"]["notes"] == ["epoch 0", "epoch 1"]
    assert by["batches"]["total"] == 3 and by["batches"]["done"] == 3  # ceil(10 / 4) per checkpoint, reset each
    assert by["batches"]["notes"] == ["epoch 0", "", "", "", "epoch 1", "", "", ""]  # reset per checkpoint
    passes = by["jacobian passes"]
    assert passes["total"] >= 2 and passes["done"] == passes["total"]
    assert passes["notes"][0] == "epoch 0" and passes["notes"].count("epoch 1") == 1
    assert not any(t["open"] for t in rep.tasks)
    quiet = RecordingReporter()
    capture(f"{tmp_path / 'rn_small.py'}:SmallResNet", str(tmp_path / "rn*.pt"), str(tmp_path / "p.npz"), ["layer2"],
            tmp_path / "acts2", batch_size=4, reporter=quiet, progress=False)
    assert quiet.tasks == []


def test_memory_and_method_parsing():
    assert parse_memory("512M") == 512 << 20 and parse_memory("1.5G") == int(1.5 * (1 << 30))
    assert parse_memory("2GiB") == 2 << 30 and parse_memory(64 << 20) == 64 << 20
    assert (1 << 26) <= parse_memory("auto") <= 1 << 30
    assert parse_method("exact") == ("exact", None) and parse_method("Sketch:32") == ("sketch", 32)
    for bad in ("sketch:0", "sketch", "lanczos"):
        with pytest.raises(UsageError):
            parse_method(bad)


class EmbedsEncoder(nn.Module):
    """forward(inputs_embeds, attention_mask): float token embeddings, padding masked in attention."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1,
                                             enable_nested_tensor=False)

    def forward(self, inputs_embeds, attention_mask):
        return self.encoder(inputs_embeds, src_key_padding_mask=attention_mask == 0)


def test_jacobians_of_keyword_float_inputs_with_a_mask():
    torch.manual_seed(3)
    net = EmbedsEncoder().eval()
    emb = torch.randn(4, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0]])
    inp = ModelInput({"inputs_embeds": emb, "attention_mask": mask}, "inputs_embeds")
    targets, reducers, meta, _ = plan_layers(net, inp, ["encoder.layers.0"], "mean")
    assert reducers["encoder.layers.0"].masked
    for budget in ("1M", "64M"):  # row chunks, then several samples per vmap
        with frozen_parameters(net), CaptureEngine(net, targets, reducers, grad=True) as eng:
            plan = plan_jacobians(eng.run, inp.rows(0, 1), {"encoder.layers.0": 8}, 4, budget=budget)
            got = jacobian_spectra(eng.run, inp, plan)["encoder.layers.0"]
        assert plan.primary == "inputs_embeds" and plan.d_in == 40
        for i in range(4):
            m = mask[i:i + 1]

            def f(v):  # masked mean over the real tokens of sample i, as a function of its embeddings
                h = net.encoder.layers[0](v.reshape(1, 5, 8), src_key_padding_mask=m == 0)
                return (h * m[..., None]).sum(1)[0] / m.sum()

            j = torch.autograd.functional.jacobian(f, emb[i].reshape(-1))
            np.testing.assert_allclose(got[i].numpy(), torch.linalg.svdvals(j).numpy(), rtol=1e-4, atol=1e-6)
