"""Your framework: real Hugging Face Trainer runs (a tiny BERT encoder and a tiny GPT-2 decoder
built from configs) saving checkpoint-N folders, a real Lightning Trainer run with
ModelCheckpoint and CSVLogger, the training callbacks, and snapshots from a plain PyTorch loop,
each captured and compared with a direct forward pass; estimate, plot and check on the stores
written during training. The commands of docs/capture.md "Your framework" are run here."""

from __future__ import annotations

import logging
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from ibscope.capture import capture, snapshot
from ibscope.cli.main import app
from ibscope.errors import UsageError
from ibscope.store import open_store

DOCS = (Path(__file__).resolve().parent.parent / "docs" / "capture.md").read_text()
TOL = dict(rtol=1e-5, atol=1e-6)


def run_cli(*args, code=0):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return res


def doc_command(cmd: str) -> list[str]:
    """A command shown in docs/capture.md (asserted to be there), split into arguments."""
    import shlex

    flat = " ".join(DOCS.replace("\\\n", " ").split())
    assert " ".join(cmd.split()) in flat, f"not in docs/capture.md: {cmd}"
    return shlex.split(cmd)[1:]


# ----------------------------------------------------------------------------- Hugging Face
@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    """Two real Trainer runs of 4 steps each, checkpoints every 2 steps; the BERT run also captures
    with TrainerCapture every 2 steps."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, Trainer,
                              TrainingArguments)

    from ibscope.callbacks import TrainerCapture

    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    ids = torch.randint(1, 60, (48, 10))
    y = (ids[:, 0] > 30).long()
    np.savez(root / "tokens.npz", x=ids.numpy(), y=y.numpy())

    class DS(torch.utils.data.Dataset):
        def __init__(self, lm):
            self.lm = lm

        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i] if self.lm else y[i]}

    def train(model, out, lm, callbacks=()):
        args = TrainingArguments(str(out), per_device_train_batch_size=12, max_steps=4, save_steps=2, logging_steps=1,
                                 save_strategy="steps", learning_rate=5e-3, report_to=[], use_cpu=True,
                                 disable_tqdm=True, seed=0)
        Trainer(model=model, args=args, train_dataset=DS(lm), callbacks=list(callbacks)).train()

    bert = BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    max_position_embeddings=16, num_labels=2))
    cb = TrainerCapture(str(root / "tokens.npz"), root / "live_bert", ["bert.encoder.layer.*", "classifier"],
                        reduce={"bert.encoder.layer.*": "cls"}, every_n_steps=2)  # steps only (the default)
    train(bert, root / "bert", lm=False, callbacks=[cb])
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                     bos_token_id=0, eos_token_id=0))
    train(gpt, root / "gpt", lm=True)
    return root


@pytest.mark.slow
def test_hf_trainer_folders_encoder(hf_runs):
    from transformers import BertForSequenceClassification

    root = hf_runs
    args = doc_command("ibscope capture --model hf -c out/ -p tokens.npz -l 'bert.encoder.layer.*' "
                       "-r 'bert.encoder.layer.*=cls' -l classifier -o acts")
    args = [str(root / "bert") if a == "out/" else str(root / a) if a in ("tokens.npz", "acts") else a for a in args]
    run_cli(*args)
    st = open_store(root / "acts")
    assert [(c.step, c.epoch_exact, c.step_source) for c in st.checkpoints] == [(2, 0.5, "trainer_state"),
                                                                               (4, 1.0, "trainer_state")]
    assert "loss" in st.checkpoints[1].metrics  # from log_history
    x = torch.from_numpy(np.load(root / "tokens.npz")["x"])
    live = open_store(root / "live_bert")
    assert [(c.step, c.epoch_exact, c.step_source) for c in live.checkpoints] == [(2, 0.5, "snapshot"), (4, 1.0, "snapshot")]
    for i, step in enumerate((2, 4)):
        ref = BertForSequenceClassification.from_pretrained(str(root / f"bert/checkpoint-{step}"),
                                                            local_files_only=True).eval()
        with torch.no_grad():
            out = ref(x, output_hidden_states=True)
        np.testing.assert_allclose(st.activations(i, "classifier"), out.logits.numpy(), **TOL)
        np.testing.assert_allclose(st.activations(i, "bert.encoder.layer.1"), out.hidden_states[2][:, 0].numpy(), **TOL)
        # captured during training (TrainerCapture) == captured afterwards from the saved folder,
        # metrics included: the loss logged at that step, not one logging period earlier
        assert live.checkpoints[i].metrics["loss"] == st.checkpoints[i].metrics["loss"]
        for layer in st.layers:
            np.testing.assert_allclose(live.activations(i, layer), st.activations(i, layer), **TOL)


@pytest.mark.slow
def test_hf_decoder_tied_weights_sharded_and_bin(hf_runs, tmp_path):
    from transformers import GPT2LMHeadModel

    root = hf_runs
    x = torch.from_numpy(np.load(root / "tokens.npz")["x"])
    store = capture("hf", str(root / "gpt"), str(root / "tokens.npz"), ["transformer.h.*", "lm_head"],
                    tmp_path / "acts", reduce="last", progress=False)
    st = open_store(store)
    assert [c.step for c in st.checkpoints] == [2, 4]
    ref = GPT2LMHeadModel.from_pretrained(str(root / "gpt/checkpoint-4"), local_files_only=True).eval()
    with torch.no_grad():
        logits = ref(x).logits[:, -1]
    np.testing.assert_allclose(st.activations(1, "lm_head"), logits.numpy(), **TOL)  # lm_head tied to wte, stored once
    # the same weights as shards with an index, and as pytorch_model.bin: same values, via --model hf:DIR
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save({k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}, bin_dir / "pytorch_model.bin")
    for d in ("sharded", "bin"):
        s2 = open_store(capture(f"hf:{tmp_path / d}", str(tmp_path / d), str(root / "tokens.npz"), ["lm_head"],
                                tmp_path / f"acts_{d}", reduce="last", progress=False))
        np.testing.assert_allclose(s2.activations(0, "lm_head"), logits.numpy(), **TOL)


def test_hf_without_transformers_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(UsageError) as ei:
        capture("hf", str(tmp_path), (torch.zeros(2, 3), None), ["x"], tmp_path / "acts", progress=False)
    assert 'pip install "ibscope[hf]"' in ei.value.hint
    res = run_cli("capture", "-m", "hf", "-c", str(tmp_path), "-p", "p.npz", "-l", "x", "-o", str(tmp_path / "a"), code=2)
    assert 'pip install "ibscope[hf]"' in res.output


# ----------------------------------------------------------------------------- Lightning
LIT = textwrap.dedent('''
    import torch, torch.nn as nn, lightning as L


    def net():
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, b, _):
            loss = nn.functional.cross_entropy(self(b[0]), b[1])
            self.log("train_loss", loss)
            return loss

        def validation_step(self, b, _):
            self.log("val_acc", (self(b[0]).argmax(1) == b[1]).float().mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), 1e-2)
''')


@pytest.fixture(scope="module")
def lit_run(tmp_path_factory):
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from ibscope.callbacks import LightningCapture

    root = tmp_path_factory.mktemp("lit")
    (root / "lit.py").write_text(LIT)
    sys.path.insert(0, str(root))
    try:
        import lit
    finally:
        sys.path.remove(str(root))
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    y = (x[:, 0] > 0).long()
    np.savez(root / "probe.npz", x=x.numpy(), y=y.numpy())
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    ck = ModelCheckpoint(every_n_epochs=1, save_top_k=-1, filename="{epoch}-{step}-{val_acc:.3f}")
    live = LightningCapture(str(root / "probe.npz"), root / "live", ["0", "2"], module="net")
    L.Trainer(max_epochs=3, callbacks=[ck, live], logger=CSVLogger(str(root), name="logs"), log_every_n_steps=1,
              enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
              default_root_dir=str(root)).fit(lit.Lit(), dl, dl)
    return root


@pytest.mark.slow
def test_lightning_checkpoints_numbers_metrics_and_values(lit_run):
    root = lit_run
    os.chdir(root)
    run_cli(*doc_command("ibscope capture -m lit.py:net -c 'logs/version_0/checkpoints/*.ckpt' -p probe.npz "
                         "-l 1 -l 2 -o acts_lit"))
    st = open_store(root / "acts_lit")
    assert [(c.epoch, c.step, c.epoch_source) for c in st.checkpoints] == [(0, 4, "lightning"), (1, 8, "lightning"),
                                                                          (2, 12, "lightning")]
    csv_rows = [r for r in (root / "logs/version_0/metrics.csv").read_text().splitlines()[1:] if r]
    assert csv_rows and all("val_acc" in c.metrics and "train_loss" in c.metrics for c in st.checkpoints)
    live = open_store(root / "live")
    assert [(c.epoch, c.step) for c in live.checkpoints] == [(0, 4), (1, 8), (2, 12)]
    x = torch.from_numpy(np.load(root / "probe.npz")["x"])
    for i, c in enumerate(st.checkpoints):
        sd = torch.load(c.path, weights_only=True)["state_dict"]
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        m.load_state_dict({k[len("net."):]: v for k, v in sd.items()})
        with torch.no_grad():
            np.testing.assert_allclose(st.activations(i, "2"), m(x).numpy(), **TOL)
            np.testing.assert_allclose(live.activations(i, "2"), m(x).numpy(), **TOL)  # the callback saw the same weights
        assert live.checkpoints[i].metrics["val_acc"] == pytest.approx(c.metrics["val_acc"])
    # metrics keep their units: an accuracy is a ratio, a loss a loss, never converted to bits
    run_cli("estimate", root / "acts_lit", "-o", root / "r.csv", "-e", "effective-rank", "-q")
    from ibscope.results import read_results

    units = {r["quantity"]: r["unit"] for r in read_results(root / "r.csv").rows if r["estimator"] == "metrics"}
    assert units == {"val_acc": "ratio", "train_loss": "loss"}


def test_logged_loss_is_never_converted(tmp_path):
    """repro_07 (b): a checkpoint's loss of 0.5945 is drawn and reported as 0.5945, unit loss."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 4))
    for e, loss in [(0, 0.5945), (1, 0.2802)]:
        torch.save({"epoch": e, "state_dict": m.state_dict(), "loss": loss}, tmp_path / f"plain_e{e}.pt")
    (tmp_path / "m.py").write_text("import torch.nn as nn\ndef net():\n    return nn.Sequential(nn.Linear(8, 4))\n")
    store = capture(f"{tmp_path}/m.py:net", str(tmp_path / "plain_e*.pt"), (torch.randn(32, 8), None), ["0"],
                    tmp_path / "acts", progress=False)
    run_cli("estimate", store, "-o", tmp_path / "r.csv", "-e", "effective-rank", "-q")
    run_cli("report", tmp_path / "r.csv", "-o", tmp_path / "r.html", "-q")
    html = (tmp_path / "r.html").read_text()
    assert '<td class="l">loss [loss]</td><td>0.595</td><td>0.280</td>' in html and "0.858" not in html
    from ibscope.plot import figures

    (job,) = [j for j in figures(str(tmp_path / "r.csv"), kinds=["metrics"])]
    fig = job.make()
    (line,) = [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "metric:loss"]
    np.testing.assert_allclose(line.get_ydata(), [0.5945, 0.2802])
    assert fig.axes[0].get_ylabel() == "loss (as logged)"


