"""Capture's writer thread (ibscope.capture.writer): values identical to a plain forward pass,
errors of the thread raised in the caller's thread as the same errors, no *.tmp left after a
failed write or a Ctrl-C, a bounded queue."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn

from ibscope.capture import capture
from ibscope.capture.writer import BatchWriter
from ibscope.errors import DataError, IOFailure
from ibscope.store import open_store

N = 300  # not a multiple of the batch size nor of the chunk rows: partial last batch and chunk
BATCH = 64


def mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(20, 48), nn.ReLU(inplace=True), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 3))


def cnn():
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 6, 3, padding=1, stride=2),
                         nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))


def reference(model, x, names, reduce):
    """What a capture must store: each named module's output over the probe, batch by batch as
    capture runs it, copied in the hook (ReLU(inplace) rewrites its input), reduced by ``reduce``."""
    mods = dict(model.named_modules())
    got = {n: [] for n in names}
    hs = [mods[n].register_forward_hook(lambda m, a, o, n=n: got[n].append(reduce(o).clone())) for n in names]
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], BATCH):
                model(x[i:i + BATCH])
    finally:
        for h in hs:
            h.remove()
    return {n: torch.cat(v).numpy() for n, v in got.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("writer")
    out = {}
    for kind, make, x in (("mlp", mlp, torch.randn(N, 20, generator=torch.Generator().manual_seed(3))),
                          ("cnn", cnn, torch.randn(N, 3, 8, 8, generator=torch.Generator().manual_seed(4)))):
        model = make().eval()
        ck = d / f"{kind}_epoch1.pt"
        torch.save({"epoch": 1, "state_dict": model.state_dict()}, ck)
        out[kind] = (make, model, x, ck)
    return d, out


@pytest.mark.parametrize("compression", ["none", "lzf", "gzip"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_stored_values_equal_the_forward_pass_bit_for_bit(runs, compression, dtype):
    d, models = runs
    for kind, layers, red in (("mlp", ["0", "1", "3", "4"], lambda o: o),
                              ("cnn", ["0", "1", "3", "6"], lambda o: o.mean((2, 3)) if o.ndim == 4 else o)):
        make, model, x, ck = models[kind]
        want = reference(model, x, layers, red)
        out = d / f"{kind}_{compression}_{dtype}"
        capture(make, str(ck), (x, None), layers, out, batch_size=BATCH, device="cpu", dtype=dtype,
                compression=compression, progress=False, store_inputs=False)
        st = open_store(out)
        for name in layers:
            got = st.activations(0, name)
            assert got.dtype == np.dtype(dtype)
            assert np.array_equal(got, want[name].astype(dtype)), (kind, name)  # bit for bit, not close
        with h5py.File(st.checkpoints[0].shard, "r") as f:
            ds = f[f"acts/{layers[0]}"]
            assert ds.compression == (None if compression == "none" else compression)
            assert ds.fletcher32  # a checksum per chunk: damage on disk is an error when read


def test_default_compression_is_none(runs):
    d, models = runs
    make, model, x, ck = models["mlp"]
    out = d / "default"
    capture(make, str(ck), (x, None), ["1"], out, batch_size=BATCH, device="cpu", progress=False)
    with h5py.File(open_store(out).checkpoints[0].shard, "r") as f:
        assert f["acts/1"].compression is None


def test_background_and_inline_writers_write_the_same_file_content(runs, monkeypatch):
    import ibscope.capture.writer as W

    d, models = runs
    make, model, x, ck = models["cnn"]
    stores = {}
    for bg in (True, False):
        real = W.run_probe
        monkeypatch.setattr(W, "run_probe", lambda *a, bg=bg, real=real, **k: real(*a, **dict(k, background=bg)))
        stores[bg] = out = d / f"bg_{bg}"
        capture(make, str(ck), (x, None), ["1", "3"], out, batch_size=BATCH, device="cpu", compression="lzf",
                progress=False)
        monkeypatch.setattr(W, "run_probe", real)
    a, b = open_store(stores[True]), open_store(stores[False])
    for name in ("1", "3"):
        assert np.array_equal(a.activations(0, name), b.activations(0, name))
    with h5py.File(a.checkpoints[0].shard, "r") as fa, h5py.File(b.checkpoints[0].shard, "r") as fb:
        for name in ("1", "3"):
            for key in ("nonfinite_count", "absmax"):
                assert fa[f"acts/{name}"].attrs[key] == fb[f"acts/{name}"].attrs[key]


def test_disk_full_in_the_writer_thread_is_the_same_clean_io_error(runs, monkeypatch, tmp_path):
    d, models = runs
    make, model, x, ck = models["mlp"]
    real = os.pwrite
    where: list[str] = []

    def full(fd, data, offset):
        path = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if "checkpoints" in path and len(data) >= 16384:  # the shard's activation chunks, not its metadata
            where.append(threading.current_thread().name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    out = tmp_path / "acts"
    with pytest.raises(IOFailure) as ei:
        capture(make, str(ck), (x, None), ["1", "3"], out, batch_size=BATCH, device="cpu", progress=False)
    assert where and where[0] == "ibscope-capture-writer"  # it failed in the writer thread ...
    msg = ei.value.message  # ... and is raised here as the writer raised it
    assert msg.startswith("No space left on device (ENOSPC) while writing '") and "checkpoints" in msg
    assert msg.endswith("The partial file was removed.")
    assert not list(tmp_path.rglob("*.tmp")) and not out.exists()  # nothing half-written, no store blocking a retry
    assert not [t for t in threading.enumerate() if t.name == "ibscope-capture-writer"]
    monkeypatch.setattr(os, "pwrite", real)
    capture(make, str(ck), (x, None), ["1", "3"], out, batch_size=BATCH, device="cpu", progress=False)
    assert open_store(out).activations(0, "3").shape == (N, 24)


def test_nan_found_by_the_writer_thread_is_the_usual_data_error(tmp_path):
    class NaNIf(nn.Module):
        def forward(self, x):  # NaN in every unit of the rows whose first input is > 100
            return x[:, :3] * torch.where(x[:, :1] > 100, float("nan"), 1.0)

    class NaNAt(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.bad = NaNIf()

        def forward(self, x):
            return self.bad(x) + self.fc(x)[:, :3]

    torch.manual_seed(0)
    x = torch.randn(N, 4)
    x[130, 0] = 1000.0  # probe row 130: the third batch, rows 128..191
    net = NaNAt()
    torch.save(net.state_dict(), tmp_path / "epoch_1.pt")
    with pytest.raises(DataError) as ei:
        capture(NaNAt, str(tmp_path / "epoch_1.pt"), (x, None), ["fc", "bad"], tmp_path / "acts", batch_size=BATCH,
                device="cpu", progress=False)
    assert "Layer 'bad' has 3 non-finite value(s) (NaN/inf)" in ei.value.message
    assert "probe rows 128..191" in ei.value.message and ei.value.exit_code == 4
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "acts").exists()


class SigintAt(nn.Module):
    """An MLP that sends itself SIGINT (what Ctrl-C sends) in the forward pass number ``at``,
    counted from when ``armed`` is set."""

    armed = False
    calls = 0
    at = 3

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, inp):
        if SigintAt.armed:
            SigintAt.calls += 1
            if SigintAt.calls == SigintAt.at:
                os.kill(os.getpid(), signal.SIGINT)  # caught, then raised at the next batch boundary
        return self.net(inp)


def test_ctrl_c_during_capture_stops_the_writer_and_leaves_no_tmp(runs, tmp_path, monkeypatch):
    import ibscope.capture.writer as W

    x = runs[1]["mlp"][2]
    torch.save({"epoch": 0, "state_dict": SigintAt().state_dict()}, tmp_path / "epoch_0.pt")
    torch.save({"epoch": 1, "state_dict": SigintAt().state_dict()}, tmp_path / "epoch_1.pt")
    real, seen = W.run_probe, []

    def arm_on_second(*a, **k):  # the second checkpoint's forward passes are interrupted
        seen.append(1)
        SigintAt.armed, SigintAt.calls = len(seen) == 2, 0
        return real(*a, **k)

    monkeypatch.setattr(W, "run_probe", arm_on_second)
    handler = signal.getsignal(signal.SIGINT)
    out = tmp_path / "acts"
    try:
        with pytest.raises(KeyboardInterrupt):
            capture(SigintAt, str(tmp_path / "epoch_*.pt"), (x, None), ["net.1", "net.3"], out, batch_size=BATCH,
                    device="cpu", progress=False)
    finally:
        SigintAt.armed = False
    assert len(seen) == 2 and SigintAt.calls == SigintAt.at  # stopped at the batch after the signal
    assert not list(tmp_path.rglob("*.tmp"))  # the shard being written was discarded
    st = open_store(out)
    assert [c.epoch for c in st.checkpoints] == [0]  # the complete checkpoint is kept
    assert st.activations(0, "net.3").shape == (N, 24)
    assert not [t for t in threading.enumerate() if t.name == "ibscope-capture-writer"]
    assert signal.getsignal(signal.SIGINT) is handler


class SlowShard:
    """A stand-in for ShardWriter: slow appends, recording the rows it was given."""

    def __init__(self, delay=0.02, fail_at=None):
        self.delay, self.fail_at = delay, fail_at
        self.rows: dict[str, list] = {}
        self.appends = 0

    def chunk_rows(self, d, dtype="float32"):
        return 8

    def append(self, layer, batch, dtype="float32", *, stats=None):
        self.appends += 1
        if self.fail_at is not None and self.appends >= self.fail_at:
            raise IOFailure("disk on fire")
        time.sleep(self.delay)
        self.rows.setdefault(layer, []).append(np.array(batch))


def test_queue_is_bounded_and_rows_arrive_in_order(monkeypatch):
    monkeypatch.setattr("ibscope.capture.writer.WRITE_BYTES", 0)  # write every whole chunk at once
    shard = SlowShard()
    batch = {"a": torch.arange(64, dtype=torch.float32).reshape(16, 4)}
    nbytes = 16 * 4 * 4
    waiting = []
    with BatchWriter(shard, {"a": 4}, max_pending_bytes=3 * nbytes) as bw:
        for i in range(12):
            bw.put(i * 16, {"a": batch["a"] + 100 * i})
            waiting.append(bw._slots - bw._sem._value)  # batches handed over, not yet written
    assert bw._slots == 3 and max(waiting) <= 3  # the producer waited instead of piling up batches
    rows = np.concatenate(shard.rows["a"])
    want = np.concatenate([np.arange(64, dtype=np.float32).reshape(16, 4) + 100 * i for i in range(12)])
    assert np.array_equal(rows, want)


def test_error_in_the_writer_is_raised_in_the_caller_as_the_same_object(monkeypatch):
    monkeypatch.setattr("ibscope.capture.writer.WRITE_BYTES", 0)
    shard = SlowShard(delay=0.0, fail_at=3)
    bw = BatchWriter(shard, {"a": 4}, max_pending_bytes=1)
    caught = None
    with pytest.raises(IOFailure) as ei:
        with bw:
            for i in range(50):
                bw.put(i * 16, {"a": torch.ones(16, 4)})
                time.sleep(0.005)
    caught = ei.value
    assert caught is bw.error and caught.message == "disk on fire"
    assert shard.appends == 3  # nothing more was written after the failure
    assert bw._thread is None  # joined

def test_checksum_only_datasets_must_hold_all_their_bytes(tmp_path):
    """fletcher32 does not shrink data: a checksummed, uncompressed dataset missing chunks is
    refused before reading, as a plain uncompressed one is."""
    from ibscope._h5io import check_storage

    with h5py.File(tmp_path / "x.h5", "w") as f:
        full = f.create_dataset("full", shape=(64, 8), dtype="f4", chunks=(16, 8), fletcher32=True)
        full[:] = np.ones((64, 8), np.float32)
        part = f.create_dataset("part", shape=(64, 8), dtype="f4", chunks=(16, 8), fletcher32=True)
        part[:16] = np.ones((16, 8), np.float32)  # 3 of 4 chunks never written
        check_storage(full, "'x.h5', dataset 'full'")
        with pytest.raises(DataError, match="declares shape \\(64, 8\\) .* holds only"):
            check_storage(part, "'x.h5', dataset 'part'")


def test_damaged_chunk_of_a_default_store_is_a_data_error(runs, tmp_path):
    d, models = runs
    make, model, x, ck = models["mlp"]
    out = tmp_path / "acts"
    capture(make, str(ck), (x, None), ["1"], out, batch_size=BATCH, device="cpu", progress=False)
    shard = open_store(out).checkpoints[0].shard
    with h5py.File(shard, "r") as f:
        info = f["acts/1"].id.get_chunk_info(0)
    with open(shard, "r+b") as fh:  # flip one byte in the middle of the chunk
        fh.seek(info.byte_offset + info.size // 2)
        b = fh.read(1)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(DataError) as ei:
        open_store(out).activations(0, "1")
    assert shard.name in str(ei.value) and "acts/1" in str(ei.value) and "corrupt" in str(ei.value)


def test_snapshot_of_a_live_model_goes_through_the_writer(tmp_path):
    """The fast test of ibscope.capture.live (the end-to-end one is slow): two snapshots of a
    model in training, values equal to its forward pass bit for bit, mode restored, a point
    already in the store skipped."""
    from ibscope.capture import snapshot

    torch.manual_seed(0)
    x = torch.randn(N, 20)
    np.savez(tmp_path / "probe.npz", x=x.numpy())
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        assert snapshot(model, tmp_path / "probe.npz", tmp_path / "acts", layers=["3", "4"], epoch=epoch,
                        batch_size=BATCH) is not None
        assert model.training
    assert snapshot(model, tmp_path / "probe.npz", tmp_path / "acts", layers=["3", "4"], epoch=1,
                    batch_size=BATCH) is None
    st = open_store(tmp_path / "acts")
    assert [c.epoch for c in st.checkpoints] == [0, 1]
    want = reference(model.eval(), x, ["3", "4"], lambda o: o)
    for name in ("3", "4"):
        assert np.array_equal(st.activations(1, name), want[name])
