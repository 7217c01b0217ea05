"""Shared helpers of the capture tests: tiny models written to a user-style .py file, really
trained for a few steps, with real checkpoint files on disk."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch

MODELS_SRC = textwrap.dedent('''
    import time
    import torch
    import torch.nn as nn


    class MLP(nn.Module):
        def __init__(self, d_in=12, hidden=10, n_out=2):
            super().__init__()
            self.fc1 = nn.Linear(d_in, hidden)
            self.act = nn.Tanh()
            self.fc2 = nn.Linear(hidden, n_out)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))


    class SlowMLP(MLP):
        """Sleeps in forward so that a subprocess can be killed mid-capture."""

        def forward(self, x):
            time.sleep(0.04)
            return super().forward(x)


    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(c)
            self.relu = nn.ReLU(inplace=True)      # used twice per forward
            self.conv2 = nn.Conv2d(c, c, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(c)

        def forward(self, x):
            identity = x
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += identity                        # rewrites bn2's output in place
            return self.relu(out)


    class CNN(nn.Module):
        def __init__(self, c=4, n_out=3):
            super().__init__()
            self.stem = nn.Conv2d(1, c, 3, padding=1)
            self.relu = nn.ReLU(inplace=True)      # rewrites stem's output in place
            self.block = Block(c)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(c, n_out)

        def forward(self, x):
            x = self.relu(self.stem(x))
            x = self.block(x)
            return self.fc(self.pool(x).flatten(1))


    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 5, batch_first=True)
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            out, (h, c) = self.lstm(x)
            return self.head(out[:, -1])


    class DictEnc(nn.Module):
        def forward(self, x):
            return {"hidden": x * 2.0, "pooled": x.sum(1, keepdim=True)}


    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = DictEnc()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.enc(x)["hidden"])


    class Scaled(nn.Module):
        """fc output times `scale`: float16 overflow (1e6) or inf (float('inf'))."""

        def __init__(self, scale=1.0):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.big = nn.Identity()
            self.scale = scale

        def forward(self, x):
            return self.big(self.fc(x) * self.scale)


    def make_mlp(hidden=10):
        return MLP(hidden=hidden)
''')


def write_models(tmp_path: Path) -> Path:
    p = Path(tmp_path) / "models.py"
    if not p.exists():
        p.write_text(MODELS_SRC)
    return p


def load_models(tmp_path: Path):
    """The models module, imported the way ibscope imports a user's file (same module object)."""
    from ibscope.capture.loading import _import_file

    return _import_file(write_models(tmp_path))


def mlp_data(n=64, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return x, y


def train_checkpoints(model, x, y, out_dir: Path, epochs=(0, 1, 2), steps=5, lr=0.1, name="epoch_{:03d}.pt",
                      fmt=None):
    """Train ``model`` with SGD for ``steps`` steps between checkpoints; save the canonical dict
    ``{"epoch", "state_dict", "accuracy", "loss"}`` (or ``fmt(model, epoch, acc, loss)``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    paths = []
    for e in epochs:
        if e > 0:
            model.train()
            for _ in range(steps):
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            logits = model(x)
            loss = float(loss_fn(logits, y))
            acc = float((logits.argmax(1) == y).float().mean())
        p = out_dir / name.format(e)
        obj = fmt(model, e, acc, loss) if fmt else {"epoch": e, "state_dict": model.state_dict(), "accuracy": acc, "loss": loss}
        torch.save(obj, p)
        paths.append(p)
    return paths


def save_probe(path: Path, x, y=None) -> Path:
    arrs = {"x": np.asarray(x)}
    if y is not None:
        arrs["y"] = np.asarray(y)
    np.savez(path, **arrs)
    return Path(path)


TINY_TANH_SRC = '''
import torch
from torch import nn

def make():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 2))
'''


def tiny_tanh_run(d: Path, n: int, module_name: str) -> Path:
    """Write ``d/tiny.py`` (a 4-6-3-2 tanh net, factory ``make``), train it for a few Adam steps
    on ``n`` samples, save checkpoints ``d/ck/e{0,1,2}.pt`` (with accuracy/loss) and
    ``d/probe.npz``. Returns ``d``."""
    import importlib.util

    (d / "tiny.py").write_text(TINY_TANH_SRC)
    spec = importlib.util.spec_from_file_location(module_name, d / "tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = ((x[:, 0] + x[:, 1]) > 0).long()
    np.savez(d / "probe.npz", x=x.numpy(), y=y.numpy())
    torch.manual_seed(0)
    net = mod.make()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    (d / "ck").mkdir()
    for epoch in range(3):
        if epoch:
            for _ in range(5):
                loss = torch.nn.functional.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            out = net(x)
            acc = float((out.argmax(1) == y).float().mean())
            loss = float(torch.nn.functional.cross_entropy(out, y))
        torch.save({"epoch": epoch, "state_dict": net.state_dict(), "accuracy": acc, "loss": loss},
                   d / "ck" / f"e{epoch}.pt")
    return d


def synthetic_store(path: Path, n_ck=6, n=200, seed=0) -> Path:
    """A real store written by StoreWriter (no model needed): n_ck checkpoints x 3 tanh layers of
    ``n`` samples, with labels and inputs."""
    from ibscope.store import StoreWriter

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    dims = {"fc1": 6, "fc2": 4, "out": 2}
    w = StoreWriter(path, config={"run": "r", "split": "probe", "model": "synthetic"}, sample_ids=np.arange(n),
                    labels=y, layers={k: {"dims": v} for k, v in dims.items()}, inputs=x, compression="none")
    for e in range(n_ck):
        with w.checkpoint(epoch=e, step=None, path=f"ck{e}.pt", sha256=f"{e:064x}",
                          metrics={"accuracy": 0.5 + e / 100}) as sh:
            h = x
            for k, dk in dims.items():
                m = rng.normal(size=(h.shape[1], dk)).astype(np.float32) * (1 + e / 3)
                h = np.tanh(h @ m).astype(np.float32)
                sh.append(k, h)
    return path
