"""Verdicts on the seed papers' claims from paired per-seed differences.

A claim compares two arms run with the same seeds (e.g. FFA-LoRA vs FedAvg-LoRA at one epsilon). Seed s of
both arms draws the same partition, client samples and batches (fedsim keys randomness by seed and
purpose), so the per-seed differences d_s = arm_a(s) - arm_b(s) are paired, and their spread is the noise
the verdict must beat. At 95% confidence, with the claim's direction (+1: a > b):

    interval = mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n)
    reproduced    the interval lies above 0 in the claimed direction;
    refuted       it lies below `margin` (1 accuracy point): any effect in the claimed direction is
                  smaller than the margin, or it goes the other way;
    underpowered  otherwise; `seeds_needed` is the smallest n whose half-width t_{n-1} sd / sqrt(n)
                  would be below max(|mean|, margin / 2) at the observed mean and sd.
One seed gives no interval: underpowered. Accuracies are fractions; `margin` too.
"""
import math
from dataclasses import dataclass

from scipy import stats

MARGIN = 0.01          # an improvement smaller than one accuracy point is no improvement worth a claim
LEVEL = 0.95


@dataclass(frozen=True)
class Verdict:
    verdict: str               # reproduced | refuted | underpowered
    mean: float                # mean paired difference, in the claimed direction's units (a - b)
    low: float                 # 95% interval (nan with one seed)
    high: float
    n: int                     # paired seeds
    seeds_needed: int | None   # underpowered only: seeds that would decide at the observed mean and sd

    def text(self):
        """'+3.1 points [1.2, 5.0], 5 seeds: reproduced' (differences in accuracy points)."""
        ci = "no interval" if math.isnan(self.low) else f"[{100 * self.low:+.1f}, {100 * self.high:+.1f}]"
        more = f" (≈{self.seeds_needed} seeds would decide)" if self.seeds_needed else ""
        return f"Δ {100 * self.mean:+.1f} points, 95% CI {ci}, {self.n} paired seeds: {self.verdict}{more}"


def _half_width(sd, n, level=LEVEL):
    return stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)


def paired_verdict(a, b, direction=+1, margin=MARGIN, level=LEVEL):
    """Verdict on "a beats b" (direction +1) or "a is below b" (-1) from per-seed values.

    a, b: {seed: value}; only seeds present in both count."""
    seeds = sorted(set(a) & set(b))
    d = [direction * (a[s] - b[s]) for s in seeds]
    n = len(d)
    if n == 0:
        raise ValueError("no seed is present in both arms: nothing to compare")
    mean = sum(d) / n
    if n == 1:
        return Verdict("underpowered", direction * mean, math.nan, math.nan, 1, 3)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    h = _half_width(sd, n, level)
    low, high = mean - h, mean + h
    if low > 0:
        verdict, needed = "reproduced", None
    elif high < margin:
        verdict, needed = "refuted", None
    else:
        target = max(abs(mean), margin / 2)
        needed = next((k for k in range(n + 1, 1001) if _half_width(sd, k, level) < target), None)
        verdict = "underpowered"
    lo, hi = (low, high) if direction > 0 else (-high, -low)
    return Verdict(verdict, direction * mean, lo, hi, n, needed)


def combine(verdicts):
    """One word for several settings of one claim: all agree -> that word, else 'mixed: ...'."""
    words = [v.verdict if isinstance(v, Verdict) else v for v in verdicts]
    if not words:
        return "underpowered"
    return words[0] if len(set(words)) == 1 else "mixed: " + ", ".join(words)
