"""Stages and their stamps: is a stage up to date, and run it when not.

A stage's stamp (``OUT/.ibscope/stages/<stage>.json``) records its fingerprint: the hash of its
config section, the digests of the upstream stages' last runs, the sha256 of each input file
(folders: of their file list and contents; the model factory's source file included) and the
ibscope version; and, when it finished, the sha256 of each output. The stamp is removed before a
stage runs and written (atomically) after it finished, so an interrupted run re-does exactly the
unfinished stage. This module does no printing itself: it tells a
:class:`~ibscope.reporting.Reporter`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ibscope._atomic import write_text_atomic
from ibscope._paths import inside
from ibscope._version import __version__
from ibscope.errors import UsageError
from ibscope.reporting import NullReporter, Reporter
from ibscope.store import canonical_json, sha256_bytes

STAMP_DIR = Path(".ibscope") / "stages"

#: version of the stamp layout; a stamp of another layout makes its stage run again
STAMP_FORMAT = 2


def _hash(obj: Any) -> str:
    return sha256_bytes(canonical_json(obj).encode())


def _is_temp(name: str) -> bool:
    """ibscope's temporary files (``x.tmp``, ``x.tmp.npz``, ``.fig.tmp.png``): never part of a fingerprint."""
    return name.endswith(".tmp") or ".tmp." in name


def _write_json_atomic(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class ContentHashes:
    """sha256 of files, remembered by (path, size, mtime_ns) so unchanged files are hashed once.

    ``record(path)`` describes a file (``{"size", "mtime_ns", "sha256"}``) or a folder
    (``{"folder": true, "sha256", "files": {relative path: file record}}``, temporary files left
    out; its sha256 covers the list of files and their contents), or is ``None`` when the path
    does not exist. Records read back from a stamp seed the cache (:meth:`remember`).
    """

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int], str] = {}

    def remember(self, path: str | os.PathLike, rec: Any) -> None:
        if not isinstance(rec, dict):
            return
        if rec.get("folder"):
            for rel, f in (rec.get("files") or {}).items():
                self.remember(Path(path) / rel, f)
        elif isinstance(rec.get("sha256"), str) and isinstance(rec.get("size"), int) and isinstance(rec.get("mtime_ns"), int):
            self._known[(os.path.abspath(path), rec["size"], rec["mtime_ns"])] = rec["sha256"]

    def _file(self, p: Path) -> dict:
        st = p.stat()
        key = (os.path.abspath(p), st.st_size, st.st_mtime_ns)
        h = self._known.get(key)
        if h is None:
            d = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    d.update(block)
            h = d.hexdigest()
            self._known[key] = h
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h}

    def record(self, path: str | os.PathLike) -> dict | None:
        p = Path(path)
        if p.is_dir():
            files = {q.relative_to(p).as_posix(): self._file(q) for q in sorted(p.rglob("*"))
                     if q.is_file() and not any(_is_temp(part) for part in q.relative_to(p).parts)}
            return {"folder": True, "sha256": _hash({k: v["sha256"] for k, v in files.items()}), "files": files}
        if p.is_file():
            return self._file(p)
        return None


def _same(a: dict | None, b: dict | None) -> bool:
    return (a is None) == (b is None) and (a or {}).get("sha256") == (b or {}).get("sha256")


def _difference(old: dict | None, new: dict | None) -> tuple[str, str, str] | None:
    """How a path changed between two records: (file inside a folder or '', 'missing' | 'new' |
    'changed', size detail), or None when its contents are the same."""
    if _same(old, new):
        return None
    if new is None or old is None:
        return "", "missing" if new is None else "new", ""
    if old.get("folder") and new.get("folder"):
        of, nf = old.get("files") or {}, new.get("files") or {}
        for rel in sorted(set(of) | set(nf)):
            if rel not in nf or rel not in of:
                return rel, "missing" if rel not in nf else "new", ""
            if not _same(of[rel], nf[rel]):
                return rel, "changed", _sizes(of[rel], nf[rel])
    return "", "changed", _sizes(old, new)


