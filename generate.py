r"""Sample images from a SiT, DFM-SiT, ELIT-SiT or DFM-ELIT-SiT checkpoint (ours, REPA's or the official
SiT ones); write PNGs and an .npz for the ADM suite.

    torchrun --nproc_per_node=8 generate.py --config experiments/generation/dfm_sit_b_256.yaml \
        --ckpt exps/dfm-sit-b-2-256px/checkpoints/0400000.pt [key=value ...]
    python generate.py --ckpt PATH num_samples=1000          # one process

Every option is a key of generation.config.GenerateConfig (`python generate.py --help`);
docs/GENERATION.md explains them, the determinism and resume guarantees and the outputs.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from generation.config import GENERATE_ALIASES, GenerateConfig, GenerationError, load_generate_config
    from utils.config import config_help

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        from utils.cli import print_text

        return print_text(f"{__doc__}\noptions (defaults <- --config FILE.yaml <- key=value / --key value):\n"
                          + config_help(GenerateConfig, GENERATE_ALIASES))
    try:
        try:
            cfg = load_generate_config(argv)
        except (ValueError, FileNotFoundError) as error:  # unknown key, bad value, missing --config
            raise GenerationError(str(error)) from None
        from generation.runner import run
        run(cfg)
    except GenerationError as error:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        prefix = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
        print(f"{prefix}generate.py: error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
