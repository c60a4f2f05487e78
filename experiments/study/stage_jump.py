"""How much a DFM model's velocity of the earlier stages jumps where a later stage starts moving.

    python experiments/study/stage_jump.py CKPT [--num-samples 64] [--seed 0]

Samples with the model's default schedule up to each hand-over (generate.py's noise and labels),
then evaluates the model at that state and time twice: with the new stage inactive (as on the
step before) and active (as on the step after). Prints, per earlier stage, the relative change
|v_after - v_before| / |v_before| over the batch: what a multistep sampler carries across the
hand-over if it does not restart (docs/EXTENDING.md, "State across steps").
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv=None) -> int:
    from generation.labels import class_labels
    from generation.noise import initial_noise
    from models import load_pretrained
    from samplers.schedules import default_schedule, multistage_schedule

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_pretrained(args.ckpt)
    S = model.num_stages
    if S < 2:
        print(json.dumps({"error": "a one-stage model has no hand-over"}))
        return 2
    steps, thresholds = default_schedule(S)
    times, active = multistage_schedule(steps, thresholds)
    indices = list(range(args.num_samples))
    y = class_labels(args.num_samples, model.num_classes, args.seed, "balanced")
    noise = initial_noise(args.seed, indices, model.stage_shapes)
    out = {"ckpt": args.ckpt, "num_samples": args.num_samples, "hand_overs": []}
    for new in range(1, S):
        start = int(active[:, new].nonzero()[0])  # the first step with stage `new` moving
        with torch.no_grad():
            # Euler on the default schedule up to `start`, the output turned into a velocity as the samplers do
            xs = [n.double() for n in noise]
            for i in range(start):
                outputs = model([x.float() for x in xs], times[i][None].expand(len(y), -1).float(), y, active[i])
                v = [model.prediction.velocity(o.double(), x, times[i, s], model.path) for s, (o, x) in
                     enumerate(zip(outputs, xs))]
                xs = [x + (times[i + 1, s] - times[i, s]) * vs if active[i, s] else x
                      for s, (x, vs) in enumerate(zip(xs, v))]
            t = times[start][None].expand(len(y), -1).float()
            before = model([x.float() for x in xs], t, y, active[start - 1])
            after = model([x.float() for x in xs], t, y, active[start])
        jumps = [float((a - b).norm() / b.norm()) for a, b in zip(after[:new], before[:new])]
        out["hand_overs"].append({"stage": new, "step": start, "t": [float(v) for v in times[start]],
                                  "relative_jump_of_earlier_stages": jumps})
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
