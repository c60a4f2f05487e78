"""Throughput benchmark: training img/s, MFU, peak memory, sampling img/s, loader items/s, and
ELIT's training and sampling throughput at the full and at 25 % budget.

    python -m bench.benchmark --out docs/perf/h200.json            # on a GPU machine
    python -m bench.benchmark --cpu-smoke                          # tiny models, CI smoke test

Results print as tables as they are measured; `--out FILE` also writes them all as JSON.

The training step is the one `train.py` runs: the S-stage objective under autocast, backward,
gradient clipping, AdamW (fused on CUDA) and the foreach EMA, on random latents at 256 px.
Variants switch one optimisation at a time so that the table doubles as an ablation.
`--repa dinov2-vit-b` adds REPA to every training row: the frozen encoder (random weights, same
architecture and cost) runs on random uint8 images under no_grad + autocast inside the timed
step, the model gets its projector, and the FLOPs include the encoder's forward pass. ELIT rows
use a multi-budget ELIT-SiT (every level trained) and count FLOPs with `torch.utils.flop_counter`
(`bench.flops.counted_forward_flops`) at each budget.
No timing here is ever asserted by a test.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
import samplers  # noqa: E402
from bench.flops import counted_forward_flops  # noqa: E402
from training.config import recipe_objective  # noqa: E402
from bench.table import ELIT_COLUMNS, LOADER_COLUMNS, SAMPLE_COLUMNS, TRAIN_COLUMNS, Table  # noqa: E402
from models.encoders import encoder_features  # noqa: E402
from training.ema import EMA, create_ema  # noqa: E402

DEFAULT_TRAIN = [("SiT-B/2", 64), ("DFM-SiT-B/2", 64), ("SiT-XL/2", 32), ("DFM-SiT-XL/2", 32)]
TRAIN_VARIANTS = {  # name -> (autocast dtype or None, compile)
    "fp32-tf32": (None, False),
    "bf16": (torch.bfloat16, False),
    "bf16+compile": (torch.bfloat16, True),
}
SAMPLE_VARIANTS = {"fp32-tf32": (None, False), "bf16": (torch.bfloat16, False), "bf16+compile": (torch.bfloat16, True)}
ELIT_MODEL = ("ELIT-SiT-XL/2", 32)  # multi-budget: elit_max_mask_prob = 1 - 1/g^2
ELIT_BUDGETS = (1.0, 0.25)
TINY_ELIT = dict(depth=3, encoder_depth=1, elit_tail_depth=1, group_size=2, elit_max_mask_prob=0.75)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(name: str, device, tiny: bool, **extra):
    kwargs = dict(depth=2, hidden_size=64, num_heads=4, input_size=8) if tiny else {}
    kwargs.update(extra)
    return models.create_model(name, **kwargs).to(device)


def maybe_compile(model, compile_blocks: bool):
    """train.py's and generate.py's compilation (models/compile.py: regional, one graph reused by
    all 12-28 blocks and every ELIT budget)."""
    if compile_blocks:
        from models.compile import compile_model

        compile_model(model)
    return model


TINY_ENCODER = dict(depth=2, embed_dim=48, num_heads=2)  # --cpu-smoke: a shrunk DINOv2


def build_encoders(enc_type: str, resolution: int, device, tiny: bool):
    """REPA's frozen encoders with random weights (the cost of the real ones, no download)."""
    import timm

    from models.encoders import ENCODERS, FrozenEncoder, encoder_input_size, parse_enc_type

    overrides = TINY_ENCODER if tiny else {}
    return [FrozenEncoder(n, timm.create_model(ENCODERS[n][0], pretrained=False,
                                               img_size=encoder_input_size(resolution), **overrides),
                          resolution).to(device) for n in parse_enc_type(enc_type)]


def encoder_flops_per_image(encoders) -> int:
    """FLOPs of one forward pass of every encoder on one image (counted op by op)."""
    from torch.utils.flop_counter import FlopCounterMode

    total = 0
    for enc in encoders:
        image = torch.zeros(1, 3, enc.resolution, enc.resolution, dtype=torch.uint8, device=enc.device)
        with FlopCounterMode(display=False) as counter:
            enc(image)
        total += counter.get_total_flops()
    return int(total)


def elit_kwargs(tiny: bool) -> Dict:
    """Build options of the benchmarked multi-budget ELIT model."""
    return dict(TINY_ELIT) if tiny else dict(elit_max_mask_prob=1 - 1 / 16)  # XL/2 at 256 px: g = 4


