"""Neural variational lower bounds on I(X;Y): InfoNCE, MINE and SMILE (opt-in; slow next to k-NN).

A critic f(x, y) scores pairs; over a batch of B pairs the score matrix F_ij = f(x_i, y_j) has
the joint samples on its diagonal and samples of the product of the marginals off it.

* InfoNCE (van den Oord et al. 2018): I >= log B + mean_i [F_ii - log sum_j exp F_ij]; never
  above log B (``Estimate.cap``).
* MINE (Belghazi et al. 2018): the Donsker-Varadhan bound I >= E_P[f] - log E_Q[exp f]; trained
  with the moving-average gradient correction (the denominator of the gradient of
  log E_Q[exp f] replaced by an exponential moving average, ``ema_decay``).
* SMILE (Song & Ermon 2020): trained with the Jensen-Shannon (f-GAN) objective, reported as the
  DV bound with the partition term computed on scores clipped to [-clip, clip] (the clip tau
  trades variance for bias; tau -> inf is DV).

The critic is ``separable`` (f = g(x) . h(y), two MLPs; B forward passes per batch) or
``concat`` (f = MLP([x, y]) on all B^2 pairs). The samples are split three ways (seeded):
the critic is trained on the training split with Adam; every ``eval_every`` steps the bound is
evaluated on the validation split, the best state so far is kept (a copy of the weights), and
training stops after ``patience`` evaluations without improvement or after ``steps`` steps.
The reported value is the bound of the best state on the test split, which played no part in
training or stopping: an honest held-out estimate. It can be negative (a critic that does not
generalise); it is reported as it is, with a note and a warning, never clamped.

Continuous columns are z-scored; discrete (integer) inputs are one-hot encoded. Seeded
(initialisation, split, batches); runs on the input's device (float32).
"""

from __future__ import annotations

import abc
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ibscope.errors import DataError
from ibscope.estimators import _mi
from ibscope.estimators._train import training_threads
from ibscope.estimators.base import ArrayLike, Estimate, PairEstimator, PairMixinBase, is_discrete
from ibscope.estimators.params import Integer, OneOf, Real, param
from ibscope.estimators.registry import register

NEURAL_REFERENCE_POOLE = "Poole, Ozair, van den Oord, Alemi & Tucker 2019, On variational bounds of MI, ICML"


def _mlp(d_in: int, hidden: int, d_out: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, d_out))


