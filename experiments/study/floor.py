"""The real-vs-real SWD floor of the study: SWD of training crops against the held-out reference,
with as many training crops as the evaluations generate (SWD depends on the set sizes).

    python experiments/study/floor.py --data exps/study/data --num 256 --repeats 3 --out floor.json

Each repeat draws a different seeded subset of ``--num`` training crops (balanced over the classes
like the evaluation labels) and scores it exactly as the trainer scores samples
(``evaluation.swd.swd(images, reference, seed=0)``). Writes ``{"swd": [...], "mean", "std", ...}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def floor(data_dir: str, num: int, repeats: int) -> dict:
    import data
    from evaluation.stats_file import load_statistics
    from evaluation.swd import swd

    reference = load_statistics(os.path.join(data_dir, "heldout_swd.npz")).arrays["swd_images"]
    dataset = data.open_dataset(os.path.join(data_dir, "train"))
    labels = np.array([int(dataset[i][1]) for i in range(len(dataset))])
    classes = np.unique(labels)
    results = []
    for r in range(repeats):
        rng = np.random.default_rng([1234, r])
        per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
        picked = [int(per_class[k % len(classes)][k // len(classes)]) for k in range(num)]
        images = np.stack([dataset[i][0].permute(1, 2, 0).numpy() for i in picked])
        results.append(swd(images, reference, seed=0).as_dict())
    values = [r["swd"] for r in results]
    return {"num_images": num, "reference_images": len(reference), "repeats": repeats, "swd": values,
            "mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if repeats > 1 else 0.0,
            "per_level": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the study data folder (build_data.py --dest)")
    parser.add_argument("--num", type=int, default=256, help="training crops per repeat (= eval_num_samples)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True, help="output JSON")
    args = parser.parse_args(argv)
    result = floor(args.data, args.num, args.repeats)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"SWD floor (train vs held-out, {args.num} images, {args.repeats} subsets): "
          f"{result['mean']:.2f} +- {result['std']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
