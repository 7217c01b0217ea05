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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--method", default="exact")
    ap.add_argument("--memory", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reference", action="store_true", help="also run the unbounded whole-Jacobian computation")
    ap.add_argument("--reference-samples", type=int, default=2)
    args = ap.parse_args()
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