def bench_train(name: str, batch: int, variant: str, device, steps: int, warmup: int, tiny: bool,
                repa: Optional[str] = None, budget=None, build: Dict = None) -> Dict:
    """`repa`: REPA encoder(s) run inside the step; `budget`, `build`: ELIT models, the training
    budget of every step and the build options."""
    dtype, compile_blocks = TRAIN_VARIANTS[variant]
    torch.manual_seed(0)
    resolution = (8 if tiny else 32) * 8
    encoders = build_encoders(repa, resolution, device, tiny) if repa else []
    extra = dict(build or {})
    if encoders:
        extra["z_dims"] = [e.z_dim for e in encoders]
        if tiny:
            extra["encoder_depth"] = 1  # the tiny models have 2 blocks
    model = maybe_compile(build_model(name, device, tiny, **extra).train(), compile_blocks)
    ema = EMA(model, create_ema(model), 0.9999)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0,
                                  eps=1e-8, fused=device.type == "cuda")
    objective = recipe_objective(model.num_stages, proj_coeff=0.5 if repa else 0.0)
    size = model.input_size
    x = torch.randn(batch, model.in_channels, size, size, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    images = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8, device=device)
    budget_kwargs = {} if budget is None else {"inference_budget": budget}

    def step():
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            features = encoder_features(encoders, images) if encoders else None
            loss = objective(model, x, y, encoder_features=features, model_kwargs=budget_kwargs)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()
        return loss

    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    result = {"model": name, "batch": batch, "variant": variant, "images_per_sec": batch * steps / elapsed,
              "step_ms": 1000 * elapsed / steps, "final_loss": float(loss.detach())}
    flops = 3 * counted_forward_flops(model, budget)
    if encoders:  # forward only: the encoder is frozen
        result["repa"] = repa
        result["encoder_gflop_per_image"] = encoder_flops_per_image(encoders) / 1e9
        flops += result["encoder_gflop_per_image"] * 1e9
    result["train_gflop_per_image"] = flops / 1e9
    result["achieved_tflops"] = result["images_per_sec"] * flops / 1e12
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def bench_sample(name: str, batch: int, variant: str, device, steps_per_scale, thresholds, tiny: bool,
                 repeats: int, budget=None, build: Dict = None) -> Dict:
    dtype, compile_blocks = SAMPLE_VARIANTS[variant]
    torch.manual_seed(0)
    model = build_model(name, device, tiny, **(build or {})).eval()
    with torch.no_grad():  # random, non-zero weights so that outputs are not trivially zero
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    maybe_compile(model, compile_blocks)
    g = torch.Generator().manual_seed(1)
    noise = [torch.randn(batch, *shape, generator=g).to(device) for shape in model.stage_shapes]
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def run():
        with autocast:
            out = samplers.sample(model, noise, y, num_steps_per_scale=steps_per_scale, thresholds=thresholds,
                                  inference_budget=budget)
        return model.decomposition.recompose(out)

    run()  # warm-up (and compilation)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        latent = run()
    synchronize(device)
    elapsed = time.perf_counter() - start
    result = {"model": name, "batch": batch, "variant": variant, "nfe": sum(steps_per_scale),
              "images_per_sec": batch * repeats / elapsed, "latent": latent.float().cpu()}
    if budget is not None:
        result["gflop_per_forward_per_image"] = counted_forward_flops(model, budget) / 1e9
    return result


def bench_elit(device, tiny: bool, steps: int, warmup: int, variant: str, sample_batch: int) -> List[Dict]:
    """ELIT rows: training and sampling throughput of one multi-budget model at each of ELIT_BUDGETS."""
    name, batch = ("ELIT-SiT-S/2", 4) if tiny else ELIT_MODEL
    build = elit_kwargs(tiny)
    rows = []
    for budget in ELIT_BUDGETS:
        r = bench_train(name, batch, variant, device, steps, warmup, tiny, budget=budget, build=build)
        rows.append({"kind": "train", "budget": budget, **r})
    for budget in ELIT_BUDGETS:
        r = bench_sample(name, sample_batch, variant, device, [4] if tiny else [50], [], tiny,
                         repeats=1 if tiny else 3, budget=budget, build=build)
        r.pop("latent")
        rows.append({"kind": "sample", "budget": budget, **r})
    return rows


