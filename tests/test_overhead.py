"""Issue 17, "no per-cell overhead": the fast paths of the binning family give the same numbers
as the computation they replace, and the work shared between cells gives the same rows as a
cold computation.

* ``row_codes`` numbers rows exactly as ``torch.unique(dim=0, return_inverse=True)``;
* the arithmetic digitize equals ``torch.searchsorted`` (and falls back to it off the grid);
* a reference implementation of the plug-in computation as it was before (``torch.unique``
  rows, ``searchsorted`` edges, entropies from ``bincount``, the null re-estimated per
  permutation) gives the rows of ``ibscope estimate`` to 1e-12 on a fixture store;
* the store-level sides (ids, labels), the per-cell layer side and the permutations drawn once
  per store give the same rows as the path without them; the API's content-keyed sides give
  the same estimates as a cold computation, also after the caller changes an array in place;
* ``few_threads`` restores the thread count; the store opens each shard once for all its layers.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import ibscope
from ibscope.estimate import run_estimate
from ibscope.estimators import _fast, binning, registry
from ibscope.estimators.nulls import permutations, summarize
from ibscope.store import StoreWriter, open_store

TOL = 1e-12
IDNNS = {"n_bins": 29, "range_min": -1.0, "range_max": 1.0, "outside": "idnns"}
SETTINGS = [
    ("binning", IDNNS),
    ("binning", {}),                                       # n_bins over the layer's own range
    ("binning", {"bin_width": 0.07}),                       # ibsgd's unbounded grid
    ("binning", {"n_bins": 10, "range_min": -0.5, "range_max": 0.5, "outside": "separate"}),
    ("binning", {"n_bins": 7, "range_min": -0.3, "range_max": 0.7}),   # edges not float32-exact
    ("adaptive-binning", {}),
    ("chelombiev-binning", {}),
]


# --------------------------------------------------------------------------- unique rows
def _unique_rows(t):
    return torch.unique(t, dim=0, return_inverse=True)[1].reshape(-1)


@pytest.mark.parametrize("case", range(12))
def test_row_codes_number_rows_as_torch_unique(case):
    g = torch.Generator().manual_seed(case)
    t = [
        torch.randint(0, 31, (4096, 10), generator=g),                     # IDNNs' bins, 10 units
        torch.randint(-5, 3, (500, 3), generator=g),                       # negative values
        torch.randint(-2 ** 62, 2 ** 62, (300, 4), generator=g),           # ranges too wide for radix
        torch.randint(0, 2, (100, 70), generator=g),                       # 2**70 codes: compaction needed
        torch.tensor([[-0.0, 1.0], [0.0, 1.0], [0.5, -2.0], [0.5, -2.0]]),  # -0.0 equals 0.0
        torch.randn(200, 3, generator=g).round(decimals=1),                # floats with ties
        torch.randint(0, 3, (1000, 1), generator=g).to(torch.int32),
        torch.tensor([[2 ** 63 - 1], [-2 ** 63], [0], [-2 ** 63]]),       # int64 extremes
        torch.randint(0, 4000, (4096, 25), generator=g),                   # wide, many distinct rows
        torch.randint(0, 2, (50, 4), generator=g).to(torch.bool),
        torch.randint(0, 7, (300,), generator=g),                          # 1-D
        torch.full((20, 3), 4),                                            # one distinct row
    ][case]
    want = _unique_rows(t.reshape(t.shape[0], -1))
    got, k = _fast.row_codes_count(t)
    assert got.dtype == torch.int64
    assert torch.equal(got, want)
    assert k == int(want.max()) + 1


def test_row_codes_with_known_spans_give_the_same_symbols():
    g = torch.Generator().manual_seed(1)
    b = torch.randint(0, 31, (2000, 6), generator=g)
    b[:, 2] = 0  # a column that uses only part of its range
    assert torch.equal(_fast.row_codes(b, [31] * 6), _unique_rows(b))
    assert torch.equal(_fast.row_codes(b, [40] * 6), _unique_rows(b))


# --------------------------------------------------------------------------- digitize
@pytest.mark.parametrize("lo,hi,n_bins", [(-1.0, 1.0, 29), (-0.3, 0.7, 7), (0.1, 0.9, 1000), (-1e-3, 2e-3, 3),
                                          (1e6, 1e6 + 1, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_digitize_equals_searchsorted(lo, hi, n_bins, dtype):
    rng = np.random.default_rng(n_bins)
    e32 = np.linspace(lo, hi, n_bins + 1).astype(np.float32).astype(np.float64)
    span = hi - lo
    v = np.concatenate([rng.uniform(lo - span, hi + span, 20000), e32, np.nextafter(e32, -np.inf),
                        np.nextafter(e32, np.inf), [lo, hi, -1e30, 1e30, 0.0]])
    t = torch.from_numpy(v).to(dtype)
    edges, grid, _ = binning._edge_tables(lo, hi, n_bins, dtype, "cpu")
    want = torch.searchsorted(torch.from_numpy(e32), t.to(torch.float64).contiguous(), right=True)
    assert torch.equal(binning._digitize(t, edges, grid), want)
    if (lo, hi) == (1e6, 1e6 + 1):
        assert grid is None  # float32 edges coarser than the bins: searchsorted itself


def test_outside_counts_in_float32_use_the_float64_range():
    # range ends that float32 cannot hold: a float32 value v is outside when v < lo or v > hi in float64
    lo, hi = -0.3, 0.7
    c = np.float32(lo)
    vals = np.array([np.nextafter(c, -1), c, np.nextafter(c, 1), np.float32(hi), np.nextafter(np.float32(hi), 2),
                     np.nextafter(np.float32(hi), -2), 0.0], dtype=np.float32)
    want = int(((vals.astype(np.float64) < lo) | (vals.astype(np.float64) > hi)).sum())
    est = registry.create("binning", n_bins=7, range_min=lo, range_max=hi, outside="separate")
    assert est._bin(torch.from_numpy(vals).reshape(-1, 1))[1] == want
    assert 0 < want < len(vals)


# --------------------------------------------------------------------------- the fixture store
N, LAYERS, EPOCHS = 600, {"wide": 6, "narrow": 2, "dead": 3}, (0, 5, 40)


def _acts(epoch, name, rng):
    d = LAYERS[name]
    if name == "dead" and epoch == 5:
        return np.zeros((N, d), dtype=np.float32)  # a constant layer: value 0 by the degenerate rule
    scale = 0.2 + epoch / 10  # grows past the [-1, 1] range: values outside it
    return np.tanh(scale * rng.standard_normal((N, d))).astype(np.float32) * (1.3 if name == "wide" else 1.0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("overhead") / "store"
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, N).astype(np.int64)
    w = StoreWriter(path, config={"run": "r", "split": "probe"}, sample_ids=np.arange(N), labels=labels,
                    layers={n: {"dims": d} for n, d in LAYERS.items()})
    for e in EPOCHS:
        with w.checkpoint(epoch=e, step=None, path=f"c{e}.pt", sha256=f"{e:064x}") as s:
            for name in LAYERS:
                s.append(name, _acts(e, name, rng))
    return path


# --------------------------------------------------------------------------- the computation before
def _plugin(a, b):
    """Plug-in I(A;B) of two int64 symbol vectors as before: symbols by torch.unique, entropies
    from bincount."""
    def h(c):
        counts = torch.bincount(c).to(torch.float64)
        counts = counts[counts > 0]
        p = counts / counts.sum()
        return float(-(p * p.log()).sum())
    nb = int(b.max()) + 1
    joint = torch.unique(a * nb + b, return_inverse=True)[1]
    mi = h(a) + h(b) - h(joint)
    return max(mi, 0.0) if abs(mi) < 1e-12 else mi


def _symbols_before(name, params, t):
    if not t.is_floating_point():
        return _unique_rows(t)
    est = registry.create(name, **params)
    if name == "binning" and params.get("outside", "clamp") != "clamp":
        lo, hi = float(params["range_min"]), float(params["range_max"])
        edges = torch.from_numpy(np.linspace(lo, hi, params["n_bins"] + 1).astype(np.float32).astype(np.float64))
        b = torch.searchsorted(edges, t.to(torch.float64).contiguous(), right=True)
        if params["outside"] == "idnns":
            b = torch.where(b == 0, torch.full_like(b, params["n_bins"] + 1), b)
    else:
        b = est._bin(t)[0]  # clamp/width grids and the adaptive edges are unchanged code
    return _unique_rows(b.reshape(b.shape[0], -1))


def _before(name, params, x, y, n_perm=0, seed=0):
    """(value, null_mean, null_std, p_value) as the code before computed them."""
    tx, ty = torch.as_tensor(x), torch.as_tensor(y)
    tx, ty = tx.reshape(len(tx), -1), ty.reshape(len(ty), -1)
    if any(t.shape[0] > 1 and bool((t == t[:1]).all()) for t in (tx, ty)):
        return 0.0, (0.0 if n_perm else None), (0.0 if n_perm > 1 else None), (1.0 if n_perm else None)
    a, b = _symbols_before(name, params, tx), _symbols_before(name, params, ty)
    value = _plugin(a, b)
    if not n_perm:
        return value, None, None, None
    nulls = [_plugin(a, b[p]) for p in permutations(len(a), n_perm, seed)]
    return (value, *summarize(value, nulls))


@pytest.mark.parametrize("name,params", SETTINGS, ids=[f"{n}{json.dumps(p)}" for n, p in SETTINGS])
def test_estimate_rows_equal_the_computation_before(store, tmp_path, name, params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run_estimate(store, tmp_path / "r.csv", [name], {name: params}, progress=False, device="cpu",
                           null_permutations=7, null_seed=3)
    st = open_store(store)
    labels = np.asarray(st.labels)
    rows = [r for r in res.rows if r["estimator"] == name]
    assert len(rows) == len(EPOCHS) * len(LAYERS) * 2
    for r in rows:
        t = torch.from_numpy(st.activations(r["checkpoint"], r["layer"]))
        if r["quantity"] == "I(X;T)":
            want = _before(name, params, torch.arange(N), t)
            got = (r["value"], r["null_mean"], r["null_std"], r["p_value"])
        else:
            want = _before(name, params, t, torch.from_numpy(labels), 7, 3)
            got = (r["value"], r["null_mean"], r["null_std"], r["p_value"])
        for g, w in zip(got, want):
            assert (g is None) == (w is None), r
            if w is not None:
                assert abs(g - w) <= TOL, (r["layer"], r["checkpoint"], r["quantity"], g, w)
    assert any(r["value"] == 0.0 and r["layer"] == "dead" for r in rows)  # the constant layer took the rule


def test_shared_sides_give_the_rows_of_a_cold_computation(store, tmp_path, monkeypatch):
    names = ["binning", "adaptive-binning", "chelombiev-binning"]
    params = {"binning": IDNNS}

    def run(out):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return run_estimate(store, out, names, params, progress=False, device="cpu", null_permutations=5)

    shared = run(tmp_path / "shared.csv")
    # the path without shared sides: every estimate from the arrays (est.estimate / with_null)
    monkeypatch.setattr(binning._BinningMixin, "estimate_sides", None)
    cold = run(tmp_path / "cold.csv")
    cols = ["run", "checkpoint", "layer", "estimator", "quantity", "value", "null_mean", "null_std", "p_value",
            "cap", "saturated", "n_samples", "dims", "key", "note"]
    a = [{c: r.get(c) for c in cols} for r in shared.rows]
    b = [{c: r.get(c) for c in cols} for r in cold.rows]
    assert a == b
    assert any(r["note"] for r in a)  # warnings (values outside the range, constant layer) in both
    assert shared.provenance["cells_computed"] == len(EPOCHS) * len(LAYERS)


# --------------------------------------------------------------------------- the API's sides
def test_api_sides_kept_by_content_equal_a_cold_computation():
    rng = np.random.default_rng(3)
    t = np.tanh(rng.standard_normal((800, 5))).astype(np.float32)
    ids, y = np.arange(800), rng.integers(0, 2, 800)
    binning._SIDES.clear()
    warm = [ibscope.mutual_information(ids, t, "binning", **IDNNS), ibscope.mutual_information(t, y, "binning", **IDNNS)]
    assert binning._SIDES  # the layer, ids and labels were kept
    warm2 = [ibscope.mutual_information(ids, t, "binning", **IDNNS), ibscope.mutual_information(t, y, "binning", **IDNNS)]
    binning._SIDES.clear()
    est = registry.create("binning", **IDNNS)
    cold = [est._estimate(est.side(ids, "x"), est.side(t, "y")), est._estimate(est.side(t, "x"), est.side(y, "y"))]
    for w, w2, c in zip(warm, warm2, cold):
        assert w.value == w2.value == c.value
        assert w.extra == w2.extra == c.extra and w.cap == c.cap
    assert warm[0].value == pytest.approx(_before("binning", IDNNS, ids, t)[0], abs=TOL)
    assert warm[1].value == pytest.approx(_before("binning", IDNNS, t, y)[0], abs=TOL)


def test_api_sides_follow_an_array_changed_in_place():
    rng = np.random.default_rng(4)
    t = np.tanh(rng.standard_normal((500, 3)))
    ids = np.arange(500)
    first = ibscope.mutual_information(ids, t, "binning", **IDNNS).value
    keep = t.copy()
    t[:] = 0.25  # the same array object, now constant
    with pytest.warns(RuntimeWarning, match="constant"):
        assert ibscope.mutual_information(ids, t, "binning", **IDNNS).value == 0.0
    t[:] = keep  # back to the first content: the kept side (a private copy) is right again
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        again = ibscope.mutual_information(ids, t, "binning", **IDNNS)
    assert again.value == first and not again.extra.get("constant")
    assert not [w for w in said if "constant" in str(w.message)]


def test_sides_are_not_kept_for_large_or_gpu_like_inputs():
    est = registry.create("binning")
    big = np.zeros((binning.SIDE_CACHE_BYTES // 8 + 1, 1))
    assert binning._side_key(est, big) is None
    assert binning._side_key(est, [[1.0], [2.0]]) is None      # lists: converted every time
    assert binning._side_key(est, np.array([["a"], ["b"]])) is None
    k1 = binning._side_key(est, np.arange(10.0))
    k2 = binning._side_key(est, torch.arange(10.0, dtype=torch.float64))
    k3 = binning._side_key(registry.create("binning", n_bins=7), np.arange(10.0))
    assert k1 is not None and k2 is not None and len({k1, k2, k3}) == 3


# --------------------------------------------------------------------------- threads and shards
def test_few_threads_sets_one_thread_for_small_problems_and_restores():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with _fast.few_threads(10, 100):
            assert torch.get_num_threads() == 1
            with _fast.few_threads(10, 100):
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1  # the inner block does not restore early
        assert torch.get_num_threads() == 2
        with _fast.few_threads(1000, 100):
            assert torch.get_num_threads() == 2  # a big problem keeps the pool
        with pytest.raises(ValueError):
            with _fast.few_threads(10, 100):
                raise ValueError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_api_runs_small_binning_on_one_thread_and_restores(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        orig = binning._BinningMixin.estimate

        def spy(self, x, y):
            seen.append(torch.get_num_threads())
            return orig(self, x, y)

        monkeypatch.setattr(registry.get("binning"), "estimate", spy)
        ibscope.mutual_information(np.arange(100), np.random.rand(100, 2), "binning")
        big = np.random.rand(_fast.SERIAL_ELEMENTS // 2, 2)  # n * (2 + 1) elements: above the threshold
        ibscope.mutual_information(np.arange(len(big)), big, "binning")
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_store_opens_each_shard_once_for_all_its_layers(store, monkeypatch):
    st = open_store(store)
    opened = []
    orig = type(st)._open_shard

    def counting(self, c):
        opened.append(c.shard.name)
        return orig(self, c)

    monkeypatch.setattr(type(st), "_open_shard", counting)
    with st:
        for ck in st.checkpoints:
            for name in LAYERS:
                assert st.activations(ck, name).shape == (N, LAYERS[name])
        assert st._held is not None
    assert st._held is None  # closed on leaving the block
    assert opened == [c.shard.name for c in st.checkpoints]
    st.activations(st.checkpoints[0], "wide")  # usable after close: opens again
    assert len(opened) == len(st.checkpoints) + 1
    st.close()
    assert st._held is None
