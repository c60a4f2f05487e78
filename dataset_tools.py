"""Dataset preparation: ImageNet-style class folders -> PNG dataset -> SD-VAE latents.

    python dataset_tools.py convert --source ILSVRC/Data/CLS-LOC/train --dest data/images \\
        --resolution 256x256 --transform center-crop-dhariwal
    python dataset_tools.py encode --source data/images --dest data/vae-sd
    torchrun --nproc_per_node 8 dataset_tools.py encode --source data/images --dest data/vae-sd
    python dataset_tools.py verify data/vae-sd      # every item readable? exit 1 when not (writes nothing)

Both steps resume when rerun. Exit status: 0 done; 2 bad input (nothing written) or a destination
that cannot be written (read-only, no permission); 1 a full disk or quota (the complete files are
kept: free space and rerun to resume), or verify found problems. Formats and flags: docs/DATA.md.
Logic: data/convert.py, data/encode.py, data/verify.py.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse(argv=None) -> argparse.Namespace:
    from data.encode import FORMATS, PRECISIONS
    from data.transforms import TRANSFORMS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="class folders (folder or .zip) -> fixed-resolution PNG dataset")
    conv.add_argument("--source", required=True, help="folder or .zip of class sub-folders (ImageNet train layout)")
    conv.add_argument("--dest", required=True, help="output folder, or a path ending in .zip")
    conv.add_argument("--resolution", default="256x256", help="WIDTHxHEIGHT of the output images (default 256x256)")
    conv.add_argument("--transform", default="center-crop-dhariwal", choices=TRANSFORMS,
                      help="center-crop-dhariwal (ADM, default), center-crop (EDM), none (resize only)")
    conv.add_argument("--max-images", type=int, default=None, help="only the first N image files (sorted order)")
    conv.add_argument("--workers", type=int, default=None, help="processes (default: all CPU cores)")
    conv.add_argument("--png-compression", type=int, default=1, choices=range(10), metavar="0-9",
                      help="zlib level of the PNGs (default 1: fast; 0 = larger files, 6-9 = slower)")
    conv.add_argument("--no-progress", action="store_true", help="no progress bar")

    enc = sub.add_parser("encode", help="PNG dataset -> SD-VAE posterior moments (mean || std, float32)")
    enc.add_argument("--source", required=True, help="output of convert (folder or .zip)")
    enc.add_argument("--dest", required=True, help="output folder")
    enc.add_argument("--vae", default="stabilityai/sd-vae-ft-mse",
                     help="hub name, short name (ft-mse, ft-ema) or local save_pretrained folder")
    enc.add_argument("--format", default="per-image", choices=FORMATS,
                     help="per-image .npy files (REPA layout, default) or packed memory-mappable shards")
    enc.add_argument("--shard-size", type=int, default=10000, help="items per shard for --format packed")
    enc.add_argument("--batch-size", type=int, default=64, help="images per VAE call, per process")
    enc.add_argument("--precision", default="fp32", choices=PRECISIONS,
                     help="fp32 (default) or bf16 autocast (faster on GPU; moments stored as float32)")
    enc.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 8 on GPU, 0 on CPU)")
    enc.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    enc.add_argument("--no-progress", action="store_true", help="no progress bar")
    ver = sub.add_parser("verify", help="check every item of a dataset (images or latents); exit 1 on problems")
    ver.add_argument("path", help="dataset folder or .zip (output of convert or encode)")
    ver.add_argument("--workers", type=int, default=None, help="processes (default: all CPU cores)")
    ver.add_argument("--report", default=None, metavar="FILE",
                     help="write the full report (JSON) to FILE; '-' prints it instead of the summary. Default: "
                          "none; nothing is ever written into the dataset")
    ver.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    from data.storage import DestinationWriteError

    try:
        if args.command == "convert":
            from data.convert import convert_dataset, format_summary
            from data.transforms import parse_resolution

            summary = convert_dataset(
                args.source, args.dest, resolution=parse_resolution(args.resolution), transform=args.transform,
                max_images=args.max_images, workers=args.workers, compress_level=args.png_compression,
                progress=not args.no_progress,
            )
            print(format_summary(summary))
        elif args.command == "verify":
            from data.verify import format_summary, verify_dataset

            to_stdout = args.report == "-"
            summary = verify_dataset(args.path, workers=args.workers, report=None if to_stdout else args.report,
                                     progress=not args.no_progress)
            if to_stdout:
                import json

                print(json.dumps(summary["report_data"], indent=1))
            else:
                print(format_summary(summary))
            return 1 if summary["num_problems"] else 0
        else:
            from data.encode import encode_dataset, format_summary

            summary = encode_dataset(
                args.source, args.dest, vae=args.vae, fmt=args.format, batch_size=args.batch_size,
                precision=args.precision, shard_size=args.shard_size, workers=args.workers, device=args.device,
                progress=not args.no_progress,
            )
            if summary["rank"] == 0:
                print(format_summary(summary))
    except DestinationWriteError as exc:  # before RuntimeError: its exit status says which kind
        print(f"dataset_tools.py {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as exc:
        print(f"dataset_tools.py {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ndataset_tools.py {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
