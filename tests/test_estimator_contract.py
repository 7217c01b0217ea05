"""The typed estimator contract: kind from the base, constraints declared on the fields and
checked from the table (every invalid value of every field of every registered estimator),
KDE bound variants as registry aliases whose names and cell keys are those of the former
subclasses, and plug-ins loaded through entry points (typed and the older form)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

import ibscope
from ibscope.errors import PluginError, UsageError
from ibscope.estimators import (
    Estimator,
    Integer,
    JacobianEstimator,
    OneOf,
    PairEstimator,
    Real,
    SingleEstimator,
    kind_of,
    param,
    registry,
)
from ibscope.estimators.conformance import ConformanceError, check_estimator, check_parameters
from ibscope.estimators.kde import KDE, AdaptiveKDE, ChelombievKDE
from ibscope.estimators.params import constraints

NAMES = sorted(registry.available())
ALIASES = {"kde-upper": (KDE, "upper"), "kde-lower": (KDE, "lower"), "adaptive-kde-upper": (AdaptiveKDE, "upper"),
           "adaptive-kde-lower": (AdaptiveKDE, "lower"), "chelombiev-kde-upper": (ChelombievKDE, "upper"),
           "chelombiev-kde-lower": (ChelombievKDE, "lower")}


# ------------------------------------------------------------------------------------- constraints
@pytest.mark.parametrize("name", NAMES)
def test_every_invalid_value_of_every_field_is_refused_by_name(name):
    est = registry.create(name)
    table = constraints(type(est))
    assert table, f"{name} declares no parameter constraint"
    # every field of a built-in estimator declares what it accepts
    assert set(table) == {f.name for f in dataclasses.fields(est)}
    checked = check_parameters(est)
    pinned = registry.aliases()[name].fixed if name in registry.aliases() else {}
    want = sum(len(c.invalid()) for f, c in table.items() if f not in pinned)
    assert len(checked) == want and want >= 3 * (len(table) - len(pinned))


def test_messages_say_parameter_expected_and_got():
    cases = [
        ("ksg", {"k": 0}, "The 'k' parameter of ksg must be an integer >= 1. Got 0 instead."),
        ("ksg", {"k": 2.5}, "The 'k' parameter of ksg must be an integer >= 1. Got 2.5 instead."),
        ("ksg", {"k": True}, "The 'k' parameter of ksg must be an integer >= 1. Got True instead."),
        ("ksg", {"algorithm": 3}, "The 'algorithm' parameter of ksg must be 1 or 2. Got 3 instead."),
        ("ksg", {"copula": 2}, "The 'copula' parameter of ksg must be true or false. Got 2 instead."),
        ("ksg", {"search": "ball"}, "The 'search' parameter of ksg must be one of 'auto', 'brute', 'tree'. "
                                    "Got 'ball' instead."),
        ("kde", {"noise_variance": float("inf")},
         "The 'noise_variance' parameter of kde must be a finite number > 0. Got inf instead."),
        ("kde-lower", {"noise_variance": -1.0},
         "The 'noise_variance' parameter of kde-lower must be a finite number > 0. Got -1.0 instead."),
        ("twonn", {"discard_fraction": 1.0},
         "The 'discard_fraction' parameter of twonn must be a finite number in (0, 1). Got 1.0 instead."),
        ("pca-dim", {"fraction": 1.5}, "The 'fraction' parameter of pca-dim must be a finite number in (0, 1]. "
                                       "Got 1.5 instead."),
        ("binning", {"bin_width": 0}, "The 'bin_width' parameter of binning must be a finite number > 0 or None. "
                                      "Got 0 instead."),
        ("matrix-entropy", {"alpha": "2"}, "The 'alpha' parameter of matrix-entropy must be a finite number >= 0. "
                                           "Got '2' instead."),
        ("infonce", {"batch_size": 1}, "The 'batch_size' parameter of infonce must be an integer >= 2. Got 1 instead."),
    ]
    for name, kw, msg in cases:
        with pytest.raises(UsageError) as ei:
            registry.build(name, kw)
        assert str(ei.value).splitlines()[0] == msg
        assert ei.value.exit_code == 2
    # 'name' is a parameter like any other for create (the estimator's name is positional-only)
    with pytest.raises(UsageError, match="Estimator 'ksg' has no parameter 'name'"):
        registry.create("ksg", name="other")
    # the CLI's strings are still converted first (--param k=7), then checked
    assert registry.create("ksg", k="7").k == 7
    with pytest.raises(UsageError, match="The 'k' parameter of ksg must be an integer >= 1. Got 0 instead."):
        registry.create("ksg", k="0")
    # rules between fields stay in validate()
    with pytest.raises(UsageError, match="'fit_end' parameter of alpha-req must be >= fit_start \\+ 2 = 22. Got 20"):
        registry.create("alpha-req", fit_start=20, fit_end=20)
    with pytest.raises(UsageError, match="'range_min' parameter of binning must be smaller than range_max"):
        registry.create("binning", range_min=1.0, range_max=0.0)


def test_check_parameters_catches_an_estimator_that_skips_its_checks():
    @dataclass(frozen=True)
    class Lax(SingleEstimator):
        k: int = param(3, Integer(ge=1))
        mode: str = param("a", OneOf("a", "b"))
        name: ClassVar[str] = "lax-test"

        def __post_init__(self) -> None:  # forgets the declared checks
            pass

        def estimate(self, x):
            return self._make(0.0, n=len(x), dims=(1,))

    with pytest.raises(ConformanceError) as ei:
        check_parameters(Lax)
    msg = str(ei.value)
    assert "k=0: accepted; the field declares an integer >= 1" in msg
    assert "mode='not-a-choice': accepted; the field declares 'a' or 'b'" in msg

    @dataclass(frozen=True)
    class Vague(SingleEstimator):
        k: int = param(3, Integer(ge=1))
        name: ClassVar[str] = "vague-test"

        def __post_init__(self) -> None:
            if not (isinstance(self.k, int) and self.k >= 1):
                raise UsageError("bad k")  # names nothing

        def estimate(self, x):
            return self._make(0.0, n=len(x), dims=(1,))

    with pytest.raises(ConformanceError, match=r"k=0: the message lacks \["):
        check_parameters(Vague)


def test_a_measure_that_keeps_the_mi_quantity_fails_conformance():
    """A SingleEstimator that does not set its quantity would label its rows
    'mutual_information' in nats: check_estimator says so; setting it passes."""
    import torch

    from ibscope.estimators.base import as_tensor

    @dataclass(frozen=True)
    class Spread(SingleEstimator):
        scale: float = param(1.0, Real(gt=0))
        name: ClassVar[str] = "spread-test"

        def estimate(self, x):
            t = as_tensor(x, name="x", estimator=self, allow_discrete=False)
            return self._make(float(self.scale * torch.linalg.vector_norm(t - t.mean(0)) / max(1, t.shape[0])),
                              n=t.shape[0], dims=(t.shape[1],))

    with pytest.raises(ConformanceError, match="quantity of a measure: a single-representation or Jacobian measure"):
        check_estimator(Spread)

    @dataclass(frozen=True)
    class SpreadNamed(Spread):
        name: ClassVar[str] = "spread-named-test"
        quantity: ClassVar[str] = "spread"
        unit: ClassVar[str] = "dimensionless"

    assert "quantity of a measure" in check_estimator(SpreadNamed)


def test_constraints_describe_and_refuse():
    assert Real(ge=0, lt=1).describe() == "a finite number in [0, 1)"
    assert Integer(gt=0, le=10).describe() == "an integer in (0, 10]"
    assert Integer().describe() == "an integer"
    assert Integer(ge=1).accepts(np.int64(4)) and not Integer(ge=1).accepts(np.int64(0))
    assert Real(gt=0).accepts(np.float32(0.5)) and not Real(gt=0).accepts(float("nan"))
    assert not OneOf(1, 2).accepts(True) and OneOf(1, 2).accepts(np.int64(2))
    with pytest.raises(ValueError, match="default 0 breaks its own constraint"):
        param(0, Integer(ge=1))


# -------------------------------------------------------------------------------------------- kinds
def test_kind_comes_from_the_base():
    kinds = {name: kind_of(registry.get(name)) for name in NAMES}
    assert {k for k in kinds.values()} == {"pair", "single", "jacobian"}
    for name, kind in kinds.items():
        cls = registry.get(name)
        base = {"pair": PairEstimator, "single": SingleEstimator, "jacobian": JacobianEstimator}[kind]
        assert issubclass(cls, base) and cls.kind == kind and registry.describe(name)["kind"] == kind
    assert kinds["local-rank"] == "jacobian" and kinds["twonn"] == "single" and kinds["kde-upper"] == "pair"

    with pytest.raises(TypeError, match="subclasses the pair estimator base but declares kind = 'single'"):
        @dataclass(frozen=True)
        class Confused(PairEstimator):
            kind: ClassVar[str] = "single"
            name: ClassVar[str] = "confused"

            def estimate(self, x, y):
                raise AssertionError

    @dataclass(frozen=True)
    class Old(Estimator):  # the older contract: Estimator with a kind attribute
        kind: ClassVar[str] = "single"
        name: ClassVar[str] = "old-test"

        def estimate(self, x):
            return self._make(1.0, n=len(x), dims=(1,))

    assert kind_of(Old) == "single" and kind_of(Old()) == "single"


# ------------------------------------------------------------------------------------------ aliases
# cell keys of rows written before the aliases existed (computed on main with the KDE subclasses):
# the same store, settings and code give the same keys, so stored results stay valid
KEYS_BEFORE = {
    ("kde-upper", "I(X;T)"): "7cd8c9124920dd72", ("kde-upper", "I(T;Y)"): "bdee8e1a02c0e553",
    ("kde-lower", "I(X;T)"): "559a19c003a2a018", ("kde-lower", "I(T;Y)"): "54a2cb1a39e244ce",
    ("adaptive-kde-upper", "I(X;T)"): "b84c7c1314c5aedb", ("adaptive-kde-upper", "I(T;Y)"): "8223005f6fdd01fc",
    ("adaptive-kde-lower", "I(X;T)"): "3ed19f1452dd0d83", ("adaptive-kde-lower", "I(T;Y)"): "37b52bb8e085e6e2",
    ("chelombiev-kde-upper", "I(X;T)"): "f253ad28777b9a97", ("chelombiev-kde-upper", "I(T;Y)"): "8504a8b544a5b845",
    ("chelombiev-kde-lower", "I(X;T)"): "92e55eb90ab2ede3", ("chelombiev-kde-lower", "I(T;Y)"): "c3bc9c009f1ce606",
    ("kde", "I(X;T)"): "af3a1cf12f6f3bc7", ("kde", "I(T;Y)"): "0878a121a3dc606e",
}


def test_alias_cell_keys_and_code_version_are_unchanged():
    from ibscope._version import __version__
    from ibscope.estimate import _specs, cell_key, code_version

    for (name, quantity), want in KEYS_BEFORE.items():
        (n, p), = _specs([name], {})
        assert n == name and code_version(name) == f"ibscope {__version__}"
        row_params = {**p, "x_source": "identity"} if quantity == "I(X;T)" else p
        got = cell_key(config_hash="c" * 16, probe_hash="p" * 16, checkpoint_sha256="s" * 64, layer="fc1",
                       estimator=n, quantity=quantity, params=row_params, code="ibscope 0.1.0")
        assert got == want, (name, quantity)


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_aliases_are_their_class_with_the_bound_pinned(name):
    cls, bound = ALIASES[name]
    assert name in registry.aliases() and registry.get(name) is cls
    est = registry.create(name)
    assert type(est) is cls and est.name == name and est.bound == bound
    plain = registry.create(cls.name, bound=bound)
    assert est == plain and est.params() == plain.params() and plain.name == cls.name
    rng = np.random.default_rng(1)
    t, y = rng.standard_normal((60, 2)), rng.integers(0, 3, 60)
    a, b = est.estimate(t, y), plain.estimate(t, y)
    assert a.value == b.value and a.estimator == name and b.estimator == cls.name and a.extra["bound"] == bound
    # the same value as the API with the alias's name
    assert ibscope.mutual_information(t, y, method=name).value == a.value
    other = "lower" if bound == "upper" else "upper"
    with pytest.raises(UsageError) as ei:
        registry.create(name, bound=other)
    assert str(ei.value).startswith(f"The 'bound' parameter of {name} must be '{bound}' ({name} fixes it). "
                                    f"Got '{other}' instead.")
    assert registry.create(name, bound=bound) == est  # the pinned value itself is accepted
    d = registry.describe(name)
    assert d["name"] == name and d["params"]["bound"] == bound and d["fixed"] == {"bound": bound}
    assert d["summary"] and d["summary"] != (cls.__doc__ or "").strip().splitlines()[0]
    # a pickled instance (worker processes) keeps the alias's name
    import pickle

    assert pickle.loads(pickle.dumps(est)).name == name


def test_alias_registration_is_checked():
    with pytest.raises(PluginError, match=r"pins \['width'\], which are not parameters of KDE"):
        registry.register_alias("kde-wide", KDE, width=2.0)
    with pytest.raises(PluginError, match="pins bound='middle'; KDE needs 'upper' or 'lower'"):
        registry.register_alias("kde-middle", KDE, bound="middle")
    assert "kde-wide" not in registry.available() and "kde-middle" not in registry.available()


# ----------------------------------------------------------------------------------------- plug-ins
@dataclass(frozen=True)
class TypedPlug(SingleEstimator):
    """Mean absolute activation (a typed plug-in)."""

    scale: float = param(1.0, Real(gt=0))
    name: ClassVar[str] = "typed-plug-test"
    quantity: ClassVar[str] = "mean_abs"
    unit: ClassVar[str] = "units"

    def estimate(self, x):
        from ibscope.estimators.base import as_tensor

        t = as_tensor(x, estimator=self)
        return self._make(float(t.abs().mean()) * self.scale, n=t.shape[0], dims=(t.shape[1],))


@dataclass(frozen=True)
class OldPlug(Estimator):
    """The contract before typed bases: Estimator with kind = 'single'."""

    name: ClassVar[str] = "old-plug-test"
    kind: ClassVar[str] = "single"
    quantity: ClassVar[str] = "rows"
    unit: ClassVar[str] = "rows"

    def estimate(self, x):
        from ibscope.estimators.base import as_tensor

        t = as_tensor(x, estimator=self)
        return self._make(float(t.shape[0]), n=t.shape[0], dims=(t.shape[1],))


class _EP:
    def __init__(self, name, obj):
        self.name, self.value, self._obj = name, f"tests:{obj.__name__}", obj

    def load(self):
        return self._obj


def test_entry_point_plugins_typed_and_older_form(monkeypatch):
    registry.available()  # the built-ins, registered when their modules are imported
    for attr in ("_REGISTRY", "_SOURCES", "_ALIASES", "_PLUGIN_ERRORS"):  # restored after the test
        monkeypatch.setattr(registry, attr, dict(getattr(registry, attr)))
    monkeypatch.setattr(registry, "_loaded", False)
    eps = [_EP("typed-plug-test", TypedPlug), _EP("old-plug-test", OldPlug)]
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: eps if group == registry.ENTRY_POINT_GROUP else [])
    with pytest.warns(DeprecationWarning, match="'old-plug-test' .* subclasses Estimator directly with kind = 'single'"):
        names = registry.available()
    assert {"typed-plug-test", "old-plug-test", "kde-upper", "binning"} <= set(names)
    assert registry.source("typed-plug-test") == "plug-in tests:TypedPlug"
    assert kind_of(names["typed-plug-test"]) == "single" and kind_of(names["old-plug-test"]) == "single"
    x = np.arange(12.0).reshape(6, 2) - 5
    assert registry.create("typed-plug-test", scale="2").estimate(x).value == pytest.approx(2 * np.abs(x).mean())
    assert registry.create("old-plug-test").estimate(x).value == 6.0
    assert registry.describe("typed-plug-test")["constraints"] == {"scale": "a finite number > 0"}
    assert "parameter constraints" in check_estimator(TypedPlug)
    assert "parameter constraints" in check_estimator(OldPlug)  # no declared constraint: nothing to refuse
