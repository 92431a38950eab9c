"""Export one federation's final global adapter of a finished run in peft format.

    python -m scripts.export_peft RUN_DIR OUT_DIR [--federation F]

RUN_DIR is a fedsim run directory with final_global.pt (written by fedsim.run for LoRA methods:
{"global": {canonical name: [F, ...]}, "lora_scale": {module: [F]}}). OUT_DIR gets what
`peft.PeftModel.from_pretrained` reads: adapter_config.json and adapter_model.safetensors with peft's key
names (`base_model.model.<module>.lora_A.weight`, `...lora_B.weight`, the classification head through
`modules_to_save`), written by peft's own save_pretrained, plus fedsim_export.json saying which backbone
to load it on (model, num_hidden_layers, num_labels, pooling) and which federation it is.

lora_alpha is written as scale * r, so peft's scaling (lora_alpha / r) equals the engine's per-federation
scale also when the rank changed during training (SA-FedLoRA) or alpha was a sweep variant. Not exportable:
FedAvg-FFT (no adapter: every weight is trained; fedsim.run does not keep its final state), a SLoRA run
that ended in stage 1 (a sparse delta, not LoRA) and FedEx-LoRA / FLoRA (a dense delta folded into the frozen
weights).

Loading it:
    from fedsim.models import load_backbone
    from peft import PeftModel
    base, tok = load_backbone(model, num_labels=..., num_hidden_layers=..., pooling=...)  # fedsim_export.json
    model = PeftModel.from_pretrained(base, OUT_DIR).eval()
    logits = model(**tok(texts, padding=True, return_tensors="pt")).logits

With pooling "mean" (the default for sentence-transformers backbones) the base is a MeanPoolingClassifier:
the transformers encoder (AutoModel, no pooler) and a linear `classifier` on the masked mean of its last
hidden states; its head weights come back from the adapter file (peft `modules_to_save`). With "cls" it
is transformers' AutoModelForSequenceClassification.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import yaml


def load_final_global(run_dir):
    run_dir = Path(run_dir)
    path = run_dir / "final_global.pt"
    if not path.exists():
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
        method = (cfg.get("method") or {}).get("name")
        why = ("FedAvg-FFT trains every weight and has no adapter to export" if method == "fedavg_fft" else
               "the run is not finished, or was made before fedsim.run saved final_global.pt: rerun it")
        raise FileNotFoundError(f"{path} does not exist: {why}")
    return torch.load(path, map_location="cpu", weights_only=True)


def export_peft(run_dir, out_dir, federation=0):
    """Write federation `federation`'s final global adapter of run_dir as a peft adapter into out_dir."""
    from peft import LoraConfig, TaskType, get_peft_model

    from fedsim.models import load_backbone, resolve_pooling
    from fedsim.stacked import head_module_names
    from fedsim.tasks import get_task

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    state = load_final_global(run_dir)
    glob, scales = state["global"], state["lora_scale"]
    F = next(iter(glob.values())).shape[0]
    if not 0 <= federation < F:
        raise ValueError(f"federation must be in 0..{F - 1} (the run has {F} federations), got {federation}")
    summary_path = run_dir / "summary.json"
    feds = json.loads(summary_path.read_text()).get("federations", []) if summary_path.exists() else []
    failed = [f for f in feds if f.get("federation") == federation and f.get("status") == "failed"]
    if failed:
        raise ValueError(f"federation {federation} failed ({failed[0]['failure']['reason']}): its saved state is the "
                         f"last finite one, not a trained model; export another federation")
    if any(k.endswith(".sparse") for k in glob):
        raise ValueError("this SLoRA run ended in stage 1 (a sparse delta, not LoRA): nothing to export as peft LoRA")
    if any(k.endswith(".folded") for k in glob):
        raise ValueError("this run folded updates into the frozen weights (FedEx-LoRA, FLoRA): its model is not a "
                         "LoRA adapter on the pretrained backbone, so it cannot be exported as one; its final_global.pt "
                         "holds each adapted weight's dense delta under '<module>.folded'")
    modules = [k[: -len(".lora_A")] for k in glob if k.endswith(".lora_A")]
    if not modules:
        raise ValueError(f"no LoRA tensors in {run_dir / 'final_global.pt'}")
    ranks = {glob[m + ".lora_A"].shape[1] for m in modules}
    if len(ranks) != 1:
        raise ValueError(f"modules have different ranks {sorted(ranks)}; fedsim keeps one rank per model")
    r = ranks.pop()
    alphas = {m: float(scales[m][federation]) * r for m in modules}
    alpha = alphas[modules[0]]
    task = get_task(cfg["task"])
    pooling = cfg.get("pooling", "cls")           # runs made before the key existed used [CLS] + pooler
    model, _ = load_backbone(cfg["model"], num_labels=task.num_labels, num_hidden_layers=cfg["num_hidden_layers"],
                             seed=cfg["seeds"][0], pooling=pooling)
    pooling = resolve_pooling(cfg["model"], pooling)
    heads = head_module_names(model)
    lcfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=modules,
                      task_type=TaskType.SEQ_CLS, modules_to_save=heads,
                      alpha_pattern={m: a for m, a in alphas.items() if abs(a - alpha) > 1e-12 * max(1.0, alpha)})
    peft_model = get_peft_model(model, lcfg)
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for m in modules:
            for f in ("lora_A", "lora_B"):
                p = params[f"base_model.model.{m}.{f}.default.weight"]
                p.copy_(glob[f"{m}.{f}"][federation].to(p.dtype))
        for h in heads:
            for f in ("weight", "bias"):
                key = f"base_model.model.{h}.modules_to_save.default.{f}"
                if f"{h}.{f}" in glob:
                    params[key].copy_(glob[f"{h}.{f}"][federation].to(params[key].dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir))
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    fed = next((f for f in summary.get("federations", []) if f.get("federation") == federation), {})
    info = dict(run_dir=str(run_dir), federation=federation, seed=fed.get("seed"), variant=fed.get("variant"),
                method=cfg["method"], task=task.name, label_names=list(task.label_names), model=cfg["model"],
                num_hidden_layers=cfg["num_hidden_layers"], num_labels=task.num_labels, pooling=pooling, lora_rank=r,
                lora_alpha=alpha, target_modules=modules, modules_to_save=heads, final_accuracy=fed.get("final"),
                epsilon_spent=fed.get("epsilon_spent"))
    (out_dir / "fedsim_export.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--federation", type=int, default=0, help="which federation (seed x variant) of the run")
    args = ap.parse_args(argv)
    try:
        out = export_peft(args.run_dir, args.out_dir, args.federation)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"export_peft: {e}")
    print(out)


if __name__ == "__main__":
    main()
