"""Careful HDF5 I/O for ibscope's own files: writes that fail cleanly, reads that check first.

Writing. HDF5 must never see a failed write. When one of its writes fails (disk full, quota,
I/O error) the library is left in a state that it cannot recover from: closing the file
retries the flush, fails again, and HDF5 2.0's ``H5D_close`` then frees a dataset that is still
registered; the next close of that dataset (h5py deallocating its handle, or the library's
own shutdown) dereferences freed memory and the process dies with a segmentation fault.
:class:`GuardedFile` is therefore the file under every HDF5 file ibscope writes (h5py's
``fileobj`` driver): the first failed write is recorded, the file switches to *discard mode*
(later writes are kept in memory only, so that HDF5 reads back what it wrote) and HDF5 is told
that all went well. The caller checks :attr:`GuardedFile.error` after each step and, on an
error, closes the file (which cannot fail now), deletes it and reports the OS error with the
path (:func:`ibscope.errors.io_error`). :class:`AtomicH5` wraps this in the tmp-then-rename
pattern: a file is written as ``NAME.tmp`` and renamed to ``NAME`` only when complete.

Reading. :class:`Attrs` parses attributes with type checks (JSON that is malformed, not a
mapping, or nested too deeply is one :class:`~ibscope.errors.DataError` naming the file and
the attribute), and :func:`check_storage` compares a dataset's declared size with the bytes
the file really holds before anything is allocated for it.
"""

from __future__ import annotations

import builtins
import errno as _errno
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ibscope.errors import DataError, io_error

#: largest JSON attribute ibscope parses (a capture config is a few KiB)
MAX_JSON_CHARS = 8 * 1024 * 1024
#: deepest nesting accepted in a JSON attribute
MAX_JSON_DEPTH = 32
#: a compressed dataset may declare at most this many times the bytes it stores (gzip's
#: best case, all zeros, is about 1030:1; lzf's about 100:1)
MAX_COMPRESSION_RATIO = 2000
_FILTER_FLETCHER32 = 3  # H5Z_FILTER_FLETCHER32

# errors of the operating system (not of the file's content): reported as I/O errors
_OS_ERRNOS = {_errno.EACCES, _errno.EPERM, _errno.EIO, _errno.ENOSPC, _errno.EROFS, _errno.EMFILE, _errno.ENFILE,
              _errno.ENOMEM, _errno.EDQUOT, _errno.ENOENT, _errno.ENOTDIR, _errno.EISDIR, _errno.ESTALE}


def os_error_of(exc: BaseException) -> OSError | None:
    """The operating-system error behind an exception, or None. h5py raises OSError with
    ``errno`` set for failed system calls, and sometimes a RuntimeError whose text carries
    ``errno = N``; an OSError without errno (``file signature not found``, ``truncated file``)
    is about the file's content, not the system."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc
    m = re.search(r"errno = (\d+)", str(exc)) if isinstance(exc, (OSError, RuntimeError)) else None
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code))
    return None


def is_system_error(exc: BaseException) -> bool:
    e = os_error_of(exc)
    return e is not None and e.errno in _OS_ERRNOS


def h5_message(exc: BaseException, limit: int = 240) -> str:
    """h5py's error text, shortened (its messages can hold a whole error stack)."""
    text = " ".join(str(exc).split())
    m = re.match(r"^Unable to (?:synchronously )?open file \((.*)\)$", text)
    if m:
        text = m.group(1)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ============================================================================ writing
