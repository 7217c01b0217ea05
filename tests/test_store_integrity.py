"""Store integrity (issue 11): bad shards are named errors, crafted files are refused before
anything is allocated, a full / read-only / forbidden disk is a clean I/O error with nothing left
behind, and one capture writes a store at a time.

Most tests run the real command line in a subprocess (``python -m ibscope.cli.main``): exit codes,
messages, and that a failed write never crashes the interpreter (it used to end in a segmentation
fault after "No space left on device")."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from capture_support import load_models, mlp_data, save_probe, train_checkpoints, write_models
from ibscope import store as store_mod
from ibscope._h5io import AtomicH5, GuardedFile
from ibscope._locks import lock_path_for
from ibscope.capture import capture
from ibscope.cli.main import app
from ibscope.errors import DataError, IOFailure
from ibscope.store import open_store

LAYERS = ["type:Linear", "act"]
N = 64
GiB = 1024 ** 3


# ----------------------------------------------------------------------------- fixtures / helpers
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained 12-10-2 MLP (3 checkpoints), a 64-sample probe and its reference store."""
    d = tmp_path_factory.mktemp("run")
    mods = load_models(d)
    x, y = mlp_data(n=N)
    torch.manual_seed(0)
    train_checkpoints(mods.MLP(), x, y, d / "ck", epochs=(0, 1, 2), steps=3)
    save_probe(d / "probe.npz", x.numpy(), y.numpy())
    capture(f"{write_models(d)}:MLP", str(d / "ck" / "*.pt"), str(d / "probe.npz"), LAYERS, d / "ref",
            jacobian_samples=4, batch_size=16, progress=False)
    return d


def capture_args(d: Path, out: Path, *extra, model: str = "MLP", probe: str = "probe.npz") -> list[str]:
    return ["capture", "-m", f"{write_models(d)}:{model}", "-c", str(d / "ck" / "*.pt"), "-p", str(d / probe),
            "-l", LAYERS[0], "-l", LAYERS[1], "--jacobian-samples", "4", "-b", "16", "-q", "-o", str(out), *extra]


