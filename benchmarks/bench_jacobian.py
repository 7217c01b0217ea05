"""Jacobian spectra of a ResNet-18 on CPU: wall time and peak memory of ``ibscope capture
--jacobian-samples``, end to end, as a user runs it.

The model is torchvision's ResNet-18 written out (BasicBlock with BatchNorm, one in-place ReLU
used twice per block, ``out += identity``; torchvision itself is not needed), 10 classes,
3x32x32 inputs. The capture stores ``layer1``-``layer4`` (gap: 64, 128, 256, 512 dims) and
``fc`` (10), and the singular values of each layer's Jacobian (d_out x 3072) for the first
``--samples`` probe rows. Each configuration runs as ``ibscope capture`` in a fresh process;
peak memory is that process's peak RSS (``ru_maxrss`` of the child, everything included: torch,
the model, the probe, the store); CPU time (user + system) is shown beside the wall time, since
wall time on a shared machine depends on its load. ``--reference`` also runs the unbounded whole-Jacobian
computation (what ``capture`` did before the memory budget: all rows of 16 samples in one
``vmap``), for ``--reference-samples`` samples only (it grows by about 0.55 GB per sample).

    python benchmarks/bench_jacobian.py                      # 16 samples, exact, default budget (auto)
    python benchmarks/bench_jacobian.py --memory 512M --method sketch:64 --samples 16
    python benchmarks/bench_jacobian.py --reference --reference-samples 2
    python benchmarks/bench_jacobian.py --device cuda        # on a GPU: peak = torch.cuda.max_memory_allocated

``--compare`` times, in this process and side by side (alternating, ``--repeats`` times), the
Jacobian spectra of one checkpoint as computed three ways: before the memory budget (56199b2^:
``jacobian_singular_values``, one ``vmap(jacrev)`` over all layers, 16 samples per vmap); one
``vmap(jacrev)`` per layer and 16 samples (the planned path from 56199b2 until whole-Jacobian
layers were grouped); and ``ibscope capture``'s planned path now (``plan_jacobians`` once, then
``jacobian_spectra`` per checkpoint, as ``store_jacobians`` runs it). It prints the medians, their
ratios and the largest relative difference of the values. The default model is the demo's
12-10-7-5-4-3-2 tanh network (layers hidden1-hidden5 and output, as ``ibscope demo`` captures
them) at 128 samples; ``--compare-model resnet18`` uses the ResNet-18 above (slow: about 8 s CPU
per sample and way).

    python benchmarks/bench_jacobian.py --compare                              # demo net, 128 samples, 7 repeats
    python benchmarks/bench_jacobian.py --compare --compare-model resnet18 --samples 2 --repeats 3
    python benchmarks/bench_jacobian.py --compare --threads 1 --repeats 15  # steadier on a busy machine
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESNET18 = '''
import torch.nn as nn


class BasicBlock(nn.Module):
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


class ResNet18(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c = 64
        for k, o in enumerate((64, 128, 256, 512)):
            setattr(self, f"layer{k + 1}", nn.Sequential(BasicBlock(c, o, 1 if k == 0 else 2), BasicBlock(o, o, 1)))
            c = o
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))
'''

LAYERS = ["layer1", "layer2", "layer3", "layer4", "fc"]

REFERENCE = '''
import json, resource, sys, time
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from resnet18 import ResNet18
from ibscope.capture import plan_layers
from ibscope.capture.hooks import CaptureEngine
from ibscope.capture.jacobian import jacobian_singular_values
net = ResNet18()
net.load_state_dict(torch.load(sys.argv[1] + "/rn18.pt", weights_only=True)["state_dict"])
net.eval()
x = torch.from_numpy(np.load(sys.argv[1] + "/probe.npz")["x"])[: int(sys.argv[2])]
targets, reducers, _, _ = plan_layers(net, x[:2], %r)
t = time.time()
with torch.enable_grad(), CaptureEngine(net, targets, reducers, grad=True) as eng:
    sv = jacobian_singular_values(eng.run, x, chunk=16)
print(json.dumps({"wall_s": time.time() - t, "sv": {k: v.tolist() for k, v in sv.items()}}))
''' % (LAYERS,)


def setup(d: Path, n_probe: int) -> None:
    import numpy as np
    import torch

    (d / "resnet18.py").write_text(RESNET18)
    sys.path.insert(0, str(d))
    from resnet18 import ResNet18

    torch.manual_seed(0)
    net = ResNet18()
    torch.save({"epoch": 0, "state_dict": net.state_dict()}, d / "rn18.pt")
    rng = np.random.default_rng(0)
    np.savez(d / "probe.npz", x=rng.standard_normal((n_probe, 3, 32, 32)).astype("float32"), y=np.arange(n_probe) % 10)


def run_capture(d: Path, out: str, samples: int, method: str, memory: str, device: str) -> dict:
    cmd = [sys.executable, "-m", "ibscope.cli.main", "capture", "-m", str(d / "resnet18.py") + ":ResNet18",
           "-c", str(d / "rn18.pt"), "-p", str(d / "probe.npz"), "-o", str(d / out), "--jacobian-samples",
           str(samples), "--jacobian-method", method, "--jacobian-memory", memory, "--device", device, "-q"]
    for layer in LAYERS:
        cmd += ["-l", layer]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"capture failed ({p.returncode}):\n{p.stderr}")
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": r1.ru_maxrss / 1024 if r1.ru_maxrss > r0.ru_maxrss else
            float("nan"), "cmd": " ".join(cmd)}


def compare(model: str, samples: int, repeats: int, memory: str) -> None:
    """Old single vmap(jacrev) vs per-layer vmaps vs the planned path, in this process (see the docstring)."""
    import statistics

    import numpy as np
    import torch

    from ibscope.capture import plan_layers
    from ibscope.capture.hooks import CaptureEngine
    from ibscope.capture.jacobian import frozen_parameters, jacobian_singular_values, jacobian_spectra, plan_jacobians
    from ibscope.capture.probe import ModelInput

    torch.manual_seed(0)
    if model == "demo":
        from ibscope.demo.models import ib_net

        net, x, layers = ib_net("tanh").eval(), torch.rand(samples, 12).round(), ["hidden*", "output"]
    else:
        tmp = tempfile.mkdtemp(prefix="bench_jac_")
        (Path(tmp) / "resnet18.py").write_text(RESNET18)
        sys.path.insert(0, tmp)
        from resnet18 import ResNet18

        net, x, layers = ResNet18().eval(), torch.randn(samples, 3, 32, 32), LAYERS
    targets, reducers, meta, _ = plan_layers(net, x[:2], layers)
    dims = {t.name: meta[t.name]["dims"] for t in targets}

    def old():  # ibscope capture before 56199b2 (its _store_jacobians)
        with torch.enable_grad(), CaptureEngine(net, targets, reducers, grad=True) as eng:
            return jacobian_singular_values(eng.run, x, chunk=16)

    def layerwise():  # one vmap(jacrev) per layer and 16 samples
        out = {}
        with frozen_parameters(net), torch.enable_grad(), CaptureEngine(net, targets, reducers, grad=True) as eng:
            for p in per_layer:
                out.update(jacobian_spectra(eng.run, ModelInput.of(x), p))
        return out

    def planned():  # ibscope capture now (store_jacobians)
        with frozen_parameters(net), torch.enable_grad(), CaptureEngine(net, targets, reducers, grad=True) as eng:
            return jacobian_spectra(eng.run, ModelInput.of(x), plan)

    ref = {k: v.numpy() for k, v in old().items()}  # warm-up (torch's lazy imports), and the reference values
    with frozen_parameters(net), CaptureEngine(net, targets, reducers, grad=True) as eng:
        t = time.perf_counter()
        plan = plan_jacobians(eng.run, ModelInput.of(x[:1]), dims, samples, budget=memory)
        t_plan = time.perf_counter() - t
        per_layer = [plan_jacobians(eng.run, ModelInput.of(x[:1]), {k: d}, samples, budget=memory,
                                    max_samples_per_pass=16) for k, d in dims.items()]
    ways = {"before 56199b2: one vmap(jacrev), all layers, 16 samples per vmap": old,
            "per layer, 16 samples per vmap (56199b2 .. this change)": layerwise,
            "planned (ibscope capture now)": planned}
    print(f"{model}: {samples} samples, layers {', '.join(dims)} ({sum(dims.values())} dims), d_in "
          f"{plan.d_in}, {torch.get_num_threads()} torch thread(s), {repeats} repeats, alternating")
    print(plan.summary())
    print(f"planning (once per capture, not per checkpoint): {t_plan * 1000:.0f} ms")
    worst = {}
    for name, fn in ways.items():
        got = fn()
        worst[name] = max(float(np.abs(got[k].numpy() - ref[k]).max() / np.abs(ref[k]).max()) for k in dims)
    times: dict[str, list[float]] = {k: [] for k in ways}
    for r in range(repeats):
        order = list(ways.items())
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times[next(iter(ways))])
    print(f"{'way':<68} {'median':>9} {'ratio':>6}  max rel. diff  all (ms)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<68} {med * 1000:7.1f} ms {med / base:6.2f}  {worst[name]:.1e}        "
              f"{' '.join(f'{v * 1000:.0f}' for v in ts)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=None, help="Jacobian samples (default: 16; --compare: 128)")
    ap.add_argument("--method", default="exact")
    ap.add_argument("--memory", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reference", action="store_true", help="also run the unbounded whole-Jacobian computation")
    ap.add_argument("--reference-samples", type=int, default=2)
    ap.add_argument("--compare", action="store_true", help="in-process timing: the old single vmap(jacrev), one "
                    "vmap per layer, and the planned path, side by side")
    ap.add_argument("--compare-model", choices=("demo", "resnet18"), default="demo")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="--compare: torch threads (default: torch's; 1 is "
                    "steadier on a shared machine)")
    args = ap.parse_args()
    if args.compare:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        compare(args.compare_model, args.samples or 128, args.repeats, args.memory)
        return
    args.samples = args.samples or 16
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="bench_jac_") as tmp:
        d = Path(tmp)
        setup(d, max(64, args.samples))
        print(f"ResNet-18, 3x32x32 input (3072), layers {', '.join(LAYERS)}, {args.samples} Jacobian samples, "
              f"--jacobian-method {args.method}, --jacobian-memory {args.memory}, device {args.device}, "
              f"{os.cpu_count()} CPU(s), torch threads default")
        r = run_capture(d, "acts", args.samples, args.method, args.memory, args.device)
        print(f"capture: {r['wall_s']:.1f} s wall ({r['cpu_s']:.1f} s CPU), peak RSS {r['peak_rss_mib']:.0f} MiB")
        print(f"  ({r['wall_s'] / args.samples:.1f} s per Jacobian sample, including one forward pass of the "
              f"64-sample probe set)")
        print(f"  command: {r['cmd']}")
        if args.reference:
            from ibscope.store import open_store

            st = open_store(d / "acts")
            (d / "ref.py").write_text(REFERENCE)
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            p = subprocess.run([sys.executable, str(d / "ref.py"), str(d), str(args.reference_samples)],
                               capture_output=True, text=True)
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            if p.returncode != 0:
                raise SystemExit(f"reference failed:\n{p.stderr}")
            ref = json.loads(p.stdout.strip().splitlines()[-1])
            worst = 0.0
            for k, v in ref["sv"].items():
                v = np.asarray(v)
                got = st.jacobian(0, k)[0][: len(v)]
                worst = max(worst, float(np.abs(got - v).max() / v.max()))
            print(f"reference (whole Jacobian, {args.reference_samples} sample(s)): {ref['wall_s']:.1f} s, peak RSS "
                  f"{peak / 1024 if peak > before else float('nan'):.0f} MiB; max |difference| / s_max = {worst:.2e}")


if __name__ == "__main__":
    main()
