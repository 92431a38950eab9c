"""The centralized ceiling: one client on the union of the data for the federated runs' sample budget,
beside the federated runs of the same task and recipe (the FFA table's cells, rendered before this family)."""
import pandas as pd

from scripts.figures.families import register
from scripts.figures.load import agg, federation_frame, num_labels, primary_split, sources
from scripts.figures.style import INTERVAL, METHOD_LABEL, fmt_pct, learned


def samples_seen(cfg):
    """Training samples one federation sees: rounds x local steps x batch x clients per round."""
    per_round = max(1, round(cfg["client_fraction"] * cfg["num_clients"]))
    return cfg["rounds"] * cfg["local_steps"] * cfg["batch_size"] * per_round


@register("ceiling")
def family_ceiling(w, runs, ctx):
    df = federation_frame(runs)
    if df.empty:
        return None
    cfg_of = {r["name"]: r["cfg"] for r in runs if r["cfg"]}
    df["samples"] = [samples_seen(cfg_of[n]) for n in df["run"]]
    rows, raw = [], []
    fed = ctx.results.get("ffa_table")
    for (task, method, samples), g in df.groupby(["task", "method", "samples"], sort=True):
        a = agg(g, ["task"]).iloc[0]
        chance = 1.0 / num_labels(task)
        rows.append({"task": task, "setting": f"centralized, 1 client, {samples:,} samples",
                     "method": METHOD_LABEL.get(method, method),
                     f"accuracy on {primary_split(task)} (%)": fmt_pct(a["mean"], a["ci"], a["n"])
                     + ("" if learned(a["mean"], chance) else " (chance)"), "seeds": int(a["n"])})
        raw.append(dict(task=task, setting="centralized", method=method, samples=samples, mean=a["mean"],
                        std=a["std"], n=int(a["n"]), **sources(a)))
        cells = fed.seeds if fed is not None and fed.seeds is not None else pd.DataFrame()
        if len(cells):
            f = cells[(cells.task == task) & (cells.method == method) & (cells.privacy == "non-private")]
            if len(f):
                b = agg(f, ["task"]).iloc[0]
                rows.append({"task": task, "setting": "federated (ffa_table's non-private cell)",
                             "method": METHOD_LABEL.get(method, method),
                             f"accuracy on {primary_split(task)} (%)": fmt_pct(b["mean"], b["ci"], b["n"]),
                             "seeds": int(b["n"])})
                raw.append(dict(task=task, setting="federated", method=method, samples=samples, mean=b["mean"],
                                std=b["std"], n=int(b["n"]), **sources(b)))
    w.table("ceiling", pd.DataFrame(rows).set_index("task"), pd.DataFrame(raw),
            "Centralized ceiling: one client on all training rows for the same number of samples as the federated "
            f"run (rounds x local steps x batch x clients per round), {INTERVAL}.")
    return pd.DataFrame(raw)
