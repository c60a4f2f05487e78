"""The study's EMA-length sweep: score post-hoc EMA reconstructions of every std against the run's
fixed-decay EMA, with the trainer's own evaluator (the SWD of eval_every).

    python experiments/study/ema_sweep.py RUN ... --std 0.03 0.05 0.07 0.1 0.15 0.2 \\
        [--step 2000] [--out results.jsonl]
    python experiments/study/ema_sweep.py --table results.jsonl [--metric swd]

For each run (trained with posthoc_ema.stds; experiments/study/ema_sweep.sh): reconstruct every std
at the snapshot step (training.posthoc_ema), sample 256 images from each with the run's evaluation
sampler, and score them; also the checkpoint's classic EMA (`ema_decay`) at the same step.
Prints and appends one JSON line per (run, std): {"run", "step", "std" (null = the fixed decay),
"kernel_error", <metrics>}.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def sweep(run: str, stds, step=None) -> list:
    import models
    from training.checkpoint import checkpoint_path, load_checkpoint
    from training.config import parse_config
    from training.evaluator import make_evaluator
    from training.posthoc_ema import reconstruct

    cfg = parse_config(["--config", os.path.join(run, "config.yaml")])
    evaluator = make_evaluator(cfg, exp_dir=run, device="cpu", rank=0, num_processes=1)
    records = reconstruct(run, stds, step)
    step = records[0]["step"]
    name = os.path.basename(os.path.normpath(run))
    results = []
    state = load_checkpoint(checkpoint_path(run, step))
    model = models.create_model(**state["arch"])
    model.load_state_dict(state["ema"])
    results.append({"run": name, "step": step, "std": None, "ema_decay": cfg.ema_decay, **evaluator(model)})
    for record in records:
        model = models.load_pretrained(record["path"])
        results.append({"run": name, "step": step, "std": record["std"], "kernel_error": record["kernel_error"],
                        **evaluator(model)})
    return results


def table(records: list, metric: str = "swd") -> str:
    """Markdown: one row per std (the fixed decay first), one column per model (the run name without
    its ``_s<seed>``), mean ± std over the seeds' runs."""
    import re

    import numpy as np

    models, rows = [], {}
    for r in records:
        model = re.sub(r"_s\d+$", "", r["run"])
        models += [model] if model not in models else []
        key = "fixed decay " + str(r.get("ema_decay")) if r["std"] is None else f"{r['std']:g}"
        rows.setdefault(key, {}).setdefault(model, []).append(r[metric])
    order = sorted(rows, key=lambda k: (not k.startswith("fixed"), float(k) if not k.startswith("fixed") else 0))
    lines = [f"| EMA ({metric} x 1e3, mean ± std, n) | " + " | ".join(models) + " |",
             "|---" * (len(models) + 1) + "|"]
    for key in order:
        cells = []
        for model in models:
            v = np.asarray(rows[key].get(model, []), dtype=float)
            cells.append(f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0:.1f} ({len(v)})" if len(v) else "")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*")
    parser.add_argument("--std", type=float, nargs="+")
    parser.add_argument("--table", default=None, help="print the Markdown table of this results file instead")
    parser.add_argument("--metric", default="swd", help="the metric of --table")
    parser.add_argument("--step", type=int, default=None, help="snapshot step (default: the last)")
    parser.add_argument("--out", default=None, help="append the results to this JSONL file")
    args = parser.parse_args(argv)
    if args.table:
        import json

        with open(args.table) as f:
            print(table([json.loads(line) for line in f if line.strip()], args.metric))
        return 0
    if not args.runs or not args.std:
        parser.error("give run folders and --std (or --table FILE)")
    from resample import emit
    from training.posthoc_ema import PosthocError

    for run in args.runs:
        try:
            emit(sweep(run, args.std, args.step), args.out)
        except PosthocError as e:
            print(f"ema_sweep.py: error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
