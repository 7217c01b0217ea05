"""Capture throughput and peak memory against a plain forward pass over the same data.

For an MLP and a small CNN (same model, same batch size, CPU), in one run:

* ``forward``  - plain ``model(x)`` over the probe set under ``torch.no_grad()`` (the floor);
* ``hooks``    - the same with ibscope's hook engine (copy + reduce), nothing written;
* ``default``  - ``ibscope.capture.capture()`` end to end for one checkpoint with its default
                 settings: build the model, hash and load the checkpoint, dry run, hooks, writer
                 thread, float32 HDF5 shard, fsync, rename;
* ``none`` / ``lzf`` / ``gzip`` - the same with each ``compression`` (``default`` is one of them:
                 the figures show why);
* ``naive``    - the ad-hoc peer: hooks appending ``output.detach().clone()`` to lists in RAM,
                 ``torch.cat`` and ``np.savez`` at the end (what research repos usually do).

Then ``forward``, ``default`` and ``naive`` again with a probe set ``--scale`` (10) times
larger, to show that capture's extra memory stays flat (bounded by the writer queue and one
HDF5 chunk per layer) while the naive peer's grows with the probe set.

Each (model, size) runs in its own process; every mode is warmed up on one batch first. Times
are medians over ``--repeats`` runs. Besides wall time the benchmark reports CPU seconds of the
calling thread (``main cpu``: the forward path; on a machine with a free core this is what the
wall time approaches) and of the whole process (``total cpu``: forward path plus writer thread),
because on a loaded machine wall time mostly measures the other processes. Memory is peak RSS
above the RSS before the run (the probe tensor is allocated before, so it is not counted),
measured with /proc/self/clear_refs and VmHWM.

    python benchmarks/bench_capture.py                 # default: n=10000 MLP, n=2000 CNN, x10, 3 repeats
    python benchmarks/bench_capture.py --n-mlp 2000 --n-cnn 500 --scale 4 --repeats 3   # quicker
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

BATCH = 256


def make_mlp():
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def make_cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(16, 32, 3, padding=1, stride=2),
                         nn.ReLU(inplace=True), nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


MODELS = {
    "mlp": (make_mlp, lambda n: torch.randn(n, 784), ["type:ReLU", "6"]),
    "cnn": (make_cnn, lambda n: torch.randn(n, 3, 32, 32), ["type:ReLU", "8"]),
}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(fn, repeats: int) -> dict:
    """Medians over ``repeats`` runs of ``fn()``: wall seconds, CPU seconds of this thread and of
    the process; and the largest extra peak RSS (MiB)."""
    wall, main, total, peaks = [], [], [], []
    for _ in range(repeats):
        gc.collect()
        base = _rss_kib("VmRSS")
        ok = _reset_peak()
        c0, p0, t0 = time.thread_time(), time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        main.append(time.thread_time() - c0)
        total.append(time.process_time() - p0)
        peaks.append((_rss_kib("VmHWM") - base) / 1024 if ok else float("nan"))
    med = statistics.median
    return {"s": med(wall), "main_cpu": med(main), "cpu": med(total), "mib": max(peaks)}


def plain_forward(model, x):
    with torch.no_grad():
        for i in range(0, x.shape[0], BATCH):
            model(x[i:i + BATCH])


def hooks_only(model, x, layers):
    from ibscope.capture import plan_layers
    from ibscope.capture.hooks import CaptureEngine

    targets, reducers, _, _ = plan_layers(model, x[:8], layers)
    with torch.no_grad(), CaptureEngine(model, targets, reducers) as eng:
        for i in range(0, x.shape[0], BATCH):
            for v in eng.run(x[i:i + BATCH]).values():
                v.numpy()


def naive_peer(model, x, names, out: Path):
    mods = dict(model.named_modules())
    acts = {n: [] for n in names}
    hs = [mods[n].register_forward_hook(lambda m, a, o, n=n: acts[n].append(
        (o.mean((2, 3)) if o.ndim == 4 else o).detach().clone())) for n in names]
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], BATCH):
                model(x[i:i + BATCH])
        np.savez(out, **{n.replace(".", "_"): torch.cat(v).numpy() for n, v in acts.items()})
    finally:
        for h in hs:
            h.remove()


MODES = ("forward", "hooks", "default", "none", "lzf", "gzip", "naive")
BIG_MODES = ("forward", "default", "naive")


def worker(kind: str, n: int, repeats: int, tmp: Path, modes: tuple) -> dict:
    """The given modes of one (model, n) in a fresh process; each warmed up on one batch first."""
    import json

    from ibscope.capture import capture

    make, data, layers = MODELS[kind]
    torch.manual_seed(0)
    model = make().eval()
    ck = tmp / f"{kind}_epoch1.pt"
    x = data(n)
    names = [nm for nm, m in model.named_modules() if isinstance(m, nn.ReLU)] + [layers[1]]
    counter = [0]
    last: dict[str, Path] = {}

    def cap(xx, compression, mode):
        counter[0] += 1
        out = last[mode] = tmp / f"store_{kind}_{n}_{mode}_{counter[0]}"
        opts = {} if compression is None else {"compression": compression}
        capture(f"{Path(__file__).resolve()}:make_{kind}", str(ck), (xx, None), layers, out, batch_size=BATCH,
                device="cpu", store_inputs=False, progress=False, **opts)

    fns = {"forward": lambda xx: plain_forward(model, xx), "hooks": lambda xx: hooks_only(model, xx, layers),
           "default": lambda xx: cap(xx, None, "default"), "none": lambda xx: cap(xx, "none", "none"),
           "lzf": lambda xx: cap(xx, "lzf", "lzf"), "gzip": lambda xx: cap(xx, "gzip", "gzip"),
           "naive": lambda xx: naive_peer(model, xx, names, tmp / f"naive_{kind}_{n}.npz")}
    row = {"model": kind, "n": n}
    for mode in modes:
        fns[mode](x[:BATCH])  # warm-up: imports, allocator, first-call costs
        for k, v in measure(lambda: fns[mode](x), repeats).items():
            row[f"{mode}_{k}"] = v
        if mode in last:
            row[f"{mode}_store_mib"] = sum(p.stat().st_size for p in last[mode].rglob("*.h5")) / 2**20
    print(json.dumps(row))
    return row


def run_one(kind: str, n: int, repeats: int, tmp: Path, threads: int, modes: tuple) -> dict:
    import json
    import subprocess

    make, _, _ = MODELS[kind]
    torch.manual_seed(0)
    torch.save({"epoch": 1, "state_dict": make().state_dict()}, tmp / f"{kind}_epoch1.pt")
    res = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--worker", kind, str(n), str(repeats),
                          str(tmp), ",".join(modes)], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _line(r: dict, modes: tuple) -> str:
    f, fc = r["forward_s"], r["forward_main_cpu"]
    parts = []
    for m in modes:
        store = f", {r[m + '_store_mib']:.1f} MiB file" if m + "_store_mib" in r else ""
        parts.append(f"  {m:8s} {r[m + '_s'] * 1e3:8.1f} ms {r[m + '_s'] / f:5.2f}x | main cpu {r[m + '_main_cpu'] * 1e3:7.1f} ms "
                     f"{r[m + '_main_cpu'] / fc:5.2f}x | total cpu {r[m + '_cpu'] * 1e3:7.1f} ms {r[m + '_cpu'] / fc:5.2f}x"
                     f" | extra peak {r[m + '_mib']:6.1f} MiB{store}")
    return f"{r['model']} n={r['n']}: wall ms, wall/forward | CPU ms of the calling thread, /forward's | " \
           f"CPU ms of the process, /forward's | memory\n" + "\n".join(parts)


def main(argv=None) -> int:
    import os

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-mlp", type=int, default=10000, help="probe samples for the MLP (784-512-256-128-10)")
    ap.add_argument("--n-cnn", type=int, default=2000, help="probe samples for the CNN (3x32x32 input)")
    ap.add_argument("--scale", type=int, default=10, help="factor for the large-probe run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads in every measured process "
                    "(1 by default: on a shared machine, spinning OpenMP threads make timings erratic)")
    ap.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    ap.add_argument("--worker", nargs=5, metavar=("KIND", "N", "REPEATS", "DIR", "MODES"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        kind, n, repeats, d, modes = a.worker
        torch.set_num_threads(a.threads)
        worker(kind, int(n), int(repeats), Path(d), tuple(modes.split(",")))
        return 0
    from ibscope.capture import capture
    import inspect

    default = inspect.signature(capture).parameters["compression"].default
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for kind in a.models.split(","):
            n = a.n_mlp if kind == "mlp" else a.n_cnn
            for scale, modes in ((1, MODES), (a.scale, BIG_MODES)):
                r = rows[(kind, scale)] = run_one(kind, n * scale, a.repeats, tmp, a.threads, modes)
                print(_line(r, modes), flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nmedians of {a.repeats} runs, torch {torch.__version__}, {a.threads} torch thread(s), batch {BATCH}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f} at the end; default compression: {default}")
    for kind in a.models.split(","):
        small, big = rows[(kind, 1)], rows[(kind, a.scale)]
        print(f"{kind}: default/forward wall {small['default_s'] / small['forward_s']:.2f}x (n={small['n']}), "
              f"{big['default_s'] / big['forward_s']:.2f}x (n={big['n']}); main-thread cpu "
              f"{small['default_main_cpu'] / small['forward_main_cpu']:.2f}x, "
              f"{big['default_main_cpu'] / big['forward_main_cpu']:.2f}x; naive/forward wall "
              f"{small['naive_s'] / small['forward_s']:.2f}x")
        print(f"{kind}: extra peak memory n={small['n']} -> n={big['n']}: default {small['default_mib']:.1f} -> "
              f"{big['default_mib']:.1f} MiB, naive {small['naive_mib']:.1f} -> {big['naive_mib']:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
