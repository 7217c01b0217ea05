"""Capture throughput and peak memory against a plain forward pass over the same data.

For an MLP and a small CNN (same model, same batch size, CPU):

* ``forward``  - plain ``model(x)`` over the probe set under ``torch.no_grad()`` (the floor);
* ``hooks``    - the same with ibscope's hook engine (copy + reduce), nothing written;
* ``capture_none`` / ``capture_lzf`` - ``ibscope.capture.capture()`` end to end for one
                 checkpoint: build the model, hash and load the checkpoint, dry run, hooks, float32
                 HDF5 shard (uncompressed / lzf+shuffle, the default), fsync, rename;
* ``naive``    - the ad-hoc peer: hooks appending ``output.detach().clone()`` to lists in RAM,
                 ``torch.cat`` and ``np.savez`` at the end (what research repos usually do).

Then the same with a probe set ``--scale`` (10) times larger, to show that capture's extra memory
stays flat (bounded by batch x layer width) while the naive peer's grows with the probe set.
Each (model, size) runs in its own process; every mode is warmed up on one batch first. Times
are medians over
``--repeats`` runs; memory is peak RSS above the RSS before the runs (the probe tensor is
allocated before, so it is not counted), measured with /proc/self/clear_refs and VmHWM.

    python benchmarks/bench_capture.py                 # default: n=2048 MLP, n=512 CNN, x10, 3 repeats
    python benchmarks/bench_capture.py --n-mlp 20000 --n-cnn 4000 --repeats 7
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


def measure(fn, repeats: int):
    """(median seconds, max extra peak MiB) of ``fn()`` over ``repeats`` runs."""
    times, peaks = [], []
    for _ in range(repeats):
        gc.collect()
        base = _rss_kib("VmRSS")
        ok = _reset_peak()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        peaks.append((_rss_kib("VmHWM") - base) / 1024 if ok else float("nan"))
    return statistics.median(times), max(peaks)


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


MODES = ("forward", "hooks", "capture_none", "capture_lzf", "naive")


def worker(kind: str, n: int, repeats: int, tmp: Path) -> dict:
    """All modes of one (model, n) in a fresh process; each warmed up on one batch first."""
    import json

    from ibscope.capture import capture

    make, data, layers = MODELS[kind]
    torch.manual_seed(0)
    model = make().eval()
    ck = tmp / f"{kind}_epoch1.pt"
    x = data(n)
    names = [nm for nm, m in model.named_modules() if isinstance(m, nn.ReLU)] + [layers[1]]
    counter = [0]

    def cap(xx, compression):
        counter[0] += 1
        out = tmp / f"store_{kind}_{n}_{compression}_{counter[0]}"
        capture(f"{Path(__file__).resolve()}:make_{kind}", str(ck), (xx, None), layers, out, batch_size=BATCH,
                device="cpu", store_inputs=False, progress=False, compression=compression)
        return out

    fns = {"forward": lambda xx: plain_forward(model, xx), "hooks": lambda xx: hooks_only(model, xx, layers),
           "capture_none": lambda xx: cap(xx, "none"), "capture_lzf": lambda xx: cap(xx, "lzf"),
           "naive": lambda xx: naive_peer(model, xx, names, tmp / f"naive_{kind}_{n}.npz")}
    row = {"model": kind, "n": n}
    for mode in MODES:
        fns[mode](x[:BATCH])  # warm-up: imports, allocator, first-call costs
        row[f"{mode}_s"], row[f"{mode}_mib"] = measure(lambda: fns[mode](x), repeats)
        if mode.startswith("capture"):
            last = tmp / f"store_{kind}_{n}_{mode[8:]}_{counter[0]}"
            row[f"{mode}_store_mib"] = sum(p.stat().st_size for p in last.rglob("*.h5")) / 2**20
    print(json.dumps(row))
    return row


def run_one(kind: str, n: int, repeats: int, tmp: Path, threads: int) -> dict:
    import json
    import subprocess

    make, _, _ = MODELS[kind]
    torch.manual_seed(0)
    torch.save({"epoch": 1, "state_dict": make().state_dict()}, tmp / f"{kind}_epoch1.pt")
    res = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--worker", kind, str(n), str(repeats),
                          str(tmp)], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-mlp", type=int, default=2048, help="probe samples for the MLP (784-512-256-128-10)")
    ap.add_argument("--n-cnn", type=int, default=512, help="probe samples for the CNN (3x32x32 input)")
    ap.add_argument("--scale", type=int, default=10, help="factor for the large-probe run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads in every measured process "
                    "(1 by default: on a shared machine, spinning OpenMP threads make timings erratic)")
    ap.add_argument("--worker", nargs=4, metavar=("KIND", "N", "REPEATS", "DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        kind, n, repeats, d = a.worker
        torch.set_num_threads(a.threads)
        worker(kind, int(n), int(repeats), Path(d))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for kind, n in (("mlp", a.n_mlp), ("cnn", a.n_cnn)):
            for scale in (1, a.scale):
                rows.append(run_one(kind, n * scale, a.repeats, tmp, a.threads))
                r = rows[-1]
                f = r["forward_s"]
                print(f"{r['model']:4s} n={r['n']:6d} | forward {f * 1e3:7.1f} ms | "
                      + " | ".join(f"{m} {r[m + '_s'] * 1e3:7.1f} ms ({r[m + '_s'] / f:.2f}x)" for m in MODES[1:])
                      + " | extra peak MiB: " + ", ".join(f"{m} {r[m + '_mib']:.1f}" for m in MODES)
                      + f" | store MiB: none {r['capture_none_store_mib']:.1f}, lzf {r['capture_lzf_store_mib']:.1f}",
                      flush=True)
    print(f"\nmedians of {a.repeats} runs, torch {torch.__version__}, {a.threads} thread(s), batch {BATCH}")
    for kind in ("mlp", "cnn"):
        small, big = [r for r in rows if r["model"] == kind]
        for m in ("capture_none", "capture_lzf"):
            print(f"{kind}: {m}/forward {small[m + '_s'] / small['forward_s']:.2f}x (n={small['n']}), "
                  f"{big[m + '_s'] / big['forward_s']:.2f}x (n={big['n']}); extra peak memory at x{a.scale} probe: "
                  f"{small[m + '_mib']:.1f} -> {big[m + '_mib']:.1f} MiB")
        print(f"{kind}: naive RAM peer extra peak memory {small['naive_mib']:.1f} -> {big['naive_mib']:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
