"""Cost of the finite-weights check (models/finite.py) on a full-size state dict.

    OMP_NUM_THREADS=1 python -m bench.finite_check [--model SiT-XL/2] [--repeats 5]

Prints the number of values and the median time of `first_nonfinite` over the repeats.
"""
import argparse
import statistics
import time

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SiT-XL/2")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from models.finite import first_nonfinite
    from models.registry import create_model

    state = create_model(args.model).state_dict()
    values = sum(t.numel() for t in state.values())
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        assert first_nonfinite(state) is None
        times.append(time.perf_counter() - start)
    print(f"{args.model}: {values:,} values, {torch.get_num_threads()} thread(s): "
          f"median {statistics.median(times):.3f} s over {args.repeats} runs "
          f"(min {min(times):.3f}, max {max(times):.3f})")


if __name__ == "__main__":
    main()