def write_synthetic_packed(folder: str, num_items: int, size: int, shard_size: int = 10000) -> None:
    """Random posterior moments in the packed-latents format of `data.packed` (SPEC §7 sizes)."""
    import numpy as np

    from data.packed import FORMAT_NAME, INDEX_NAME, shard_name, shard_ranges

    rng = np.random.default_rng(0)
    shards = []
    for s, (start, count) in enumerate(shard_ranges(num_items, shard_size)):
        np.save(os.path.join(folder, shard_name(s)), rng.standard_normal((count, 8, size, size), dtype=np.float32))
        shards.append({"file": shard_name(s), "start": start, "count": count})
    np.save(os.path.join(folder, "labels.npy"), np.arange(num_items, dtype=np.int64) % 1000)
    index = {"format": FORMAT_NAME, "version": 1, "num_items": num_items, "item_shape": [8, size, size],
             "dtype": "float32", "shard_size": shard_size, "shards": shards, "num_classes": 1000, "classes": None}
    with open(os.path.join(folder, INDEX_NAME), "w") as f:
        json.dump(index, f)


def bench_loader(num_items: int, workers: List[int], batch: int, tiny: bool) -> List[Dict]:
    """Items/s of the packed-latents reader through a DataLoader, per worker count."""
    import data

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_packed(tmp, num_items, 4 if tiny else 32)
        dataset = data.open_dataset(tmp)
        for w in workers:
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=w,
                                                 drop_last=True)
            start = time.perf_counter()
            n = 0
            for x, _ in loader:
                n += x.shape[0]
            elapsed = time.perf_counter() - start
            results.append({"workers": w, "items_per_sec": n / elapsed,
                            "items_per_sec_per_core": n / elapsed / max(1, w)})
    return results


def environment(device) -> Dict:
    info = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU, few steps (CI)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=790.0,
                        help="dense bf16 matrix rate of the GPU for MFU (H200/H100 SXM measured ~790)")
    parser.add_argument("--train-variants", default=",".join(TRAIN_VARIANTS))
    parser.add_argument("--sample-variants", default=",".join(SAMPLE_VARIANTS))
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--loader-items", type=int, default=20000)
    parser.add_argument("--repa", default=None, metavar="ENC_TYPE",
                        help="train rows with REPA: this frozen encoder (random weights), e.g. dinov2-vit-b")
    parser.add_argument("--elit-variant", default="bf16", help="variant of the ELIT rows ('' = no ELIT rows)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    tiny = args.cpu_smoke
    device = torch.device("cpu" if tiny else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    train_models = [("SiT-S/2", 4), ("DFM-SiT-S/2", 4)] if tiny else DEFAULT_TRAIN
    steps, warmup = (2, 1) if tiny else (args.steps, args.warmup)
    train_variants = ["fp32-tf32"] if tiny else args.train_variants.split(",")
    results = {"environment": environment(device), "train": [], "sample": [], "loader": [], "elit": []}
    print("benchmark: " + ", ".join(f"{k} {v}" for k, v in results["environment"].items()), flush=True)
    tables = {"train": Table("training", TRAIN_COLUMNS), "sample": Table("sampling", SAMPLE_COLUMNS),
              "elit": Table("ELIT", ELIT_COLUMNS), "loader": Table("loader (packed latents)", LOADER_COLUMNS)}

    for name, batch in train_models:
        for variant in train_variants:
            r = bench_train(name, batch, variant, device, steps, warmup, tiny, repa=args.repa)
            r["mfu"] = r["achieved_tflops"] / args.peak_tflops if device.type == "cuda" else None
            results["train"].append(r)
            tables["train"].add(r)

    sample_name = "DFM-SiT-S/2" if tiny else "DFM-SiT-XL/2"
    sample_batch = 2 if tiny else args.sample_batch
    schedule = ([4, 2], [0.1]) if tiny else ([40, 10], [0.1])
    reference = None
    sample_variants = ["fp32-tf32", "bf16"] if tiny else args.sample_variants.split(",")
    for variant in sample_variants:
        r = bench_sample(sample_name, sample_batch, variant, device, *schedule, tiny, repeats=1 if tiny else 3)
        latent = r.pop("latent")
        if reference is None:
            reference = latent
        error = (latent - reference).abs()
        peak = reference.abs().max().item()
        mse = (error ** 2).mean().item()
        r["max_abs_error_vs_fp32"] = error.max().item()
        r["latent_psnr_vs_fp32_db"] = float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)
        results["sample"].append(r)
        tables["sample"].add(r)

    elit_variant = "fp32-tf32" if tiny else args.elit_variant
    if elit_variant:
        results["elit"] = bench_elit(device, tiny, steps, warmup, elit_variant, sample_batch)
        tables["elit"].add_all(results["elit"])

    workers = [0] if tiny else [0, 1, 2, 4]
    results["loader"] = bench_loader(256 if tiny else args.loader_items, workers, 16 if tiny else 256, tiny)
    tables["loader"].add_all(results["loader"])
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"wrote {args.out}", flush=True)
    return results


if __name__ == "__main__":
    main()
