"""Names that become parts of file paths, and paths that must stay inside an output folder.

Config names (run name, probe-set and subset names, split names) are joined into output paths
(``OUT/stores/<probe>``, ``OUT/data/<subset>.npz``, ``ibscope-runs/<name>``). A name such as
``../../x`` would write outside the output folder, so every such name must match
:data:`SAFE_NAME` (checked by :func:`safe_name`), and every output path is resolved and checked
to lie inside its output folder (:func:`inside`). Both raise :class:`~ibscope.errors.UsageError`
(exit code 2) before anything is written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ibscope.errors import UsageError

#: a name that may become a file or folder name: starts with a letter or digit, then letters,
#: digits, '.', '_' or '-', at most 128 characters in all
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

NAME_RULE = ("1-128 letters, digits, '.', '_' or '-', starting with a letter or digit, without '.tmp' "
             "(ibscope's temporary files) and not ending in '.lock' (its lock files)")


def safe_name(value: object, what: str) -> str:
    """Return ``value`` if it is a safe path part, else raise a UsageError naming ``what`` and the value.

    ``what`` names the config key, e.g. ``"a 'data.probes' key"`` or ``"'name'"``.
    """
    if not isinstance(value, str):
        raise UsageError(f"{what} must be a name ({NAME_RULE}). Got {type(value).__name__} {value!r}.")
    low = value.lower()
    if not SAFE_NAME.match(value) or ".tmp" in low or low.endswith(".lock"):
        raise UsageError(f"{what} {value!r} is not a safe name: it becomes part of a file path, so it must be "
                         f"{NAME_RULE}.", hint=f"Rename it, e.g. {_suggest(value)!r}.")
    return value


def _suggest(value: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", value).replace(".tmp", "_tmp").lstrip("._-")
    if s.lower().endswith(".lock"):
        s = s[:-5] + "_lock"
    return (s or "name")[:128]


def inside(root: str | os.PathLike, path: str | os.PathLike, what: str = "output path") -> Path:
    """``path`` resolved (symlinks followed), after checking that it lies inside ``root`` (also resolved).

    Raises UsageError naming ``what``, the path and the folder when it does not.
    """
    r = Path(root).resolve()
    p = Path(path)
    p = (p if p.is_absolute() else r / p).resolve()
    if p != r and r not in p.parents:
        given = Path(path) if Path(path).is_absolute() else Path(root) / path
        linked = ".." not in given.parts and given.absolute().is_relative_to(Path(root).absolute())
        raise UsageError(f"The {what} '{p}' lies outside the output folder '{r}'"
                         + (f" (through a symbolic link: '{given}')." if linked else "."),
                         hint="A symbolic link inside the output folder points outside it: remove the link or choose "
                              "another output folder." if linked else
                         "Names in the config become parts of paths inside the output folder; "
                         "they must not contain '/' or '..'.")
    return p


def prepare_output(path: str | os.PathLike, *, folder: bool, what: str, create: bool = True) -> Path:
    """Check that ``path`` can be written as a ``folder`` (or a file) and (``create``) make the folders.

    A usage error (exit 2) before any work when ``path`` or one of its parents is the wrong kind:
    an existing file where a folder is needed (``-o results.csv`` for figures, or
    ``-o afile/r.html``), or an existing folder where a file is needed. A parent the system
    refuses to create is an :class:`~ibscope.errors.IOFailure` naming it. Returns ``Path(path)``.
    """
    from ibscope.errors import io_error

    p = Path(path)
    if p.exists():
        if folder and not p.is_dir():
            raise UsageError(f"The {what} '{p}' is a file; expected a folder (or a path that does not exist yet).",
                             hint="Pass a folder with -o, e.g. a new name.")
        if not folder and p.is_dir():
            raise UsageError(f"The {what} '{p}' is a folder; expected the path of a file to write.",
                             hint="Pass a file name with -o, e.g. a new name inside that folder.")
    check_parents(p, what)
    if not create:  # checked before any work; the folders are made when the first file is written
        return p
    target = p if folder else p.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise io_error(exc, str(target), f"creating the folder for the {what}") from None
    return p


def check_parents(path: str | os.PathLike, what: str) -> None:
    """Usage error (exit 2) when the nearest existing parent of ``path`` is a file: ``-o afile/x``
    would otherwise fail later with an OS error ("File exists", "Not a directory")."""
    p = Path(path)
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"Cannot write the {what} '{p}': '{parent}' is a file, not a folder.",
                                 hint="Choose an output path whose parent folders are folders.")
            return