def _sizes(old: dict, new: dict) -> str:
    a, b = old.get("size"), new.get("size")
    return f"{a} -> {b} bytes" if isinstance(a, int) and isinstance(b, int) and a != b else ""


@dataclass
class Stage:
    """One unit of work: what it depends on and how to make its outputs.

    ``inputs``: files or folders it reads (their contents are part of its fingerprint, and so are
    the model factory's source files when listed here); ``upstream``: stages whose runs it follows.
    """

    name: str
    config: Any
    inputs: list[Path]
    upstream: list[str]
    run: Callable[[], list[Path]]
    label: str = ""


@dataclass
class StageStatus:
    name: str
    status: str  # "ran" | "skipped" | "disabled"
    seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)
    reason: str = ""


class StageRunner:
    """Runs stages in order, skipping those whose stamp says they are up to date.

    A stage's stamp (``OUT/.ibscope/stages/<stage>.json``) records its fingerprint: the hash of
    its config section, the digests of the upstream stages' last runs, the sha256 of each input
    file (folders: of their file list and contents) and the ibscope version; and, when it
    finished, the sha256 of each output. The stage runs again when any of these differs, an input
    or output is missing, or an output changed since the stage wrote it (edited, truncated).
    Hashes are cached in the stamp by (path, size, mtime_ns), so unchanged files are not re-read.
    """

    def __init__(self, out: Path, *, force: bool = False, only: Sequence[str] | None = None,
                 reporter: Reporter | None = None, base: Path | None = None):
        self.out = Path(out)
        self.base = Path(base) if base is not None else None
        self.force = force
        self.only = set(only) if only else None
        self.digests: dict[str, str] = {}
        self.status: list[StageStatus] = []
        self.reporter = reporter or NullReporter()
        self.hashes = ContentHashes()

    def stamp_path(self, name: str) -> Path:
        return self.out / STAMP_DIR / f"{name}.json"

    def read_stamp(self, name: str) -> dict | None:
        p = self.stamp_path(name)
        if not p.exists():
            return None
        try:
            stamp = json.loads(p.read_text())
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            return {}
        return stamp if isinstance(stamp, dict) else {}

    def show(self, path: str | os.PathLike) -> str:
        """A path as the user knows it: relative to the config's folder or the output folder when inside."""
        p = os.path.abspath(path)
        for root in (self.base, self.out):
            if root is not None:
                r = os.path.abspath(root)
                if p.startswith(r + os.sep):
                    return os.path.relpath(p, r)
        return p

    def input_records(self, st: Stage) -> dict[str, dict | None]:
        return {os.path.abspath(p): self.hashes.record(p) for p in st.inputs}

    def output_records(self, outputs: Sequence[Path]) -> dict[str, dict | None]:
        return {os.path.relpath(inside(self.out, p, "stage output"), self.out.resolve()): self.hashes.record(p)
                for p in outputs}

    def _seed(self, stamp: dict) -> None:
        for p, rec in (stamp.get("inputs") or {}).items():
            self.hashes.remember(p, rec)
        for rel, rec in (stamp.get("output_hashes") or {}).items():
            self.hashes.remember(self.out / rel, rec)

    def _input_change(self, p: str, old_in: dict, new_in: dict) -> str:
        """Why input ``p`` makes the stage run again ('' when it does not)."""
        shown = self.show(p)
        if p not in new_in:
            return f"input {shown} was deleted" if not os.path.exists(p) else f"{shown} is no longer an input"
        if p not in old_in:
            return f"input {shown} is new" if new_in[p] is not None else f"input {shown} is missing"
        diff = _difference(old_in[p], new_in[p])
        if diff is None:
            return ""
        sub, kind, size = diff
        name = f"{shown}/{sub}" if sub else shown
        words = {"missing": "was deleted", "new": "is new", "changed": "changed"}[kind]
        return f"input {name} {words}" + (f" ({size})" if size else "")

    def up_to_date(self, st: Stage, cfg_hash: str, up: dict) -> tuple[bool, str, list[Path]]:
        stamp = self.read_stamp(st.name)
        if stamp is None:
            return False, "never ran here", []
        if stamp.get("format") != STAMP_FORMAT:
            return False, ("its stamp is unreadable" if not stamp else
                           f"its stamp has an older format (written by ibscope {stamp.get('ibscope_version', '?')})"), []
        if stamp.get("ibscope_version") != __version__:
            return False, f"ibscope version changed {stamp.get('ibscope_version')} -> {__version__}", []
        if stamp.get("config_hash") != cfg_hash:
            return False, "its config changed", []
        if stamp.get("upstream") != up:
            return False, "an earlier stage ran again", []
        self._seed(stamp)
        old_in = stamp.get("inputs") or {}
        new_in = self.input_records(st)
        for p in sorted(set(old_in) | set(new_in)):
            why = self._input_change(p, old_in, new_in)
            if why:
                return False, why, []
        old_out = stamp.get("output_hashes") or {}
        outputs = [self.out / rel for rel in stamp.get("outputs", [])]
        for rel, p in zip(stamp.get("outputs", []), outputs):
            diff = _difference(old_out.get(rel), self.hashes.record(p))
            if diff is None:
                continue
            sub, kind, size = diff
            if not sub and kind == "missing":
                return False, f"output {rel} is missing", []
            detail = f"{sub} {'is ' if kind != 'changed' else ''}{kind}" if sub else ""
            detail = ", ".join(x for x in (detail, size) if x)
            return False, f"output {rel} changed since it was written" + (f" ({detail})" if detail else ""), []
        # same contents: refresh the (size, mtime_ns) cache of touched files so they are not re-hashed next time
        new_out = self.output_records(outputs)
        if new_in != old_in or new_out != old_out:
            _write_json_atomic(self.stamp_path(st.name), {**stamp, "inputs": new_in, "output_hashes": new_out})
        return True, "up to date", outputs

    def __call__(self, st: Stage) -> list[Path]:
        cfg_hash = _hash(st.config)
        up = {u: self.digests[u] for u in st.upstream if u in self.digests}
        selected = self.only is None or st.name in self.only
        ok, reason, outputs = self.up_to_date(st, cfg_hash, up)
        if ok and not self.force or not selected:
            if not ok and not selected:
                stamp = self.read_stamp(st.name)
                if not stamp or "digest" not in stamp:
                    raise UsageError(f"Stage '{st.name}' has not run yet in '{self.out}', so it cannot be left out.",
                                     hint="Run without --only first.")
                outputs = [self.out / p for p in stamp.get("outputs", [])]
                reason = f"not selected by --only, though not up to date: {reason}"
            self.digests[st.name] = (self.read_stamp(st.name) or {})["digest"]
            self.status.append(StageStatus(st.name, "skipped", 0.0, outputs, reason))
            self.reporter.info(f"- {st.label or st.name}: skipped ({reason})")
            return outputs
        why = "forced" if (ok and self.force) else reason
        self.reporter.info(f"> {st.label or st.name} ({why})")
        self.stamp_path(st.name).unlink(missing_ok=True)  # a failed run leaves no stale stamp
        inputs = self.input_records(st)  # what the stage reads, as it was when it started
        t0 = time.perf_counter()
        outputs = [Path(p) for p in st.run()]
        dt = time.perf_counter() - t0
        out_recs = self.output_records(outputs)
        digest = _hash({"config": cfg_hash, "upstream": up, "inputs": {k: (v or {}).get("sha256") for k, v in inputs.items()},
                        "outputs": {k: (v or {}).get("sha256") for k, v in out_recs.items()}, "time": time.time()})
        _write_json_atomic(self.stamp_path(st.name), {
            "format": STAMP_FORMAT, "stage": st.name, "ibscope_version": __version__,
            "config_hash": cfg_hash, "config": st.config, "upstream": up, "digest": digest,
            "inputs": inputs, "outputs": list(out_recs), "output_hashes": out_recs,
            "seconds": dt, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        self.digests[st.name] = digest
        self.status.append(StageStatus(st.name, "ran", dt, outputs, why))
        self.reporter.info(f"  done in {dt:.1f} s")
        return outputs
