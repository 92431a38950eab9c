"""How results look: method names and order, mean ± 95% interval formatting, the comparability rules, markdown /
LaTeX / CSV tables and PNG / PDF figures written deterministically (Writer), and the matplotlib setup.
"""
import math
import os
import shutil
from pathlib import Path

os.environ.setdefault("SOURCE_DATE_EPOCH", "0")          # reproducible PDF bytes

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PNG_META = {"Software": None}
PDF_META = {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None}
METHOD_LABEL = {"fedavg_fft": "FedAvg-FFT", "fedavg_lora": "FedAvg-LoRA", "ffa_lora": "FFA-LoRA",
                "slora": "SLoRA", "sa_fedlora": "SA-FedLoRA", "sa_fedlora_full": "SA-FedLoRA (full init)",
                "head_only": "head only"}
METHOD_ORDER = ["fedavg_fft", "fedavg_lora", "ffa_lora", "slora", "sa_fedlora", "sa_fedlora_full", "head_only"]
# How "comparable" and "same" are judged (also printed in the README):
COMPARABLE_TOL = 0.02      # accuracy points (fraction) below which two methods count as comparable ...
SPREAD = "max"             # ... or within the larger of the two seed standard deviations, whichever is larger

plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "font.size": 9, "axes.grid": True,
                     "grid.alpha": 0.3, "legend.fontsize": 8, "path.simplify": False})


# What a table's "a ± b" and a figure's error bar mean (captions quote it):
INTERVAL = "mean ± half-width of the 95% t-interval over seeds; one seed: its value, no interval"
BARS = "error bars: 95% t-interval over seeds (none for one seed)"


def fmt_pct(mean, half, n):
    """A mean accuracy in percent with its 95% interval half-width (scripts.figures.load.ci_half); a single
    seed says so instead of showing a zero-width interval."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if int(n) < 2 or half != half:
        return f"{100 * mean:.1f} (1 seed)"
    return f"{100 * mean:.1f} ± {100 * half:.1f}"


def tol(std_a, std_b):
    return max(COMPARABLE_TOL, std_a, std_b)


def within_spread(mean_a, std_a, mean_b, std_b):
    """The difference is smaller than the seed spread (the larger of the two std)."""
    return abs(mean_a - mean_b) < max(std_a, std_b)


def markdown(df, index=True):
    """Pipe table without the tabulate dependency; cells as already formatted strings."""
    d = df.reset_index() if index else df
    cols = [str(c) for c in d.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|"]
    for row in d.itertuples(index=False):
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    return "\n".join(lines) + "\n"


def _tex_escape(s):
    s = str(s)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        s = s.replace(a, b)
    return s.replace("±", r"$\pm$").replace("≈", r"$\approx$").replace("ε", r"$\varepsilon$") \
        .replace("σ", r"$\sigma$").replace("α", r"$\alpha$").replace("†", r"$^\dagger$") \
        .replace("Δ", r"$\Delta$")


def latex(df, caption, index=True):
    d = df.reset_index() if index else df.copy()
    d.columns = [_tex_escape(c) for c in d.columns]
    d = d.map(_tex_escape)
    return d.to_latex(index=False, escape=False, caption=_tex_escape(caption), column_format="l" + "r" * (d.shape[1] - 1))


class Writer:
    """Collects every table and figure of one family (for the README) and writes them deterministically."""

    def __init__(self, root, family, profile):
        self.root, self.family, self.profile = Path(root), family, profile
        self.out = self.root / family / profile
        self.items = []            # (kind, name, caption, paths, markdown text)

    def table(self, name, display, raw, caption):
        """display: formatted DataFrame (md/tex); raw: numeric DataFrame (csv)."""
        d = self.out / "tables"
        d.mkdir(parents=True, exist_ok=True)
        md = markdown(display)
        (d / f"{name}.md").write_text(f"<!-- {caption} -->\n" + md)
        raw.to_csv(d / f"{name}.csv", index=False, float_format="%.6g", lineterminator="\n")
        (d / f"{name}.tex").write_text(latex(display, caption))
        self.items.append(("table", name, caption, [d / f"{name}.{e}" for e in ("md", "csv", "tex")], md))

    def figure(self, name, fig, caption):
        d = self.out / "figures"
        d.mkdir(parents=True, exist_ok=True)
        fig.savefig(d / f"{name}.png", metadata=PNG_META)
        fig.savefig(d / f"{name}.pdf", metadata=PDF_META)
        plt.close(fig)
        self.items.append(("figure", name, caption, [d / f"{name}.png", d / f"{name}.pdf"], None))


def clean_outputs(out_dir):
    for sub in ("tables", "figures"):
        if (out_dir / sub).is_dir():
            shutil.rmtree(out_dir / sub)


def errorbar(ax, x, mean, half, label, **kw):
    """Means with their 95% interval half-widths (nan: a single seed, no bar)."""
    ax.errorbar(x, mean, yerr=[0.0 if h != h else h for h in half], marker="o", ms=4, capsize=3, lw=1.2,
                label=label, **kw)


def method_color(method):
    """One colour per method in every figure (its place in METHOD_ORDER; grey for any other)."""
    return f"C{METHOD_ORDER.index(method)}" if method in METHOD_ORDER else "C7"


def methods_present(df):
    present = list(dict.fromkeys(df["method"])) if len(df) else []
    return [m for m in METHOD_ORDER if m in present] + sorted(m for m in present if m not in METHOD_ORDER)


def learned(mean, chance):
    return mean > chance + 0.05


def privacy_order(levels):
    """Privacy labels (scripts.figures.load.privacy_label) from the least private: non-private, σ=0 (clip
    only), then ε from the largest to the smallest."""
    from scripts.figures.load import CLIP_ONLY_LABEL

    def key(s):
        if s == "non-private":
            return (0, 0.0)
        return (1, 0.0) if s == CLIP_ONLY_LABEL else (2, -float(s.split("=")[1]))
    return sorted(set(levels), key=key)


def partition_key(label):
    """Order partitions from IID (least skew) to the smallest Dirichlet alpha."""
    if label == "iid":
        return (0, 0.0)
    try:
        return (1, -float(label.lstrip("dira")))
    except ValueError:
        return (2, 0.0)


def partition_name(label):
    return "IID" if label == "iid" else f"α={label.lstrip('dira')}" if label.startswith(("dir", "a")) else label