class GuardedFile:
    """A file-like object for h5py's ``fileobj`` driver whose writes never fail towards HDF5.

    The first write (or truncate) that the operating system refuses is kept in :attr:`error`;
    from then on the file is in discard mode: nothing more goes to disk, writes are kept in
    memory and served back to reads, and HDF5 can close the file normally. A
    ``KeyboardInterrupt`` arriving inside a write is kept the same way (raising it into
    HDF5's C code would leave the library in the broken state described in the module doc).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        self.fd = os.open(self.path, flags, 0o666)
        self.pos = 0
        self.size = 0
        self.error: BaseException | None = None
        self._overlay: list[tuple[int, bytes]] = []
        self._discard = False

    # -- the part of the file protocol h5py's fileobj driver uses ----------------------------
    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 0:
            self.pos = int(pos)
        elif whence == 1:
            self.pos += int(pos)
        else:
            self.pos = self.size + int(pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        n, pos, done = len(mv), self.pos, 0
        if not self._discard:
            try:
                while done < n:
                    k = os.pwrite(self.fd, mv[done:], pos + done)
                    if k <= 0:
                        raise OSError(_errno.EIO, os.strerror(_errno.EIO))
                    done += k
            except BaseException as exc:  # noqa: BLE001 - HDF5 must not see it; the owner re-raises it
                self._fail(exc)
        if done < n:
            self._overlay.append((pos + done, bytes(mv[done:])))
        self.pos = pos + n
        self.size = max(self.size, self.pos)
        return n

    def read(self, n: int = -1) -> bytes:
        pos = self.pos
        if n is None or n < 0:
            n = max(0, self.size - pos)
        buf = bytearray(n)
        got = 0
        try:
            while got < n:
                chunk = os.pread(self.fd, n - got, pos + got)
                if not chunk:
                    break  # past the end on disk: zeros, as HDF5's own driver reads
                buf[got:got + len(chunk)] = chunk
                got += len(chunk)
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)
        for off, data in self._overlay:  # what discard mode kept, in write order
            lo, hi = max(off, pos), min(off + len(data), pos + n)
            if lo < hi:
                buf[lo - pos:hi - pos] = data[lo - off:hi - off]
        self.pos = pos + n
        return bytes(buf)

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else int(size)
        if not self._discard:
            try:
                os.ftruncate(self.fd, size)
            except BaseException as exc:  # noqa: BLE001
                self._fail(exc)
        self.size = size
        return size

    def flush(self) -> None:
        pass

    # -- owner side --------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._discard = True

    def discard(self) -> None:
        """Write nothing more to disk (the file is going to be deleted)."""
        self._discard = True

    def fsync(self) -> None:
        os.fsync(self.fd)

    def sync_data(self) -> None:
        """Push the data written so far to the disk now (``fdatasync``), so that the final
        :meth:`fsync` has little left to do. A refusal is recorded like a refused write."""
        if self._discard:
            return
        try:
            (getattr(os, "fdatasync", None) or os.fsync)(self.fd)
        except BaseException as exc:  # noqa: BLE001 - reported through error, as for writes
            self._fail(exc)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self.fd < 0


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort: not every platform or file system supports it)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicH5:
    """An HDF5 file written as ``FINAL.tmp`` and renamed to ``FINAL`` by :meth:`commit`.

    ``f``: the open ``h5py.File``. After writing through it, call :meth:`check` (raises
    :class:`~ibscope.errors.IOFailure` naming ``FINAL`` if the system refused a write, after
    deleting the tmp file). :meth:`abort` discards the file; it never raises. Used as a context
    manager, an exception in the block aborts and a clean exit commits.
    """

    def __init__(self, final: str | os.PathLike, what: str = "writing"):
        import h5py

        self.final = Path(final)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        self.what = what
        self.f: Any = None  # the h5py.File (h5py is untyped)
        self.raw: GuardedFile | None = None
        try:
            self.tmp.unlink(missing_ok=True)
            self.raw = GuardedFile(self.tmp)
        except OSError as exc:
            raise io_error(exc, self.tmp, "creating") from None
        try:
            self.f = h5py.File(self.raw, "w")
        except BaseException:
            self.abort()
            raise
        self.check()

    def __enter__(self) -> AtomicH5:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        self.commit()

    def check(self) -> None:
        """Raise the first refused write (as IOFailure naming the file), deleting the tmp file."""
        err = self.raw.error if self.raw is not None else None
        if err is None:
            return
        self.abort()
        if isinstance(err, OSError):
            failure = io_error(err, self.final, self.what)
            failure.message += " The partial file was removed."
            raise failure from None
        raise err

    def commit(self) -> Path:
        try:
            self.f.flush()
            self.f.close()
        except BaseException:
            self.abort()
            raise
        self.check()
        try:
            assert self.raw is not None  # opened in __init__
            self.raw.fsync()
            self.raw.close()
            os.replace(self.tmp, self.final)
        except OSError as exc:
            self.abort()
            failure = io_error(exc, self.final, self.what)
            failure.message += " The partial file was removed."
            raise failure from None
        _fsync_dir(self.final.parent)
        return self.final

    def abort(self) -> None:
        """Close without writing anything more and delete the tmp file. Never raises."""
        if self.raw is not None:
            self.raw.discard()
        f, self.f = self.f, None
        if f is not None:
            try:
                if f.id.valid:
                    f.close()
            except Exception:  # noqa: BLE001 - nothing reaches the disk in discard mode
                pass
        if self.raw is not None:
            try:
                self.raw.close()
            except OSError:
                pass
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass


# ============================================================================ reading
def _depth_ok(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            if d > limit:
                return False
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return True


def parse_json(text: str, *, where: str, kind: type | tuple = dict) -> Any:
    """``json.loads`` with the failures a crafted file can cause turned into one DataError."""
    if len(text) > MAX_JSON_CHARS:
        raise DataError(f"{where} holds {len(text)} characters of JSON; at most {MAX_JSON_CHARS} are expected.")
    try:
        val = json.loads(text)
    except RecursionError:
        raise DataError(f"{where} is JSON nested too deeply (expected at most {MAX_JSON_DEPTH} levels).") from None
    except ValueError as exc:
        raise DataError(f"{where} is not valid JSON ({exc}).") from None
    if not _depth_ok(val, MAX_JSON_DEPTH):
        raise DataError(f"{where} is JSON nested too deeply (expected at most {MAX_JSON_DEPTH} levels).")
    if not isinstance(val, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        want = {"dict": "a JSON object", "list": "a JSON list"}.get(want, want)
        raise DataError(f"{where} must be {want}; got {describe(val)}.")
    return val


def describe(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return f"an array of shape {v.shape} ({v.dtype})"
    if isinstance(v, (list, dict)):
        return f"a JSON {'list' if isinstance(v, list) else 'object'}"
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


class Attrs:
    """Typed, checked access to the attributes of one HDF5 object.

    ``label``: how errors name the object, e.g. ``"'acts/manifest.h5'"`` or
    ``"'acts/checkpoints/x.h5', dataset 'acts/fc1'"``. Every failure is a DataError
    ``"<label>: attribute 'config' is not valid JSON (...)"``.
    """

    _MISSING = object()

    def __init__(self, obj, label: str):
        self.obj = obj
        self.label = label
        self._attrs = obj.attrs  # h5py builds a new manager on every ``.attrs``

    def where(self, key: str) -> str:
        return f"{self.label}: attribute '{key}'"

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        try:
            present = key in self._attrs
            val = self._attrs[key] if present else None
        except Exception as exc:  # noqa: BLE001 - a damaged attribute header or an unreadable type
            if is_system_error(exc):
                raise
            raise DataError(f"{self.where(key)} cannot be read ({h5_message(exc)}).") from None
        if not present:
            if default is self._MISSING:
                raise DataError(f"{self.label} has no attribute '{key}'.")
            return default
        return val

    def str(self, key: str, default: Any = _MISSING) -> Any:
        v = self.raw(key, default)
        if v is default and default is not self._MISSING:
            return v
        if isinstance(v, np.ndarray) and v.shape == () and v.dtype.kind in "SUO":
            v = v.item()
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{self.where(key)} is not UTF-8 text.") from None
        if not isinstance(v, str):
            raise DataError(f"{self.where(key)} must be a string; got {describe(v)}.")
        return str(v)

    def int(self, key: builtins.str, default: Any = _MISSING, *, minimum: builtins.int | None = None) -> Any:
        v = self.raw(key, default)
        if v is default and default is not self._MISSING:
            return v
        if isinstance(v, np.ndarray) and v.shape == ():
            v = v[()]
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise DataError(f"{self.where(key)} must be an integer; got {describe(v)}.")
        v = int(v)
        if minimum is not None and v < minimum:
            raise DataError(f"{self.where(key)} must be >= {minimum}; got {v}.")
        return v

    def float(self, key: builtins.str, default: Any = _MISSING) -> Any:
        v = self.raw(key, default)
        if v is default and default is not self._MISSING:
            return v
        if isinstance(v, np.ndarray) and v.shape == ():
            v = v[()]
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise DataError(f"{self.where(key)} must be a number; got {describe(v)}.")
        return float(v)

    def bool(self, key: builtins.str, default: Any = _MISSING) -> Any:
        v = self.raw(key, default)
        if v is default and default is not self._MISSING:
            return v
        if isinstance(v, np.ndarray) and v.shape == ():
            v = v[()]
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        if isinstance(v, (int, np.integer)) and int(v) in (0, 1):
            return bool(v)
        raise DataError(f"{self.where(key)} must be true or false; got {describe(v)}.")

    def int_array(self, key: builtins.str, *, ndim: builtins.int = 1, max_len: builtins.int | None = None) -> np.ndarray:
        v = self.raw(key)
        if not isinstance(v, np.ndarray) or v.ndim != ndim or v.dtype.kind not in "iu":
            raise DataError(f"{self.where(key)} must be a {ndim}-D integer array; got {describe(v)}.")
        if max_len is not None and v.size > max_len:
            raise DataError(f"{self.where(key)} has {v.size} entries; at most {max_len} expected.")
        return v

    def json(self, key: builtins.str, default: Any = _MISSING, *, kind: type | tuple = dict) -> Any:
        text = self.str(key, default)
        if text is default and default is not self._MISSING:
            return default
        return parse_json(text, where=self.where(key), kind=kind)


def declared_nbytes(ds) -> int:
    return int(math.prod(int(s) for s in ds.shape)) * int(ds.dtype.itemsize)


def check_storage(ds, label: str) -> None:
    """Refuse a dataset whose declared size the file cannot hold: uncompressed data must be
    stored in full; compressed data may be at most :data:`MAX_COMPRESSION_RATIO` times smaller.
    Reads only the dataset's storage index, never its data."""
    nbytes = declared_nbytes(ds)
    if nbytes == 0:
        return
    try:
        stored = int(ds.id.get_storage_size())
        plist = ds.id.get_create_plist()
        # filters that can make the data smaller (fletcher32 only adds a checksum per chunk)
        shrinking = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        shrinking = [code for code in shrinking if code != _FILTER_FLETCHER32]
    except Exception as exc:  # noqa: BLE001
        if is_system_error(exc):
            raise
        raise DataError(f"{label}: its storage cannot be read ({h5_message(exc)}).") from None
    if (not shrinking and stored < nbytes) or stored * MAX_COMPRESSION_RATIO < nbytes:
        raise DataError(f"{label} declares shape {tuple(int(s) for s in ds.shape)} ({_size(nbytes)}) but the file "
                        f"holds only {_size(stored)} of its data; it is truncated or crafted.")


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"
