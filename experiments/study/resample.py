"""Score a study run's EMA weights again with other sampler settings (no retraining).

    python experiments/study/resample.py RUN ... [--set eval_sampler.thresholds=[0.3] ...]
        [--set eval_sampler.num_steps_per_scale=[10,10]] [--steps 1000 2000 | --all-steps]
        [--out results.jsonl]

For each run and checkpoint (the newest by default): its `config.yaml` plus the `--set`
overrides (any `eval_*` key, e.g. `eval_sampler.inference_budget=0.5` for ELIT), the
checkpoint's EMA weights rebuilt from its stored `arch` (so stage scales and ELIT settings come
with them), and the trainer's own evaluator (`training.evaluator`), so the value is what
`eval_every` would have logged with those settings. Prints and appends one JSON line per
checkpoint: {"run", "step", "overrides", <metrics>}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def rescore(run: str, overrides: list, steps=None) -> list:
    """[{"run", "step", "overrides", <metrics>}] for the checkpoints of `steps` (None: the newest;
    "all": every one)."""
    import models
    from training.checkpoint import list_checkpoints, load_checkpoint
    from training.config import parse_config
    from training.evaluator import make_evaluator

    cfg = parse_config(["--config", os.path.join(run, "config.yaml"), *overrides])
    found = dict(list_checkpoints(run))
    chosen = [max(found)] if steps is None else sorted(found) if steps == "all" else [int(s) for s in steps]
    missing = [s for s in chosen if s not in found]
    if missing:
        raise SystemExit(f"error: {run} has no checkpoint of step(s) {missing}; it has {sorted(found)}")
    evaluator = make_evaluator(cfg, exp_dir=run, device="cpu", rank=0, num_processes=1)
    results = []
    for step in chosen:
        state = load_checkpoint(found[step])
        model = models.create_model(**state["arch"])
        model.load_state_dict(state["ema"])
        results.append({"run": os.path.basename(os.path.normpath(run)), "step": step, "overrides": overrides,
                        **evaluator(model)})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--steps", nargs="+", default=None, help="checkpoint steps to score (default: the newest)")
    parser.add_argument("--all-steps", action="store_true", help="score every checkpoint of the run")
    parser.add_argument("--out", default=None, help="append the results to this JSONL file")
    args = parser.parse_args(argv)
    for run in args.runs:
        emit(rescore(run, args.set, "all" if args.all_steps else args.steps), args.out)
    return 0


def emit(results, out=None) -> None:
    """Print each result as a JSON line, and append it to `out` when given."""
    for result in results:
        line = json.dumps(result)
        print(line, flush=True)
        if out:
            with open(out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
