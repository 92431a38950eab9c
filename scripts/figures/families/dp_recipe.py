"""DP recipe ablation: FFA-LoRA vs FedAvg-LoRA under each DP recipe at one ε, beside the FFA table's recipe."""
import numpy as np
import pandas as pd

from scripts.figures.families import register
from scripts.figures.load import agg, federation_frame, num_labels, per_seed, sources
from scripts.figures.style import INTERVAL, METHOD_LABEL, fmt_pct, learned, methods_present
from scripts.verdicts import paired_verdict


RECIPE_REFERENCE = "adamw_joint (FFA table)"


@register("dp_recipe")
def family_dp_recipe(w, runs, ctx):
    """Private accuracy by method and DP recipe at the family's ε, beside the FFA table's recipe (AdamW, joint
    clipping) at the same ε and seeds; FFA − FedAvg per recipe, paired by seed (scripts/verdicts.py)."""
    df = federation_frame(runs)
    if df.empty:
        return
    table = ctx.results.get("ffa_table")
    frames, ref = [df], table.seeds if table is not None else None
    if ref is not None and len(ref):
        same = ref[ref.task.isin(df.task.unique()) & ref.epsilon.isin(df.epsilon.unique())]
        frames.insert(0, same.assign(recipe=RECIPE_REFERENCE))
    both = pd.concat(frames, ignore_index=True)
    a = agg(both, ["task", "method", "recipe"])
    recipes = list(dict.fromkeys(both["recipe"]))
    eps = ", ".join(f"ε={e:g}" for e in sorted(df.epsilon.unique()))
    rows, raw, diffs = [], [], []
    for task in sorted(a.task.unique()):
        chance = 1.0 / num_labels(task)
        for method in methods_present(a[a.task == task]):
            row = {"task": task, "method": METHOD_LABEL.get(method, method)}
            for rec in recipes:
                c = a[(a.task == task) & (a.method == method) & (a.recipe == rec)]
                if c.empty:
                    row[rec] = "-"
                    continue
                c = c.iloc[0]
                row[rec] = fmt_pct(c["mean"], c["ci"], c["n"]) + ("" if learned(c["mean"], chance) else " (chance)")
                raw.append(dict(task=task, method=method, recipe=rec, mean=c["mean"], std=c["std"], n=c["n"],
                                **sources(c)))
            rows.append(row)
        for rec in recipes:
            seeds = [per_seed(both, task=task, method=m, recipe=rec) for m in ("ffa_lora", "fedavg_lora")]
            if all(seeds):
                v = paired_verdict(*seeds)
                dead = not learned(max(np.mean(list(x.values())) for x in seeds), chance)
                diffs.append(dict(task=task, recipe=rec, mean=v.mean, low=v.low, high=v.high, n=v.n,
                                  verdict="inconclusive (both at chance)" if dead else v.verdict,
                                  text=f"Δ {100 * v.mean:+.1f} points: no verdict, both at chance" if dead else v.text()))
    w.table("accuracy", pd.DataFrame(rows).set_index(["task", "method"]), pd.DataFrame(raw),
            f"Final accuracy (%) at {eps} (δ=1e-5) by DP recipe, {INTERVAL}; the first column is the "
            f"FFA table's cells at the same ε.")
    if diffs:
        d = pd.DataFrame(diffs)
        w.table("ffa_minus_fedavg", d[["task", "recipe", "text"]].rename(columns={"text": "FFA − FedAvg"})
                .set_index(["task", "recipe"]), d.drop(columns="text"),
                "FFA-LoRA minus FedAvg-LoRA by recipe, paired by seed: does the FFA table's verdict depend on "
                "the recipe?")
