"""Shared test tools. Statistical losslessness: a Pearson chi-square goodness-of-fit
test with exact critical values (no scipy), and tiny conditional "language models".

The statistic
-------------
N samples fall into categories with exact target probabilities p_i (known in closed form
from the test's p tables). Pearson's X^2 = sum_i (O_i - N p_i)^2 / (N p_i) is asymptotically
chi-square with (bins - 1) degrees of freedom when the sampler is exact. Validity needs
expected counts of about 5 or more, so bins with N p_i < 5 are pooled. A single sample in a
category with p_i == 0 is a certain failure (statistic = inf).

The critical value is the exact chi-square quantile at alpha = 1e-4, computed below from the
regularised incomplete gamma function (chi2 survival = Q(df/2, x/2)) by bisection; the
self-test checks it against the closed forms for df = 1 (erfc) and df = 2 (exp). With a fixed
seed a test is deterministic; alpha = 1e-4 bounds the chance that a *correct* sampler fails
for a given seed, so ~20 such tests together fail spuriously with probability <= 2e-3 when
seeds are changed (Bonferroni).

Power (why the negative controls must fail): if the sampler instead follows w, X^2 is about
noncentral chi-square with df and lambda = N * sum_i (w_i - p_i)^2 / p_i, mean df + lambda,
standard deviation sqrt(2 (df + 2 lambda)). The negative-control tests compute lambda where
w is known in closed form and require it to dwarf the critical value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tandem.bench.tiny_models import TINY_VOCAB, TINY_WORDS, make_service_models, make_tiny_model, make_tiny_tokenizer  # noqa: F401 - re-exported to tests

ALPHA = 1e-4
MIN_EXPECTED = 5.0


def _regularized_gamma_p_series(a: float, x: float) -> float:
    """P(a, x) by its power series; converges quickly for x < a + 1."""
    term = 1.0 / a
    total = term
    n = 0
    while abs(term) > abs(total) * 1e-16:
        n += 1
        term *= x / (a + n)
        total += term
    return total * math.exp(-x + a * math.log(x) - math.lgamma(a))


def _regularized_gamma_q_fraction(a: float, x: float) -> float:
    """Q(a, x) by its continued fraction (modified Lentz); converges for x >= a + 1."""
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for X ~ chi-square(df): the regularised upper incomplete gamma Q(df/2, x/2)."""
    if x <= 0:
        return 1.0
    a, z = df / 2.0, x / 2.0
    if z < a + 1.0:
        return 1.0 - _regularized_gamma_p_series(a, z)
    return _regularized_gamma_q_fraction(a, z)


def chi2_critical(df: int, alpha: float = ALPHA) -> float:
    """The x with chi2_sf(x, df) == alpha, by bisection (sf is decreasing in x)."""
    low, high = 0.0, float(df) + 10.0
    while chi2_sf(high, df) > alpha:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if chi2_sf(mid, df) > alpha:
            low = mid
        else:
            high = mid
    return high


@dataclass(frozen=True)
class GoodnessOfFit:
    statistic: float
    critical: float
    df: int
    samples: int

    @property
    def passes(self) -> bool:
        return self.statistic <= self.critical

    def __str__(self) -> str:
        return (
            f"X^2 = {self.statistic:.2f} vs critical {self.critical:.2f} "
            f"(df = {self.df}, N = {self.samples}, alpha = {ALPHA})"
        )


def chi_square_test(counts: Sequence[int], probs: Sequence[float]) -> GoodnessOfFit:
    """Pearson goodness of fit of observed ``counts`` to exact category ``probs``."""
    observed = np.asarray(counts, dtype=np.float64)  # [categories]
    p = np.asarray(probs, dtype=np.float64)  # [categories]
    assert observed.shape == p.shape and abs(p.sum() - 1.0) < 1e-5, "probs must be a distribution over the categories"
    p = p / p.sum()  # float32-sourced tables sum to 1 only within rounding
    n = int(observed.sum())
    if observed[p <= 0].sum() > 0:
        critical = chi2_critical(max(1, int((p > 0).sum()) - 1))
        return GoodnessOfFit(statistic=math.inf, critical=critical, df=-1, samples=n)
    expected = n * p[p > 0]  # [positive categories]
    observed = observed[p > 0]
    order = np.argsort(expected)  # pool the smallest expected counts first
    pooled_o = pooled_e = 0.0
    bins_o: list[float] = []
    bins_e: list[float] = []
    for i in order:
        if pooled_e < MIN_EXPECTED:
            pooled_o += observed[i]
            pooled_e += expected[i]
        else:
            bins_o.append(observed[i])
            bins_e.append(expected[i])
    bins_o.append(pooled_o)
    bins_e.append(pooled_e)
    assert len(bins_e) >= 2, "need at least two bins with expected count >= 5; raise N"
    o, e = np.asarray(bins_o), np.asarray(bins_e)
    df = len(bins_e) - 1
    return GoodnessOfFit(statistic=float(((o - e) ** 2 / e).sum()), critical=chi2_critical(df), df=df, samples=n)


