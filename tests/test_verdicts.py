"""Claim verdicts from paired per-seed differences, on small synthetic tables."""
import math

import pytest
from scipy import stats

from scripts.verdicts import combine, paired_verdict


def test_clear_gain_is_reproduced_with_the_t_interval():
    a = {0: 0.80, 1: 0.82, 2: 0.81, 3: 0.83}
    b = {0: 0.75, 1: 0.78, 2: 0.76, 3: 0.77}
    v = paired_verdict(a, b)
    d = [0.05, 0.04, 0.05, 0.06]
    sd = stats.tstd(d)
    h = stats.t.ppf(0.975, 3) * sd / 2
    assert v.verdict == "reproduced" and v.n == 4 and v.seeds_needed is None
    assert v.mean == pytest.approx(0.05) and v.low == pytest.approx(0.05 - h) and v.high == pytest.approx(0.05 + h)


def test_pairing_by_seed_beats_unpaired_spread():
    """The seeds differ a lot from each other but the arms differ consistently: paired, that is decisive."""
    a = {0: 0.60, 1: 0.80, 2: 0.70}
    b = {0: 0.58, 1: 0.78, 2: 0.68}
    assert paired_verdict(a, b).verdict == "reproduced"
    assert paired_verdict(b, a, direction=-1).verdict == "reproduced"    # "b is below a": the same claim


def test_no_effect_is_refuted_and_a_reverse_effect_too():
    flat = paired_verdict({0: 0.700, 1: 0.710, 2: 0.690}, {0: 0.701, 1: 0.708, 2: 0.692})
    assert flat.verdict == "refuted" and flat.high < 0.01
    worse = paired_verdict({0: 0.60, 1: 0.61, 2: 0.62}, {0: 0.70, 1: 0.72, 2: 0.71})
    assert worse.verdict == "refuted" and worse.mean < 0


def test_noisy_difference_is_underpowered_with_the_seeds_that_would_decide():
    a = {0: 0.70, 1: 0.80, 2: 0.66}
    b = {0: 0.68, 1: 0.70, 2: 0.70}
    v = paired_verdict(a, b)
    assert v.verdict == "underpowered" and v.low < 0 < v.high and v.seeds_needed > 3
    d = [0.02, 0.10, -0.04]
    sd, mean = stats.tstd(d), sum(d) / 3
    n = v.seeds_needed
    assert stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) < mean <= stats.t.ppf(0.975, n - 2) * sd / math.sqrt(n - 1)


def test_one_seed_and_unpaired_seeds():
    v = paired_verdict({0: 0.9}, {0: 0.5, 1: 0.4})
    assert v.verdict == "underpowered" and v.n == 1 and math.isnan(v.low) and "no interval" in v.text()
    with pytest.raises(ValueError, match="no seed"):
        paired_verdict({0: 0.9}, {1: 0.5})


def test_combine():
    a, b = {0: 0.8, 1: 0.82, 2: 0.81}, {0: 0.7, 1: 0.71, 2: 0.72}
    good = paired_verdict(a, b)
    assert combine([good, good]) == "reproduced"
    assert combine([good, paired_verdict(b, a)]) == "mixed: reproduced, refuted"
    assert combine([]) == "underpowered"