class _Critic(torch.nn.Module):
    """Scores F_ij = f(x_i, y_j) of a batch: separable g(x) . h(y), or an MLP of [x, y]."""

    def __init__(self, kind: str, dx: int, dy: int, hidden: int, embed: int):
        super().__init__()
        self.kind = kind
        if kind == "separable":
            self.g, self.h = _mlp(dx, hidden, embed), _mlp(dy, hidden, embed)
        else:
            self.f = _mlp(dx + dy, hidden, 1)

    def forward(self, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # calling a torch.nn.Module gives Any to mypy (Module.__call__ is Callable[..., Any])
        scores: torch.Tensor
        if self.kind == "separable":
            scores = self.g(a) @ self.h(c).T
            return scores
        b = a.shape[0]
        pairs = torch.cat([a[:, None, :].expand(b, b, a.shape[1]), c[None, :, :].expand(b, b, c.shape[1])], dim=2)
        scores = self.f(pairs.reshape(b * b, -1)).reshape(b, b)
        return scores


def infonce_bound(scores: torch.Tensor) -> torch.Tensor:
    """InfoNCE bound of one score matrix (B, B): log B + mean(diag - logsumexp of rows)."""
    b = scores.shape[0]
    return math.log(b) + (scores.diagonal() - torch.logsumexp(scores, dim=1)).mean()


def _offdiag(scores: torch.Tensor) -> torch.Tensor:
    b = scores.shape[0]
    return scores.masked_select(~torch.eye(b, dtype=torch.bool, device=scores.device))


def _logmeanexp(v: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(v, dim=0) - math.log(v.numel())


def dv_bound(scores: torch.Tensor, clip: float | None = None) -> torch.Tensor:
    """Donsker-Varadhan bound: mean diag - log mean exp(off-diagonal), off-diagonal clipped if ``clip``."""
    off = _offdiag(scores)
    if clip is not None:
        off = off.clamp(-clip, clip)
    return scores.diagonal().mean() - _logmeanexp(off)


def js_bound(scores: torch.Tensor) -> torch.Tensor:
    """The Jensen-Shannon (f-GAN) objective: E_P[-softplus(-f)] - E_Q[softplus(f)]."""
    sp = torch.nn.functional.softplus
    return (-sp(-scores.diagonal())).mean() - sp(_offdiag(scores)).mean()


class _NeuralMixin(PairMixinBase):
    """Shared training loop; a subclass defines the training loss and the reported bound."""

    if TYPE_CHECKING:  # the fields of _NeuralFields, which every subclass also has
        steps: int
        batch_size: int
        lr: float
        hidden: int
        embed: int
        critic: str
        test_fraction: float
        val_fraction: float
        eval_every: int
        patience: int
        seed: int

    x_source: ClassVar[str] = "inputs"

    def scale_invariant(self, arg: str) -> str | None:
        # continuous inputs are z-scored per column before the critic sees them
        return "column"

    def validate(self) -> None:
        self._require(self.test_fraction + self.val_fraction < 1, "val_fraction",
                      f"< 1 - test_fraction = {1 - self.test_fraction:g} (a training split must remain)",
                      self.val_fraction)

    # what differs between the bounds -----------------------------------------------------------
    @abc.abstractmethod
    def _loss(self, scores: torch.Tensor, state: dict[str, float]) -> torch.Tensor:
        """The training loss of one batch's score matrix (``state`` persists across steps)."""

    @abc.abstractmethod
    def _bound(self, diag: torch.Tensor, off: torch.Tensor, per_batch: list[float]) -> float:
        """The reported bound from the joint scores, the product-of-marginals scores and per-batch values."""

    def _cap(self) -> float | None:
        return None

    # the degenerate-input rule and the cap's name --------------------------------------------------
    def on_constant(self, *tensors: torch.Tensor) -> str | None:
        # I = 0 for a constant side; two discrete sides stay a usage error
        return "zero" if any(t.is_floating_point() for t in tensors) else None

    def _constant_cap(self, *tensors: torch.Tensor) -> float | None:
        return self._cap()

    def cap_name(self, quantity: str) -> str:
        if self._cap() is None:
            return "its cap"
        return "min(log batch, H(Y))" if quantity == "I(T;Y)" else "log batch"

    # shared machinery ----------------------------------------------------------------------------
    def _features(self, t: torch.Tensor, name: str) -> torch.Tensor:
        if is_discrete(t):
            c = _mi.codes(t)
            return torch.nn.functional.one_hot(c, int(c.max()) + 1).to(torch.float32)
        t, _ = _mi.continuous(self, t, name, standardize=True)
        return t.to(torch.float32)

    def _splits(self, n: int) -> tuple[int, int, int]:
        n_test = int(round(n * self.test_fraction))
        n_val = int(round(n * self.val_fraction))
        return n - n_test - n_val, n_val, n_test

    def _evaluate(self, critic: _Critic, a: torch.Tensor, c: torch.Tensor, idx: torch.Tensor) -> tuple[float, list[float]]:
        """The bound on the samples ``idx`` in batches of batch_size (the last partial batch dropped)."""
        b = self.batch_size
        diags, offs, per = [], [], []
        with torch.no_grad():
            for s in range(0, idx.numel() - b + 1, b):
                sc = critic(a[idx[s:s + b]], c[idx[s:s + b]]).to(torch.float64)
                diags.append(sc.diagonal())
                offs.append(_offdiag(sc))
                per.append(self._bound(sc.diagonal(), _offdiag(sc), [float(infonce_bound(sc))]))
        return self._bound(torch.cat(diags), torch.cat(offs), per), per

    def estimate(self, x: ArrayLike, y: ArrayLike) -> Estimate:
        tx, ty = _mi.pair(self, x, y)
        if is_discrete(tx) and is_discrete(ty):
            raise _mi.both_discrete_error(self)
        n = tx.shape[0]
        b = self.batch_size
        n_train, n_val, n_test = self._splits(n)
        if min(n_train, n_val, n_test) < b:
            need = n + 1
            while min(self._splits(need)) < b:
                need += 1
            raise DataError(
                f"{self.name} needs at least {need} samples: its training, validation and test splits "
                f"({1 - self.test_fraction - self.val_fraction:g} / {self.val_fraction:g} / {self.test_fraction:g}) must "
                f"each hold batch_size={b} samples. Got {n} samples ({n_train} / {n_val} / {n_test}).",
                hint=f"Lower --param {self.name}.batch_size, or pass more samples.")
        a, c = self._features(tx, "x"), self._features(ty, "y")
        dev = a.device
        g = torch.Generator(device="cpu").manual_seed(int(self.seed))
        perm = torch.randperm(n, generator=g)
        tr = perm[:n_train].to(dev)
        va = perm[n_train:n_train + n_val].to(dev)
        te = perm[n_train + n_val:].to(dev)
        devices = [dev] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), training_threads(dev):
            torch.manual_seed(int(self.seed))
            critic = _Critic(self.critic, a.shape[1], c.shape[1], self.hidden, self.embed).to(dev)
            opt = torch.optim.Adam(critic.parameters(), lr=float(self.lr))
            state: dict[str, float] = {}
            best, best_step, best_weights, since, step = -math.inf, 0, None, 0, 0
            history = []
            with torch.enable_grad():
                while step < self.steps:
                    idx = tr[torch.randint(0, n_train, (b,), generator=g).to(dev)]
                    loss = self._loss(critic(a[idx], c[idx]), state)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    if step % self.eval_every == 0 or step == self.steps:
                        val, _ = self._evaluate(critic, a, c, va)
                        history.append((step, val))
                        if val > best:
                            best, best_step, since = val, step, 0
                            best_weights = {k: v.detach().clone() for k, v in critic.state_dict().items()}
                        else:
                            since += 1
                            if since >= self.patience:
                                break
            if best_weights is None:
                raise DataError(
                    f"{self.name}: training diverged: the validation bound was never finite ({len(history)} "
                    f"evaluation(s), last {history[-1][1] if history else 'none'}).",
                    hint=f"Lower --param {self.name}.lr, or standardise/clip extreme inputs.")
            critic.load_state_dict(best_weights)
            value, per = self._evaluate(critic, a, c, te)
        if not math.isfinite(value):
            raise DataError(f"{self.name}: the test-split bound is not finite ({value}); the critic's scores overflow.",
                            hint=f"Lower --param {self.name}.lr or use a smaller critic.")
        v = torch.tensor(per, dtype=torch.float64)
        stderr = float(v.std() / math.sqrt(len(per))) if len(per) > 1 else None
        extra = {"n_train": n_train, "n_val": n_val, "n_test": n_test, "best_step": best_step, "steps_run": step,
                 "stopped_early": step < self.steps, "val_bound_best": best, "critic": self.critic,
                 "val_history": [[s, round(h, 6)] for s, h in history]}
        if value < 0:
            note = (f"{self.name}: the held-out bound is negative ({value:.4g} nats): the critic did not generalise "
                    "from the training split. The value is reported as it is (a valid but useless lower bound; MI "
                    ">= 0); try more samples, a smaller critic, or a k-NN estimator.")
            extra["note"] = note
            warnings.warn(note, RuntimeWarning, stacklevel=2)
        cap = self._cap()
        if cap is not None:  # a discrete side bounds the MI by its entropy: the tighter cap is the one to flag
            for t in (tx, ty):
                if is_discrete(t):
                    cap = min(cap, _mi.entropy_codes(_mi.codes(t)))
        return self._make(value, n=n, dims=(tx.shape[1], ty.shape[1]), stderr=stderr, cap=cap, extra=extra)


_COMMON_DOC = """
    Training: Adam (``lr``) on batches of ``batch_size`` pairs from the training split, at most
    ``steps`` steps; every ``eval_every`` steps the bound on the validation split
    (``val_fraction`` of the samples) decides the best state, kept as a copy; training stops
    after ``patience`` evaluations without improvement. The value is the bound of that state on
    the test split (``test_fraction``), unused in training: it can be negative (reported with a
    note, not clamped). Critic: ``critic="separable"`` (two MLPs of ``hidden`` units,
    ``embed``-dim output, f = g(x) . h(y)) or ``"concat"`` (one MLP on [x, y], all B^2 pairs).
    ``seed`` fixes initialisation, split and batches; computation on the input's device."""


@dataclass(frozen=True)
class _NeuralFields:
    steps: int = param(2000, Integer(ge=1))
    batch_size: int = param(128, Integer(ge=2))
    lr: float = param(1e-3, Real(gt=0))
    hidden: int = param(64, Integer(ge=1))
    embed: int = param(32, Integer(ge=1))
    critic: str = param("separable", OneOf("separable", "concat"))
    test_fraction: float = param(0.3, Real(gt=0, lt=1))
    val_fraction: float = param(0.2, Real(gt=0, lt=1))
    eval_every: int = param(25, Integer(ge=1))
    patience: int = param(8, Integer(ge=1))
    seed: int = param(0, Integer())


@register
@dataclass(frozen=True)
class InfoNCE(_NeuralMixin, PairEstimator, _NeuralFields):
    """InfoNCE lower bound on I, early-stopped on a validation split, reported on a test split.

    Bound: log B + mean_i [F_ii - log sum_j exp F_ij] for batches of B = ``batch_size``; it can
    never exceed log B (``Estimate.cap``): raise batch_size to see larger MI.
    """

    name: ClassVar[str] = "infonce"
    reference: ClassVar[str] = "van den Oord, Li & Vinyals 2018, arXiv:1807.03748; " + NEURAL_REFERENCE_POOLE

    def _loss(self, scores: torch.Tensor, state: dict[str, float]) -> torch.Tensor:
        return -infonce_bound(scores)

    def _bound(self, diag: torch.Tensor, off: torch.Tensor, per_batch: list[float]) -> float:
        return float(sum(per_batch) / len(per_batch))

    def _cap(self) -> float:
        return math.log(self.batch_size)


@register
@dataclass(frozen=True)
class MINE(_NeuralMixin, PairEstimator, _NeuralFields):
    """MINE: the Donsker-Varadhan bound with the moving-average gradient correction.

    Bound: E_P[f] - log E_Q[exp f], E_Q over the off-diagonal pairs of each batch (the test
    value pools the pairs of all test batches). Training: the gradient of log E_Q[exp f] uses
    an exponential moving average of E_Q[exp f] (``ema_decay``: weight of the old average) in
    its denominator, which removes the bias of the mini-batch estimate (Belghazi et al. sec. 3.2).
    """

    ema_decay: float = param(0.99, Real(ge=0, lt=1))

    name: ClassVar[str] = "mine"
    reference: ClassVar[str] = ("Belghazi, Baratin, Rajeswar, Ozair, Bengio, Courville & Hjelm 2018, Mutual "
                                "Information Neural Estimation, ICML")

    def _loss(self, scores: torch.Tensor, state: dict[str, float]) -> torch.Tensor:
        off = _offdiag(scores)
        m = off.detach().max()
        mean_exp = torch.exp(off - m).mean()             # E_Q[exp f] / exp(m), stable
        batch = float(mean_exp.detach()) * math.exp(float(m))
        ema = state.get("ema")
        ema = batch if ema is None else self.ema_decay * ema + (1 - self.ema_decay) * batch
        state["ema"] = ema
        # d/dtheta of the surrogate: grad E_Q[exp f] / ema, the corrected gradient of log E_Q[exp f]
        partition = mean_exp * (math.exp(float(m)) / max(ema, 1e-30))
        return -(scores.diagonal().mean() - partition)

    def _bound(self, diag: torch.Tensor, off: torch.Tensor, per_batch: list[float]) -> float:
        return float(diag.mean() - _logmeanexp(off))


@register
@dataclass(frozen=True)
class SMILE(_NeuralMixin, PairEstimator, _NeuralFields):
    """SMILE: trained with the Jensen-Shannon objective, reported as the clipped DV bound.

    Bound: E_P[f] - log E_Q[exp clip(f, -tau, tau)], tau = ``clip`` (Song & Ermon use 1 and 5;
    smaller tau: less variance, more bias). Training maximises the f-GAN JS objective, which is
    stable at high MI where DV/NWJ gradients have exponential variance.
    """

    clip: float = param(5.0, Real(gt=0))

    name: ClassVar[str] = "smile"
    reference: ClassVar[str] = ("Song & Ermon 2020, Understanding the limitations of variational mutual information "
                                "estimators, ICLR")

    def _loss(self, scores: torch.Tensor, state: dict[str, float]) -> torch.Tensor:
        return -js_bound(scores)

    def _bound(self, diag: torch.Tensor, off: torch.Tensor, per_batch: list[float]) -> float:
        return float(diag.mean() - _logmeanexp(off.clamp(-self.clip, self.clip)))


for _cls in (InfoNCE, MINE, SMILE):
    _cls.__doc__ = (_cls.__doc__ or "") + _COMMON_DOC