def noncentrality(wrong: Sequence[float], probs: Sequence[float], samples: int) -> float:
    """lambda = N sum_i (w_i - p_i)^2 / p_i (inf if w puts mass where p has none)."""
    w = np.asarray(wrong, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if w[p <= 0].sum() > 1e-12:
        return math.inf
    positive = p > 0
    return float(samples * ((w[positive] - p[positive]) ** 2 / p[positive]).sum())


class ToyLM:
    """A tiny conditional language model: a fixed random next-token distribution per prefix.

    Some tokens get zero probability at each prefix (``n_zero`` of them, chosen per prefix),
    so a draft and a target built from different seeds have deliberately different supports.
    With ``base`` and ``mix``, the distribution before zeroing is ``mix * base + (1 - mix) *
    noise``, a draft that roughly agrees with its target (so acceptances and bonus tokens
    happen often).
    """

    def __init__(self, *, vocab: int, seed: int, n_zero: int, base: ToyLM | None = None, mix: float = 0.0) -> None:
        self.vocab = vocab
        self.seed = seed
        self.n_zero = n_zero
        self.base = base
        self.mix = mix
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def dist(self, prefix: Sequence[int]) -> torch.Tensor:
        """[vocab] float32 next-token distribution after ``prefix``."""
        key = tuple(int(t) for t in prefix)
        if key not in self._cache:
            rng = np.random.default_rng([self.seed, len(key), *key])
            weights = rng.dirichlet(np.full(self.vocab, 0.8))  # [vocab]
            if self.base is not None:
                weights = self.mix * self.base.dist(key).numpy().astype(np.float64) + (1.0 - self.mix) * weights
            weights[rng.choice(self.vocab, size=self.n_zero, replace=False)] = 0.0
            if weights.sum() <= 0:
                weights[int(rng.integers(self.vocab))] = 1.0
            self._cache[key] = torch.from_numpy(weights / weights.sum()).to(torch.float32)
        return self._cache[key]


def pair_distribution(model: ToyLM) -> np.ndarray:
    """[vocab * vocab] exact P(first two tokens = (x, y)) = p(x) p(y | x), index x * vocab + y."""
    first = model.dist(()).numpy().astype(np.float64)  # [vocab]
    rows = [first[x] * model.dist((x,)).numpy().astype(np.float64) for x in range(model.vocab)]
    joint = np.concatenate(rows)  # [vocab * vocab]
    return joint / joint.sum()


class StatTools:
    """Namespace handed to tests by the ``stat_tools`` fixture."""

    chi2_sf = staticmethod(chi2_sf)
    chi2_critical = staticmethod(chi2_critical)
    chi_square_test = staticmethod(chi_square_test)
    noncentrality = staticmethod(noncentrality)
    pair_distribution = staticmethod(pair_distribution)
    ToyLM = ToyLM
    alpha = ALPHA


@pytest.fixture
def stat_tools() -> type[StatTools]:
    return StatTools


# ----------------------------------------------------------------------------------------
# Tiny random models (bench/tiny_models.py: fast, exact fp32) for runtime, actor and
# service tests.
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    """(target_path, draft_path): a 2-layer target and a 4-layer draft (exits at 2 and 4),
    random with different seeds, vocab 6."""
    root = tmp_path_factory.mktemp("tiny")
    target = make_tiny_model(root / "target", seed=1)
    draft = make_tiny_model(root / "draft", seed=2, layers=4)
    return target, draft


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster for actor and service tests: 2 CPUs, and the custom pool
    resources tandem places drafts and targets on (room for several pools at once); its
    workers run under the device discipline."""
    import os

    import ray

    from tandem.actors.devices import DEFAULT_DEVICE_ENV

    # Device discipline in the actors (actors/devices.py): every worker process this Ray
    # starts makes tensors on "meta" unless it names a device, so a forgotten device= in
    # code that runs on actors fails the actor and service tests on this CPU-only machine.
    os.environ.setdefault(DEFAULT_DEVICE_ENV, "meta")
    if not ray.is_initialized():
        ray.init(
            address="local",  # never a cluster some `ray start` on this machine left its address for
            num_cpus=2,
            resources={"draft_pool": 8, "target_pool": 16},
            include_dashboard=False,
            log_to_driver=False,
            namespace="tandem-tests",
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_service_models(tmp_path_factory):
    """{"small": path, "other": path, "draft": path} (bench.tiny_models.make_service_models)."""
    return make_service_models(tmp_path_factory.mktemp("svc"))
