"""Write a partition's per-client label table (csv, md) and heatmap (png).

    python -m scripts.partition_report --task mnli --partition dirichlet --alpha 0.1 --clients 10
"""
import argparse
import sys
from pathlib import Path

import partitions
from fedsim import tasks

# CLI flag -> partition parameter, and the short tag it gets in file names
FLAGS = {"alpha": "a", "labels_per_client": "k", "min_samples": "m", "distribution": "", "sigma": "sig",
         "exponent": "exp"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, help=f"one of {sorted(tasks.TASKS)}")
    p.add_argument("--partition", required=True, help=f"one of {sorted(partitions.PARTITIONS)}")
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, help="dirichlet concentration")
    p.add_argument("--labels-per-client", type=int, help="shards: distinct labels per client")
    p.add_argument("--min-samples", type=int, help="dirichlet/quantity: minimum client size")
    p.add_argument("--distribution", choices=["lognormal", "powerlaw"], help="quantity: size distribution")
    p.add_argument("--sigma", type=float, help="quantity lognormal: spread")
    p.add_argument("--exponent", type=float, help="quantity powerlaw: exponent")
    p.add_argument("--subsample", type=int, help="partition a seeded subset of the train split")
    p.add_argument("--data-dir", help="dataset root (default: $FEDSIM_DATA or ../shared/data)")
    p.add_argument("--out", default="results/partitions")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    params = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
    try:  # every argument error surfaces here, before any data is read
        spec = tasks.get_task(args.task)
        name = partitions.validate(args.partition, args.clients, args.seed, **params)
        if params.get("labels_per_client", 0) > spec.num_labels:
            raise ValueError(f"--labels-per-client {args.labels_per_client} exceeds the {spec.num_labels} "
                             f"labels of {spec.name}")
    except ValueError as e:
        sys.exit(f"partition_report: {e}")

    try:
        labels = tasks.load_labels(spec, data_dir=args.data_dir, subsample=args.subsample, seed=args.seed)
        parts = partitions.make_partition(name, labels, args.clients, args.seed, **params)
    except (ValueError, tasks.DataNotFoundError, tasks.DataReadError) as e:
        sys.exit(f"partition_report: {e}")
    table = partitions.partition_table(parts, labels, spec.label_names)

    tag = "_".join(f"{FLAGS[k]}{v}" for k, v in params.items())
    sub = f"_n{args.subsample}" if args.subsample else ""
    stem = "_".join(x for x in (spec.name, name, tag) if x) + f"{sub}_c{args.clients}_s{args.seed}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"{stem}.csv")
    desc = f"{spec.name} train, {name}" + (f" ({', '.join(f'{k}={v}' for k, v in params.items())})" if params else "")
    sizes = table["size"]
    (out / f"{stem}.md").write_text(
        f"# {desc}, {args.clients} clients, seed {args.seed}\n\n"
        f"{len(labels)} samples; client sizes min {sizes.min()}, median {int(sizes.median())}, max {sizes.max()}; "
        f"labels per client (nonzero) mean {(table.drop(columns='size') > 0).sum(axis=1).mean():.2f}\n\n"
        + markdown_table(table) + "\n")
    partitions.plot_partition_heatmap(table, out / f"{stem}.png", title=f"{desc}, {args.clients} clients")
    paths = [out / f"{stem}.{ext}" for ext in ("csv", "md", "png")]
    print("\n".join(map(str, paths)))
    return paths


def markdown_table(table) -> str:
    """Plain pipe table (pandas' to_markdown would need the tabulate package)."""
    cols = [table.index.name or "", *map(str, table.columns)]
    rows = [[str(i), *map(str, r)] for i, r in zip(table.index, table.to_numpy())]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


if __name__ == "__main__":
    main()