# ----------------------------------------------------------------------------- plain PyTorch
@pytest.mark.slow
def test_snapshot_in_a_plain_loop_then_estimate_plot_check_ood(tmp_path, caplog):
    os.chdir(tmp_path)
    torch.manual_seed(0)
    x = torch.randn(200, 8)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    np.savez("probe.npz", x=x.numpy(), y=y.numpy())
    np.savez("probe_ood.npz", x=(0.05 * torch.randn(200, 8)).numpy(), y=y.numpy())  # near the centre: scores low
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    step = 0
    for epoch in range(4):
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
        acc = float((model(x).argmax(1) == y).float().mean())
        assert model.training
        snapshot(model, "probe.npz", "acts", layers=["0", "1", "2"], epoch=epoch, step=step, metrics={"accuracy": acc})
        assert model.training  # its mode is restored
        for p, out in (("probe.npz", "acts_test"), ("probe_ood.npz", "acts_ood")):
            snapshot(model, p, out, layers=["1"], epoch=epoch, step=step, split=out)
    # a restarted run re-snapshotting a point it already has: skipped
    assert snapshot(model, "probe.npz", "acts", layers=["0", "1", "2"], epoch=3, step=20) is None
    st = open_store("acts")
    assert [(c.epoch, c.step, c.epoch_source) for c in st.checkpoints] == [(0, 5, "snapshot"), (1, 10, "snapshot"),
                                                                          (2, 15, "snapshot"), (3, 20, "snapshot")]
    with torch.no_grad():
        np.testing.assert_allclose(st.activations(3, "2"), model(x).numpy(), **TOL)
    # estimate, plot and check read it unchanged
    run_cli("estimate", "acts", "-o", "r.csv", "-e", "binning", "-e", "effective-rank", "-q")
    run_cli("plot", "r.csv", "-q")
    assert list(Path("r_plots").glob("*.png"))
    run_cli("check", "r.csv", "--baseline", "base.csv", "--update-baseline")
    run_cli("check", "r.csv", "--baseline", "base.csv")
    # ood names checkpoints by epoch and step, and says each warning once
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        res = run_cli("ood", "--fit", "acts_test", "--test", "acts_test", "--ood", "near=acts_ood", "--layer", "1",
                      "-d", "mahalanobis", "--checkpoint", "all", "--bootstrap", "0", "--no-figures", "-o", "ood_out")
    assert "epoch 3, step 20" in res.output and "checkpoint 3" not in res.output
    warns = [r.getMessage() for r in caplog.records if "AUROC" in r.getMessage()]
    assert len(warns) == 4 and len(set(warns)) == 4 and "at epoch 3, step 20: AUROC" in warns[-1]
    assert "< 0.5" not in res.output  # not printed a second time by the command


def test_docs_have_a_your_framework_section():
    sec = DOCS[DOCS.index("## Your framework"):]
    for name in ("Plain PyTorch", "Lightning", "Hugging Face", "timm"):
        assert name in sec
    assert "ibscope.capture.snapshot" in sec and "LightningCapture" in sec and "TrainerCapture" in sec