def _limit_memory(limit: int):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def cli(*args, limit_as: int | None = None, prelude: str | None = None, env: dict | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``ibscope ARGS`` in a fresh interpreter (optionally under an address-space limit, or
    after running ``prelude``, e.g. fault injection)."""
    if prelude is None:
        cmd = [sys.executable, "-m", "ibscope.cli.main", *map(str, args)]
    else:
        code = prelude + "\nimport sys\nfrom ibscope.cli.main import main\nsys.argv = ['ibscope', *sys.argv[1:]]\nmain()\n"
        cmd = [sys.executable, "-c", code, *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                         preexec_fn=_limit_memory(limit_as) if limit_as else None)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode >= 0, f"killed by signal {-res.returncode}: {res.stderr}"
    return res


def cli_here(*args) -> subprocess.CompletedProcess:
    """``ibscope ARGS`` in this process (typer's CliRunner), for the cases that are not about the
    interpreter surviving a failed write: the exit code and stderr as ``cli`` returns them. An
    exception that escaped the command's error handling fails the test, as a traceback does there."""
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), (res.exception, res.output)
    return subprocess.CompletedProcess(["ibscope", *map(str, args)], res.exit_code, res.stdout, res.stderr)


def one_line(text: str) -> str:
    return " ".join(text.split())


def copy_store(run_dir: Path, name: str) -> Path:
    dst = run_dir / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(run_dir / "ref", dst)
    return dst


def shards(store: Path) -> list[Path]:
    return sorted((store / "checkpoints").glob("*.h5"))


def assert_same_values(a_dir: Path, b_dir: Path) -> None:
    a, b = open_store(a_dir), open_store(b_dir)
    assert a.config_hash == b.config_hash and a.probe_hash == b.probe_hash
    assert [c.sha256 for c in a.checkpoints] == [c.sha256 for c in b.checkpoints] and len(a.checkpoints) == 3
    for ca, cb in zip(a.checkpoints, b.checkpoints):
        with h5py.File(ca.shard, "r") as fa, h5py.File(cb.shard, "r") as fb:
            for layer in b.layers:
                kept = {k: fa[f"acts/{layer}"].attrs[k] for k in ("nonfinite_count", "absmax")}
                assert kept == {k: fb[f"acts/{layer}"].attrs[k] for k in ("nonfinite_count", "absmax")}
                assert kept["nonfinite_count"] == 0 and kept["absmax"] > 0
        for layer in b.layers:
            np.testing.assert_array_equal(a.activations(ca, layer), b.activations(cb, layer))
            np.testing.assert_array_equal(a.jacobian(ca, layer)[0], b.jacobian(cb, layer)[0])


def damage(shard: Path, info) -> None:
    """Overwrite one stored chunk with random bytes (a chunk damaged on disk). Not all 0xff
    bytes: Fletcher-32 (the checksum of uncompressed chunks) adds in one's complement, where words
    0x0000 and 0xffff are equal, so an all-0xff chunk with an all-0xff checksum passes it."""
    junk = np.random.default_rng(7).integers(0, 256, info.size, dtype=np.uint8).tobytes()
    with open(shard, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(junk)


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


@contextmanager
def tmpfs(size: str):
    """A real tmpfs of ``size`` (e.g. '300k'); skips the test where mounting is not allowed."""
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    d = Path(tempfile.mkdtemp(prefix="ibscope-tmpfs-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        d.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)
        d.rmdir()


def remount(d: Path, opts: str) -> None:
    r = subprocess.run(["mount", "-o", f"remount,{opts}", str(d)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# fault injection: the writes of HDF5 files go through os.pwrite (ibscope._h5io.GuardedFile);
# after FAULT_BUDGET bytes every further write fails with FAULT_ERRNO
FAULT = textwrap.dedent("""
    import errno, os
    _budget = int(os.environ["FAULT_BUDGET"])
    _code = getattr(errno, os.environ.get("FAULT_ERRNO", "ENOSPC"))
    _real = os.pwrite
    _done = [0]
    def _pwrite(fd, data, offset):
        _done[0] += len(data)
        if _done[0] > _budget:
            raise OSError(_code, os.strerror(_code))
        return _real(fd, data, offset)
    os.pwrite = _pwrite
""")


# ----------------------------------------------------------------------------- truncated shard
@pytest.mark.slow
def test_truncated_shard_is_exit_4_skippable_and_repaired_by_resume(run):
    st = copy_store(run, "trunc")
    victim = shards(st)[1]
    os.truncate(victim, victim.stat().st_size // 2)

    res = cli("info", st)
    assert res.returncode == 4, res.stderr
    msg = one_line(res.stderr)
    assert victim.name in msg and "truncated, corrupt or not HDF5" in msg and "1 bad shard (2 good)" in msg
    assert "--resume" in msg and "--skip-bad-shards" in msg

    res = cli("estimate", st, "-o", run / "trunc.csv", "-e", "binning", "-q")
    assert res.returncode == 4, res.stderr
    assert victim.name in one_line(res.stderr) and not (run / "trunc.csv").exists()

    res = cli("info", st, "--skip-bad-shards", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert [c["epoch"] for c in info["checkpoints"]] == [0, 2]
    assert [Path(s["file"]).name for s in info["skipped"]] == [victim.name]
    assert "truncated" in info["skipped"][0]["reason"]
    res = CliRunner().invoke(app, ["info", str(st), "--skip-bad-shards"])
    assert res.exit_code == 0 and "Skipped 1 bad shard" in res.output and victim.name in one_line(res.output)

    res = cli(*capture_args(run, st, "--resume"))
    assert res.returncode == 0, res.stderr
    assert "Removed bad shard" in res.stderr and victim.name in one_line(res.stderr)
    assert_same_values(st, run / "ref")  # the repaired store equals an uninterrupted capture
    assert not leftovers(st)


# ----------------------------------------------------------------------------- foreign / incomplete / misnamed
def test_shard_of_another_config_is_exit_4_and_resume_keeps_it(run):
    other = run / "other16"
    if not other.exists():
        capture(f"{write_models(run)}:MLP", str(run / "ck" / "*.pt"), str(run / "probe.npz"), LAYERS, other,
                jacobian_samples=4, batch_size=16, dtype="float16", progress=False)
    st = copy_store(run, "mixed")
    victim = shards(st)[2]
    shutil.copyfile(other / "checkpoints" / victim.name, victim)  # same checkpoint, captured with other settings
    before = victim.read_bytes()

    res = cli("info", st)
    assert res.returncode == 4, res.stderr
    msg = one_line(res.stderr)
    assert victim.name in msg and "of another capture configuration" in msg

    res = CliRunner().invoke(app, capture_args(run, st, "--resume"))
    assert res.exit_code == 4, res.output
    out = one_line(res.output)
    assert "do not belong to it" in out and victim.name in out
    assert victim.read_bytes() == before  # not ibscope's to delete

    res = CliRunner().invoke(app, ["info", str(st), "--skip-bad-shards", "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["checkpoints"]) == 2


def test_incomplete_shard_is_named_and_resume_recaptures_it(run):
    st = copy_store(run, "incomplete")
    victim = shards(st)[0]
    with h5py.File(victim, "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(DataError) as ei:
        open_store(st)
    assert victim.name in str(ei.value) and "incomplete" in str(ei.value)
    skipping = open_store(st, skip_bad_shards=True)
    assert [c.epoch for c in skipping.checkpoints] == [1, 2]
    assert skipping.skipped == [{"file": str(victim), "kind": "incomplete",
                                 "reason": "incomplete: it has no 'complete' mark (its capture did not finish)"}]
    capture(f"{write_models(run)}:MLP", str(run / "ck" / "*.pt"), str(run / "probe.npz"), LAYERS, st,
            jacobian_samples=4, batch_size=16, progress=False, resume=True)
    assert_same_values(st, run / "ref")


def test_copied_shard_under_another_name_is_misnamed(run):
    st = copy_store(run, "copied")
    shutil.copyfile(shards(st)[0], st / "checkpoints" / "backup_of_epoch0.h5")
    with pytest.raises(DataError) as ei:
        open_store(st)
    assert "backup_of_epoch0.h5" in str(ei.value) and "misnamed" in str(ei.value)
    assert "Move a shard of another capture" in ei.value.hint
    assert [c.epoch for c in open_store(st, skip_bad_shards=True).checkpoints] == [0, 1, 2]


def test_tmp_leftovers_stay_ignored(run):
    st = copy_store(run, "withtmp")
    (st / "checkpoints" / "e000007_s-000000001_abcdefabcdef.h5.tmp").write_bytes(b"half a shard")
    got = open_store(st)
    assert [c.epoch for c in got.checkpoints] == [0, 1, 2] and got.skipped == []


def test_skipped_shards_are_warned_once_per_process(run, caplog):
    st = copy_store(run, "warnonce")
    victim = shards(st)[2]
    victim.write_bytes(b"not an hdf5 file")
    with caplog.at_level(logging.WARNING, logger="ibscope.store"):
        for _ in range(3):
            got = open_store(st, skip_bad_shards=True)
    assert [c.epoch for c in got.checkpoints] == [0, 1]
    assert [r.getMessage().count(victim.name) for r in caplog.records] == [1]


# ----------------------------------------------------------------------------- crafted files
def _craft_manifest_attr(key, value):
    def craft(st):
        with h5py.File(st / "manifest.h5", "a") as f:
            f.attrs[key] = value
    return craft


def _craft_shard_attr(key, value):
    def craft(st):
        with h5py.File(shards(st)[0], "a") as f:
            f.attrs[key] = value
    return craft


def _huge_shape(st):
    with h5py.File(shards(st)[0], "a") as f:
        del f["acts/fc1"]
        f.create_dataset("acts/fc1", shape=(N, 10 ** 9), dtype="f4", chunks=(16, 4096))


def _huge_labels(st):
    with h5py.File(st / "manifest.h5", "a") as f:
        del f["probe/labels"]
        f.create_dataset("probe/labels", shape=(10 ** 11,), dtype="i8", chunks=(4096,))


def _meta_not_a_dict(st):
    with h5py.File(st / "manifest.h5", "a") as f:
        f["layers/fc1"].attrs["meta"] = "[1, 2, 3]"


# (name, how to craft, file named in the message (None: a shard), what else the message names)
CRAFTED = [
    ("bad_config_json", _craft_manifest_attr("config", "{not json"), "manifest.h5", ["attribute 'config'", "not valid JSON"]),
    ("deep_json", _craft_manifest_attr("config", "[" * 200000 + "]" * 200000), "manifest.h5",
     ["attribute 'config'", "nested too deeply"]),
    ("config_list", _craft_manifest_attr("config", "[1,2]"), "manifest.h5", ["attribute 'config'", "must be a JSON object"]),
    ("config_hash_number", _craft_manifest_attr("config_hash", 5), "manifest.h5",
     ["attribute 'config_hash'", "must be a string"]),
    ("layer_meta_list", _meta_not_a_dict, "manifest.h5", ["layers/fc1", "attribute 'meta'", "must be a JSON object"]),
    ("huge_labels", _huge_labels, "manifest.h5", ["probe/labels", "(100000000000,)", f"expected ({N},)"]),
    ("shard_metrics_badjson", _craft_shard_attr("metrics", "{bad"), None, ["attribute 'metrics'", "not valid JSON"]),
    ("shard_epoch_text", _craft_shard_attr("epoch", "three"), None, ["attribute 'epoch'", "must be an integer"]),
    ("huge_shape", _huge_shape, None, ["acts/fc1", "(64, 1000000000)", "expected (64, 10)"]),
]


@pytest.mark.parametrize("name,craft,named,needles", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_store_is_exit_4_naming_file_and_attribute(run, name, craft, named, needles):
    st = copy_store(run, f"crafted_{name}")
    named = named or shards(st)[0].name
    craft(st)
    t0 = time.monotonic()
    res = cli("info", st, limit_as=2 * GiB)  # the old code tried to allocate up to 954 GiB here
    assert time.monotonic() - t0 < 60
    assert res.returncode == 4, res.stderr
    msg = one_line(res.stderr)
    assert named in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    if named != "manifest.h5":  # one bad shard: skippable, the rest of the store stays usable
        res = cli("info", st, "--skip-bad-shards", "--json", limit_as=2 * GiB)
        assert res.returncode == 0, res.stderr
        assert [Path(s["file"]).name for s in json.loads(res.stdout)["skipped"]] == [named]


@pytest.mark.slow
def test_crafted_huge_shape_refused_by_estimate_under_a_memory_limit(run):
    st = copy_store(run, "crafted_estimate")
    _huge_shape(st)
    res = cli("estimate", st, "-o", run / "crafted.csv", "-e", "binning", "-q", limit_as=2 * GiB)
    assert res.returncode == 4, res.stderr
    msg = one_line(res.stderr)
    assert shards(st)[0].name in msg and "acts/fc1" in msg and "(64, 1000000000)" in msg


def test_declared_size_checked_against_stored_bytes_before_reading(run):
    """Manifest dims and shard shapes agree (both crafted) but the file holds no data for them:
    reading refuses before allocating (under a 2 GiB address-space limit)."""
    st = copy_store(run, "crafted_dims")
    with h5py.File(st / "manifest.h5", "a") as f:
        meta = json.loads(f["layers/fc1"].attrs["meta"])
        meta["dims"] = 10 ** 9
        f["layers/fc1"].attrs["meta"] = json.dumps(meta)
    for p in shards(st):
        with h5py.File(p, "a") as f:
            del f["acts/fc1"]
            f.create_dataset("acts/fc1", shape=(N, 10 ** 9), dtype="f4", chunks=(16, 4096), compression="lzf")
            del f["jacobian/fc1"]
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({2 * GiB}, {2 * GiB}))
        from ibscope.store import open_store
        from ibscope.errors import DataError
        st = open_store({str(st)!r})
        try:
            st.activations(0, "fc1")
        except DataError as exc:
            print(exc)
        else:
            print("READ")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    msg = one_line(res.stdout)
    assert shards(st)[0].name in msg and "acts/fc1" in msg and "declares shape (64, 1000000000)" in msg
    assert "holds only 0 bytes" in msg


def test_corrupt_chunk_is_a_data_error_naming_shard_and_dataset(run):
    st = copy_store(run, "badchunk")
    victim = shards(st)[1]
    with h5py.File(victim, "r") as f:
        info = f["acts/fc1"].id.get_chunk_info(0)
    damage(victim, info)
    got = open_store(st)  # metadata is intact: the check reads no data
    np.testing.assert_array_equal(got.activations(0, "fc1"), open_store(run / "ref").activations(0, "fc1"))
    with pytest.raises(DataError) as ei:
        got.activations(1, "fc1")
    assert victim.name in str(ei.value) and "acts/fc1" in str(ei.value) and "corrupt" in str(ei.value)
    assert f"Delete '{victim}'" in ei.value.hint and "--resume" in ei.value.hint  # the check reads no data


@pytest.mark.slow
def test_corrupt_chunk_stops_estimate_then_repair_recomputes_the_cells(run):
    """A chunk damaged on disk is found only when estimate reads it: exit 4 naming shard and
    dataset, nothing written (not a noted cell: the estimate is not at fault). With
    --skip-bad-shards its cells are noted; after the documented repair (delete, capture --resume)
    the next incremental estimate tries those cells again and they get values."""
    st = copy_store(run, "badchunk_est")
    victim = shards(st)[1]
    with h5py.File(victim, "r") as f:
        info = f["acts/fc1"].id.get_chunk_info(0)
    damage(victim, info)
    out = run / "badchunk_est.csv"
    r = cli("estimate", st, "-o", out, "-e", "binning", "-q")
    assert r.returncode == 4, r.stderr
    assert victim.name in r.stderr and "acts/fc1" in r.stderr and not out.exists()
    r = cli("estimate", st, "-o", out, "-e", "binning", "-q", "--skip-bad-shards")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out)))
    bad = [x for x in rows if x["layer"] == "fc1" and x["checkpoint"] == "1" and x["estimator"] == "binning"]
    assert len(bad) == 2 and all(x["value"] == "" and "(--skip-bad-shards)" in x["note"] for x in bad)
    victim.unlink()  # the repair the hint gives
    r = cli(*capture_args(run, st, "--resume"))
    assert r.returncode == 0, r.stderr
    r = cli("estimate", st, "-o", out, "-e", "binning", "-q")
    assert r.returncode == 0, r.stderr
    again = {(x["checkpoint"], x["layer"], x["quantity"]): x for x in csv.DictReader(open(out)) if x["estimator"] == "binning"}
    fresh = run / "badchunk_fresh.csv"
    assert cli("estimate", run / "ref", "-o", fresh, "-e", "binning", "-q").returncode == 0
    ref = {(x["checkpoint"], x["layer"], x["quantity"]): x for x in csv.DictReader(open(fresh)) if x["estimator"] == "binning"}
    assert set(again) == set(ref) and all(again[k]["value"] == ref[k]["value"] != "" for k in ref)
    assert all(x["note"] == "" for x in again.values())


@pytest.mark.slow
def test_resume_refuses_to_mix_a_retrained_run_into_the_store(run, tmp_path):
    """Checkpoints retrained in place (same paths and epochs, new weights), or a new file whose
    epoch is already captured: --resume refuses (exit 4) instead of adding a second series."""
    d = tmp_path / "retrain"
    shutil.copytree(run / "ck", d / "ck")
    shutil.copy(run / "probe.npz", d / "probe.npz")
    write_models(d)
    store = d / "acts"
    assert cli_here(*capture_args(d, store)).returncode == 0
    before = sorted(p.name for p in shards(store))
    mods = load_models(d)
    x, y = mlp_data(n=N)
    torch.manual_seed(123)  # the retrained run
    train_checkpoints(mods.MLP(), x, y, d / "ck", epochs=(0, 1, 2), steps=3)
    r = cli_here(*capture_args(d, store, "--resume"))
    assert r.returncode == 4, r.stderr
    text = one_line(r.stderr)
    assert "the file changed since it was captured" in text and "mix two training runs" in text and "--overwrite" in text
    assert sorted(p.name for p in shards(store)) == before  # nothing added
    # the same epochs saved under new names next to the captured ones
    for p in (d / "ck").glob("*.pt"):
        p.rename(p.with_name("new_" + p.name))
    args = capture_args(d, store, "--resume")
    args[args.index("-c") + 1] = str(d / "ck" / "new_*.pt")
    r = cli_here(*args)
    assert r.returncode == 4 and "is already captured from another file" in one_line(r.stderr), r.stderr
    assert sorted(p.name for p in shards(store)) == before
    r = cli_here(*[a for a in args if a != "--resume"], "--overwrite")
    assert r.returncode == 0 and len(shards(store)) == 3


@pytest.mark.slow
def test_resume_of_a_store_moved_with_its_run_folder(run, tmp_path):
    """The run folder (model file, checkpoints, probe, store) copied elsewhere: --resume works from
    the new paths (same file names, same probe data), keeps the store's config, and the repaired
    store equals the original; a model file of another name is still refused, naming old and new."""
    d = tmp_path / "moved"
    for name in ("ck", "ref"):
        shutil.copytree(run / name, d / name)
    shutil.copy(run / "probe.npz", d / "probe.npz")
    write_models(d)
    victim = shards(d / "ref")[1]
    victim.unlink()
    r = cli(*capture_args(d, d / "ref", "--resume"))
    assert r.returncode == 0, r.stderr
    assert "the same files are now at other paths" in one_line(r.stderr)
    assert_same_values(d / "ref", run / "ref")
    assert open_store(d / "ref").config == open_store(run / "ref").config
    args = capture_args(d, d / "ref", "--resume")
    spec = args[args.index("-m") + 1]
    other = Path(spec.rpartition(":")[0]).with_name("other_models.py")
    shutil.copy(spec.rpartition(":")[0], other)
    args[args.index("-m") + 1] = f"{other}:{spec.rpartition(':')[2]}"
    r = cli(*args)
    assert r.returncode == 4 and "different settings (model: " in one_line(r.stderr) and "other_models.py" in r.stderr


def test_open_store_reads_attributes_and_shapes_not_data(run, monkeypatch):
    read = []
    real = h5py.Dataset.__getitem__

    def spy(self, sel):
        read.append((Path(self.file.filename).name, self.name))
        return real(self, sel)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    store_mod._CHECKED.clear()
    st = open_store(run / "ref")
    assert len(st.checkpoints) == 3
    assert sorted(read) == [("manifest.h5", "/probe/labels"), ("manifest.h5", "/probe/sample_ids")]


# ----------------------------------------------------------------------------- full disk, read-only, no permission
def _sizes(run: Path) -> tuple[int, int]:
    ref = run / "ref"
    return (ref / "manifest.h5").stat().st_size, max(p.stat().st_size for p in shards(ref))


def _page(n: int) -> int:
    return -(-n // 4096) * 4096


@contextmanager
def full_disk(run: Path, tmp_path: Path):
    """(folder, free_space, fault budgets) where the manifest and one shard fit, a second shard
    does not: a real tmpfs where it can be mounted, else fault injection making os.pwrite fail
    with ENOSPC (HDF5's writes go through it) once the bytes a full disk would take are written
    (``budgets``: one per command, the space left at its start)."""
    man, shard = _sizes(run)
    room = _page(man) + _page(shard) + shard // 2
    try:
        with tmpfs(f"{room // 1024 + 1}k") as disk:
            yield disk, (lambda: remount(disk, "size=16m")), []
            return
    except pytest.skip.Exception:
        pass
    budgets = [man + shard + shard // 2, shard // 2]
    yield tmp_path, budgets.clear, budgets


@pytest.mark.slow
def test_disk_full_is_a_clean_error_and_resume_completes(run, tmp_path):
    with full_disk(run, tmp_path) as (disk, free_space, budgets):
        def capture_cli(*extra):
            if not budgets:
                return cli(*capture_args(run, out, *extra))
            return cli(*capture_args(run, out, *extra), prelude=FAULT, env={"FAULT_BUDGET": str(budgets.pop(0))})

        out = disk / "acts"
        res = capture_cli()
        assert res.returncode == 1, res.stderr  # not 139 (segmentation fault) as before
        msg = one_line(res.stderr)
        assert "No space left on device (ENOSPC) while writing" in msg
        assert str(out / "checkpoints") in msg and "The partial file was removed" in msg
        assert not leftovers(disk)
        assert [c.epoch for c in open_store(out).checkpoints] == [0]  # completed checkpoints are kept
        res = capture_cli("--resume")  # still full: the same clean error, not a crash
        assert res.returncode == 1 and "No space left on device" in res.stderr and not leftovers(disk)
        free_space()
        res = capture_cli("--resume")
        assert res.returncode == 0, res.stderr
        assert_same_values(out, run / "ref")
        assert not leftovers(disk)


def test_disk_full_while_writing_the_manifest_leaves_no_store_behind(run, tmp_path, monkeypatch):
    real = os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    out = tmp_path / "acts"
    res = CliRunner().invoke(app, capture_args(run, out))
    assert res.exit_code == 1, res.output
    assert f"No space left on device (ENOSPC) while writing '{out / 'manifest.h5'}'" in one_line(res.output)
    assert not out.exists()  # no half-made store that would block the retry
    monkeypatch.setattr(os, "pwrite", real)
    res = CliRunner().invoke(app, capture_args(run, out))
    assert res.exit_code == 0, res.output
    assert_same_values(out, run / "ref")


@pytest.mark.slow
def test_io_error_mid_shard_by_fault_injection(run, tmp_path):
    man, shard = _sizes(run)
    out = tmp_path / "acts"
    res = cli(*capture_args(run, out), prelude=FAULT, env={"FAULT_BUDGET": str(man + shard // 3), "FAULT_ERRNO": "EIO"})
    assert res.returncode == 1, res.stderr
    assert "Input/output error (EIO) while writing" in one_line(res.stderr) and not leftovers(tmp_path)
    assert not out.exists()  # it failed before its first checkpoint: no empty store is left to block the retry


def test_read_only_file_system_is_named(run):
    with tmpfs("4m") as disk:
        out = disk / "acts"
        res = CliRunner().invoke(app, capture_args(run, out))
        assert res.exit_code == 0, res.output
        remount(disk, "ro")
        res = CliRunner().invoke(app, capture_args(run, out, "--overwrite"))
        assert res.exit_code == 1, res.output
        msg = one_line(res.output)
        assert "Read-only file system (EROFS)" in msg and str(lock_path_for(out)) in msg
        remount(disk, "rw")
        assert_same_values(out, run / "ref")  # nothing was touched


def test_permission_denied_on_the_shard_is_named_and_nothing_left(run, tmp_path, monkeypatch):
    real = os.open

    def deny(path, flags, *a, **kw):
        if str(path).endswith(".h5.tmp") and "checkpoints" in str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", deny)
    out = tmp_path / "acts"
    res = CliRunner().invoke(app, capture_args(run, out))
    assert res.exit_code == 1, res.output
    msg = one_line(res.output)
    assert "Permission denied (EACCES) while creating" in msg and str(out / "checkpoints") in msg
    assert not leftovers(tmp_path)


def test_unreadable_store_file_is_an_io_error_not_a_corrupt_store(run, monkeypatch):
    """A permission error while opening is the system's answer, not a damaged file: exit 1
    naming the path, and no shard is called corrupt (or deleted by --resume) for it."""
    st = copy_store(run, "noperm")
    real = h5py.File
    victim = shards(st)[1]

    def deny(name, *a, **kw):
        if Path(str(name)) == victim:
            raise OSError(errno.EACCES, f"Unable to synchronously open file (unable to open file: name = '{name}', "
                                        "errno = 13, error message = 'Permission denied', flags = 0, o_flags = 0)")
        return real(name, *a, **kw)

    monkeypatch.setattr(h5py, "File", deny)
    store_mod._CHECKED.clear()
    with pytest.raises(IOFailure) as ei:
        open_store(st, skip_bad_shards=True)
    assert ei.value.message == f"Permission denied (EACCES) while reading '{victim}'."
    res = CliRunner().invoke(app, capture_args(run, st, "--resume"))
    assert res.exit_code == 1 and "Permission denied (EACCES)" in res.output
    assert victim.exists()


def test_atomic_h5_discards_a_failed_file_and_keeps_the_library_usable(tmp_path, monkeypatch):
    real = os.pwrite
    budget = [20_000]

    def pwrite(fd, data, offset):
        budget[0] -= len(data)
        if budget[0] < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    final = tmp_path / "x.h5"
    w = AtomicH5(final)
    ds = w.f.create_dataset("a", shape=(4096, 64), dtype="f4", chunks=(512, 64))
    for i in range(0, 4096, 512):
        ds[i:i + 512] = np.random.default_rng(i).standard_normal((512, 64))
    with pytest.raises(IOFailure) as ei:
        w.f.flush()  # the chunk cache goes to disk: the write that fails
        w.check()
    assert str(ei.value.message) == f"No space left on device (ENOSPC) while writing '{final}'. The partial file was removed."
    assert not final.exists() and not (tmp_path / "x.h5.tmp").exists()
    # the failed file is closed (other tests' stores may keep a shard open in this process)
    still = [fid.name for fid in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)]
    assert not [n for n in still if str(tmp_path).encode() in (n if isinstance(n, bytes) else n.encode())]
    monkeypatch.setattr(os, "pwrite", real)
    with AtomicH5(final) as w2:
        w2.f["b"] = np.arange(5)
    with h5py.File(final, "r") as f:
        assert f["b"][()].tolist() == [0, 1, 2, 3, 4]


def test_guarded_file_serves_discarded_writes_back(tmp_path, monkeypatch):
    g = GuardedFile(tmp_path / "g.bin")
    g.seek(0)
    g.write(b"abcdef")
    monkeypatch.setattr(os, "pwrite", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    g.seek(2)
    assert g.write(bytearray(b"XY")) == 2  # HDF5 is told it went well
    g.seek(8)
    g.write(b"Z")
    assert isinstance(g.error, OSError) and g.error.errno == errno.EIO
    g.seek(0)
    assert g.read(9) == b"abXYef\x00\x00Z"  # disk, then the kept writes on top
    g.close()
    assert (tmp_path / "g.bin").read_bytes() == b"abcdef"  # nothing after the failure reached the disk


def test_text_writes_leave_no_tmp_on_failure(tmp_path, monkeypatch):
    import builtins

    from ibscope import _atomic
    from ibscope.check import atomic_write_text

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_atomic, "open", lambda *a, **kw: Full(real_open(*a, **kw)), raising=False)
    target = tmp_path / "check.json"
    target.write_text("old")
    with pytest.raises(IOFailure) as ei:
        atomic_write_text(target, "{}")
    assert ei.value.message == f"No space left on device (ENOSPC) while writing '{target}'."
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["check.json"]


# ----------------------------------------------------------------------------- one writer at a time
@pytest.mark.slow
def test_second_capture_into_a_store_is_refused_naming_the_lock(run):
    out = run / "locked"
    shutil.rmtree(out, ignore_errors=True)
    # SlowMLP sleeps 40 ms per forward: 3 checkpoints x 16 batches hold the lock for ~2 s
    slow = [a if a != "16" else "4" for a in capture_args(run, out, model="SlowMLP")]
    holder = subprocess.Popen([sys.executable, "-m", "ibscope.cli.main", *slow], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    lock = lock_path_for(out)
    try:
        deadline = time.monotonic() + 120
        while not lock.with_name(lock.name + ".holder.json").exists():
            assert holder.poll() is None and time.monotonic() < deadline, holder.stderr.read()
            time.sleep(0.02)
        res = CliRunner().invoke(app, capture_args(run, out, "--resume", "--lock-timeout", "0.2", model="SlowMLP"))
        assert res.exit_code == 1, res.output
        msg = one_line(res.output)
        assert f"'{lock}'" in msg and f"process {holder.pid}" in msg and "activation store" in msg
        res = CliRunner().invoke(app, ["info", str(out), "--json"])  # readers take no lock
        assert res.exit_code == 0, res.output
    finally:
        _, err = holder.communicate(timeout=120)
    assert holder.returncode == 0, err
    res = CliRunner().invoke(app, capture_args(run, out, "--resume", "--lock-timeout", "5", model="SlowMLP"))
    assert res.exit_code == 0, res.output
    assert [c.epoch for c in open_store(out).checkpoints] == [0, 1, 2]
