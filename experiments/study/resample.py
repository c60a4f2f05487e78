"""Score a study run's final EMA weights again with other sampler settings (no retraining).

    python experiments/study/resample.py RUN ... [--set eval_sampler.thresholds=[0.3] ...]
        [--set eval_sampler.num_steps_per_scale=[10,10]] [--out results.jsonl]

For each run: its `config.yaml` plus the `--set` overrides (any `eval_*` key), its newest
checkpoint's EMA weights, and the trainer's own evaluator (`training.evaluator`), so the value
is what `eval_every` would have logged with those settings. Prints and appends one JSON line per
run: {"run", "step", "overrides", <metrics>}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def rescore(run: str, overrides: list) -> dict:
    import models
    from training.checkpoint import list_checkpoints, load_checkpoint
    from training.config import model_kwargs, parse_config
    from training.evaluator import make_evaluator

    cfg = parse_config(["--config", os.path.join(run, "config.yaml"), *overrides])
    step, path = list_checkpoints(run)[-1]
    state = load_checkpoint(path)
    model = models.create_model(cfg.model, **model_kwargs(cfg, 3, cfg.resolution))
    model.load_state_dict(state["ema"])
    evaluator = make_evaluator(cfg, exp_dir=run, device="cpu", rank=0, num_processes=1)
    return {"run": os.path.basename(os.path.normpath(run)), "step": step, "overrides": overrides, **evaluator(model)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", default=None, help="append the results to this JSONL file")
    args = parser.parse_args(argv)
    for run in args.runs:
        result = rescore(run, args.set)
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
