"""A process of the 2-rank non-finite skip test (tests/test_nonfinite.py), run by torchrun: train.py's
main, with the micro-batches of one rank turned into NaN at the given steps (a bad batch on one
rank only). Usage: python tests/nonfinite_worker.py RANK STEPS train.py-argv..."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    bad_rank, bad_steps, argv = int(sys.argv[1]), {int(s) for s in sys.argv[2].split(",")}, sys.argv[3:]
    import train
    from training import loop

    real = loop.BatchPreparer.__call__
    calls = [0]

    def poisoned(self, items, generator):
        inputs = real(self, items, generator)
        if int(os.environ.get("RANK", "0")) == bad_rank and calls[0] in bad_steps:
            inputs.x = inputs.x * float("nan")
        calls[0] += 1
        return inputs

    loop.BatchPreparer.__call__ = poisoned
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
