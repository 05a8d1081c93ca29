"""Self-test of the chi-square helper in conftest.py against closed forms.

chi-square with 1 degree of freedom is Z^2, so P(X > x) = erfc(sqrt(x / 2)); with 2 degrees
of freedom it is exponential with mean 2, so P(X > x) = exp(-x / 2) and the alpha = 1e-4
critical value is exactly -2 ln(1e-4) = 18.4207.
"""

from __future__ import annotations

import math

import pytest


@pytest.mark.parametrize("x", [0.5, 3.0, 15.0, 40.0])
def test_survival_matches_closed_forms(x: float, stat_tools) -> None:
    assert stat_tools.chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9)
    assert stat_tools.chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-9)


def test_critical_values(stat_tools) -> None:
    assert stat_tools.chi2_critical(2, 1e-4) == pytest.approx(-2 * math.log(1e-4), rel=1e-9)
    assert stat_tools.chi2_critical(1, 1e-4) == pytest.approx(15.136705226623606, rel=1e-9)
    # Table value for df = 10 at alpha = 1e-4: 35.5640.
    assert stat_tools.chi2_critical(10, 1e-4) == pytest.approx(35.5640, abs=5e-4)


def test_pooling_and_zero_probability_categories(stat_tools) -> None:
    fit = stat_tools.chi_square_test([50, 50, 0], [0.5, 0.5, 0.0])
    assert fit.passes and fit.statistic == 0.0 and fit.df == 1
    assert not stat_tools.chi_square_test([50, 49, 1], [0.5, 0.5, 0.0]).passes  # mass where p has none
    # Expected 0.1 and 0.2 are pooled with each other and the smallest big bin.
    fit = stat_tools.chi_square_test([0, 0, 30, 70], [0.001, 0.002, 0.3, 0.697])
    assert fit.df == 1
