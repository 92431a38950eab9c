"""What the families hand on: each family's render returns one typed result, kept in Context.results under the
family's name, which the claims (scripts/figures/claims.py) and later families (dp_recipe reads the FFA
table's seeds) read. Frames hold one row per (cell) or per finished federation (seeds)."""
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Context:
    """Where a build reads runs from, and the results of the families rendered so far."""
    root: Path
    profile: str
    results: dict = field(default_factory=dict)


@dataclass(frozen=True)
class FFATable:
    cells: pd.DataFrame         # task, method, privacy: mean, std, n over seeds, chance
    seeds: pd.DataFrame         # one row per finished federation (task, method, privacy, seed, acc, ...)


@dataclass(frozen=True)
class Heterogeneity:
    cells: pd.DataFrame         # task, method, partition: mean, std, n
    seeds: pd.DataFrame         # one row per finished federation
    peft_gap: dict              # task -> FedAvg-FFT minus PEFT by partition (gap, spread, fft_learned, key)


@dataclass(frozen=True)
class AlphaSweep:
    ranges: pd.DataFrame | None     # learning rate fixed across alpha: task, privacy, method: accuracy range over
    #                                 LoRA alpha, mean seed std, learned cells (None: no such run)
    tuned: pd.DataFrame | None = None   # the same for the per-alpha tuned runs (None: no such run)


@dataclass(frozen=True)
class SLoRASweep:
    density: pd.DataFrame | None    # accuracy by stage-1 density (None: no finished federation)
    fft: pd.Series | None           # the FedAvg-FFT reference at the same setting (None: no such run)
    chance: float | None


@dataclass(frozen=True)
class Communication:
    runs: list                  # the other family's runs this view used
    table: pd.DataFrame         # per task, partition, method: accuracy, upload, bytes to target, reductions


@dataclass(frozen=True)
class MethodsTable:
    table: pd.DataFrame         # task, method label: accuracy, difference to FedAvg-LoRA, upload, DP unit, epsilon
    personal: pd.DataFrame      # task, method label, client: personalized accuracy (mean over seeds)
    seeds: pd.DataFrame         # one row per finished federation: task, label, seed, acc, acc_personal
