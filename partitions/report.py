"""Per-client label counts of a partition, as a table and as a heatmap."""
import math
from pathlib import Path

import numpy as np
import pandas as pd


def partition_table(parts, labels, label_names=None) -> pd.DataFrame:
    """Rows = clients (index "client"), columns = size + one count column per label."""
    labels = np.asarray(labels)
    num_labels = max(int(labels.max()) + 1, len(label_names or ()))
    names = list(label_names) if label_names is not None else [str(i) for i in range(num_labels)]
    if len(names) != num_labels:
        raise ValueError(f"{len(names)} label_names for {num_labels} label ids")
    counts = np.stack([np.bincount(labels[p], minlength=num_labels) for p in parts])
    table = pd.DataFrame(counts, columns=names)
    table.insert(0, "size", counts.sum(1))
    table.index.name = "client"
    return table


def plot_partition_heatmap(table: pd.DataFrame, path, title=None) -> list:
    """Clients x labels count heatmap. `path`: one file or a list (e.g. [x.png, x.pdf]); returns paths."""
    import matplotlib                     # here, not at import: training never loads the plotting stack
    matplotlib.use("Agg")                 # headless: no display on the build machines
    import matplotlib.pyplot as plt
    counts = table.drop(columns="size").to_numpy()
    n_clients, n_labels = counts.shape
    fig, ax = plt.subplots(figsize=(min(2.5 + 0.45 * n_labels, 14), min(1.8 + 0.16 * n_clients, 18)))
    im = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(n_labels), labels=table.columns[1:], rotation=45 if n_labels > 3 else 0, ha="right"
                  if n_labels > 3 else "center", fontsize=8 if n_labels > 10 else 9)
    step = max(1, math.ceil(n_clients / 30))  # at most ~30 client ticks stay readable
    ax.set_yticks(range(0, n_clients, step), labels=[str(i) for i in range(0, n_clients, step)], fontsize=8)
    if n_clients * n_labels <= 200:  # small grids: print the counts in the cells
        hi = counts.max() if counts.size else 0
        for (i, j), v in np.ndenumerate(counts):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="black" if v > 0.6 * hi else "white")
    ax.set_xlabel("label")
    ax.set_ylabel("client")
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="samples", fraction=0.05, pad=0.03)
    fig.tight_layout()
    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths
