"""Per-cell overhead of the information-plane binning workload: ibscope beside a numpy loop.

The workload is the demo's: the 12-10-7-5-4-3-2 tanh network on the 12-bit task (4,096 inputs),
13 checkpoints x 5 hidden layers = 65 cells; each cell is I(X;T) (X = the sample identity) and
I(T;Y) with Shwartz-Ziv & Tishby's binning as their code computes it (IDNNs: edges
linspace(-1, 1, 30) in float32, bins[digitize(v, bins) - 1]). The store is built here (the
network trained at one thread between log-spaced checkpoints; no download, no capture run).

Three ways, same data, same process (and one CLI subprocess per repeat):

  (a) numpy   -- a plain numpy loop over the 65 cells: IDNNs' digitize, unique rows through a void
                 view (np.unique), plug-in H(T), H(T|Y) and I(X;T) = H(X) + H(T) - H(X,T) (nats);
  (b) API     -- one ``ibscope.mutual_information(x, t, "binning", ...)`` call per quantity and
                 cell, arrays read from the store by ``open_store`` (once), as in a notebook;
  (c) CLI     -- ``ibscope estimate STORE -e binning ... --null-permutations 0`` in a subprocess,
                 minus the median of ``ibscope --version`` (process start-up and imports), and
                 the provenance's ``wall_time_s`` (the cells alone).

Each figure is a median of --repeats; ratios are ibscope / numpy (<= 2 is the goal for the API)
and ms per cell. Values are compared: the largest |ibscope - numpy| over all 130 numbers.

  python benchmarks/bench_overhead.py              # builds the store in a temporary folder
  python benchmarks/bench_overhead.py --store DIR  # an existing store (e.g. ibscope-demo/tanh/stores/all)
"""

from __future__ import annotations

import argparse
import math
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EDGES = np.linspace(-1, 1, 30).astype(np.float32)
PARAMS = {"n_bins": 29, "range_min": -1.0, "range_max": 1.0, "outside": "idnns"}
LAYERS = ["hidden1", "hidden2", "hidden3", "hidden4", "hidden5"]


def make_store(path, *, n_checkpoints: int = 13, epochs: int = 1000, seed: int = 0) -> Path:
    """A demo-like store at ``path``: the tanh 12-10-7-5-4-3-2 network trained with full-batch
    Adam, its five hidden layers (and output) at ``n_checkpoints`` log-spaced epochs, inputs
    and labels stored. Deterministic for a seed."""
    import torch

    from ibscope.demo.models import ib_net
    from ibscope.demo.tasks import twelve_bit_task
    from ibscope.store import StoreWriter

    x, y = twelve_bit_task()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = ib_net("tanh")
        opt = torch.optim.Adam(model.parameters(), lr=0.005)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        stops = sorted({0, *np.unique(np.geomspace(1, epochs, n_checkpoints - 1).astype(int)).tolist()})
        while len(stops) < n_checkpoints:  # log spacing repeats small epochs: fill up at the end
            stops.append(stops[-1] + 1)
        names = [*model.hidden_names, "output"]
        with torch.no_grad():
            probe = [getattr(model, n) for n in names]
        w = StoreWriter(path, config={"run": "tanh", "split": "all", "model": "bench_overhead"},
                        sample_ids=np.arange(len(x), dtype=np.int64), labels=y.astype(np.int64),
                        layers={n: {"dims": int(getattr(model, n)[0].out_features)} for n in names},
                        inputs=x, input_shape=(x.shape[1],))
        epoch = 0
        for stop in stops:
            for _ in range(stop - epoch):
                opt.zero_grad()
                loss = torch.nn.functional.nll_loss(torch.log(model(xt).clamp_min(1e-12)), yt)
                loss.backward()
                opt.step()
            epoch = stop
            sha = f"{seed:08x}{stop:056x}"
            with torch.no_grad(), w.checkpoint(epoch=stop, step=None, path=f"epoch{stop}.pt", sha256=sha) as sw:
                h = xt
                for n, seq in zip(names, probe):
                    h = seq(h)
                    sw.append(n, h.numpy())
    finally:
        torch.set_num_threads(threads)
    return Path(path)


def _h_counts(c: np.ndarray) -> float:
    p = c[c > 0] / c.sum()
    return float(-(p * np.log(p)).sum())


def numpy_cell(t: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(I(X;T), I(T;Y)) in nats, X = the sample identity, IDNNs' binning: digitize, unique rows
    through a void view, plug-in entropies from the counts."""
    sym = EDGES[np.digitize(t.reshape(-1), EDGES) - 1].reshape(t.shape)
    rows = np.ascontiguousarray(sym).view(np.dtype((np.void, sym.dtype.itemsize * sym.shape[1]))).reshape(-1)
    _, inv, cnt = np.unique(rows, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    n = len(t)
    h_t = _h_counts(cnt)
    # X = n distinct ids: H(X) = log n and every (x, t) pair is distinct, H(X, T) = log n
    i_xt = math.log(n) + h_t - math.log(n)
    _, ycodes = np.unique(y, return_inverse=True)
    k = int(inv.max()) + 1
    h_ty = _h_counts(np.bincount(ycodes.reshape(-1) * k + inv))
    h_y = _h_counts(np.bincount(ycodes.reshape(-1)))
    return i_xt, h_t + h_y - h_ty


def run_numpy(acts, y):
    return [numpy_cell(t, y) for t in acts]


def run_api(acts, y):
    import ibscope

    ids = np.arange(len(y), dtype=np.int64)
    out = []
    for t in acts:
        out.append((ibscope.mutual_information(ids, t, "binning", **PARAMS).value,
                    ibscope.mutual_information(t, y, "binning", **PARAMS).value))
    return out
