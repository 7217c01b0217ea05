"""The results table and its provenance sidecar stay a pair: the sidecar records the table's
sha256, readers warn when the table is not the one it describes, and a refused write names the
file and leaves the earlier pair as it was."""

from __future__ import annotations

import errno
import hashlib
import os
import warnings

import pytest

from ibscope.errors import IOFailure
from ibscope.results import make_row, provenance_path, read_results, write_results


def _rows(v):
    return [make_row(checkpoint=0, epoch=1, layer="fc", layer_index=0, estimator="binning", quantity="I(T;Y)",
                     value=v, unit="nats", n_samples=10)]


def test_sidecar_names_the_table_and_a_changed_table_is_flagged(tmp_path):
    p = write_results(tmp_path / "r.csv", _rows(0.5), {"stores": []})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the pair as written: no warning
        res = read_results(p)
    assert res.provenance["table_sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert "table_matches" not in res.provenance
    p.write_text(p.read_text().replace("0.5", "0.25"))  # an edit (or the old table after a crash)
    with pytest.warns(UserWarning, match="does not describe"):
        res = read_results(p)
    assert res.provenance["table_matches"] is False and res.rows[0]["value"] == 0.25


def test_refused_write_names_the_file_and_keeps_the_old_pair(tmp_path, monkeypatch):
    p = write_results(tmp_path / "r.csv", _rows(0.5), {"run": 1})
    before = (p.read_bytes(), provenance_path(p).read_bytes())
    real = os.replace

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(IOFailure) as ei:
        write_results(p, _rows(0.75), {"run": 2})
    monkeypatch.setattr(os, "replace", real)
    assert ei.value.message == f"No space left on device (ENOSPC) while writing the results table '{p}'."
    assert (p.read_bytes(), provenance_path(p).read_bytes()) == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["r.csv", "r.provenance.json"]
