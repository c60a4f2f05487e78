r"""Train SiT, DFM-SiT, ELIT-SiT and DFM-ELIT-SiT models, with or without REPA alignment (SPEC §4, §6).

    python train.py --config experiments/train/demo_cpu.yaml                  # CPU demo
    accelerate launch --multi_gpu --num_processes 8 train.py \
        --config experiments/train/dfm_sit_xl_2_256.yaml --data-dir DIR     # 8 GPUs
    python train.py --help                                                  # every key

Configuration: defaults <- --config YAML <- `key=value` / `--key value` overrides.
See docs/TRAINING.md.

Exit status: 0 done; 1 stopped by an error (one line, also in log.txt); 2 bad config or data (or
the experiment folder is in use by another run); 75 stopped by SIGTERM / SIGUSR1 / Ctrl-C after
writing a checkpoint (run again with resume=auto).
"""

import os
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from training.config import ConfigError, config_docs, parse_config

    if any(a in ("-h", "--help") for a in argv):
        from utils.cli import print_text

        return print_text(f"{__doc__}\nConfig keys (default):\n{config_docs()}")
    rank = int(os.environ.get("RANK", "0"))
    from training.errors import TrainingStopped
    from training.loop import train
    from training.preemption import PREEMPTED_EXIT_CODE

    try:
        cfg = parse_config(argv)
        if train(cfg).preempted:  # SIGTERM / SIGUSR1 / Ctrl-C: checkpoint written, the line logged
            return PREEMPTED_EXIT_CODE
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # non-finite loss, a checkpoint that cannot be written
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
