"""The study's EMA-length sweep: score post-hoc EMA reconstructions of every std against the run's
fixed-decay EMA, with the trainer's own evaluator (the SWD of eval_every).

    python experiments/study/ema_sweep.py RUN ... --std 0.02 0.03 0.05 0.07 0.1 0.15 0.2 \\
        [--step 2000] [--out results.jsonl]

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--std", type=float, nargs="+", required=True)
    parser.add_argument("--step", type=int, default=None, help="snapshot step (default: the last)")
    parser.add_argument("--out", default=None, help="append the results to this JSONL file")
    args = parser.parse_args(argv)
    from resample import emit

    for run in args.runs:
        emit(sweep(run, args.std, args.step), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
