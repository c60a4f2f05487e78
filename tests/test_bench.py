"""The benchmark's FLOP count and its CPU smoke mode (no timing is asserted)."""
import math

import pytest
import torch

from bench.flops import forward_flops_per_image
from models import create_model


@pytest.mark.parametrize("name,gflop", [("SiT-XL/2", 237.2), ("SiT-B/2", 46.0), ("DFM-SiT-XL/2", 237.2)])
def test_forward_flops_match_the_transformer_formula(name, gflop):
    with torch.device("meta"):
        model = create_model(name)
    D, T, L = model.hidden_size, 256, len(model.blocks)
    blocks = 2 * L * (12 * T * D * D + 2 * T * T * D + 6 * D * D)  # linear layers, attention, adaLN
    flops = forward_flops_per_image(model)
    assert blocks < flops < 1.002 * blocks
    assert flops / 1e9 == pytest.approx(gflop, rel=2e-3)


def test_cpu_smoke_mode(tmp_path, capsys):
    import json

    from bench.benchmark import main

    out = tmp_path / "bench.json"
    results = main(["--cpu-smoke", "--out", str(out)])
    assert json.loads(out.read_text())["train"][0]["model"] == "SiT-S/2"  # JSON goes to --out ...
    printed = capsys.readouterr().out.splitlines()
    assert not any(line.lstrip().startswith(("{", "[")) for line in printed)  # ... the console gets tables
    header = printed[printed.index("training") + 1].split()
    assert header[:4] == ["model", "batch", "variant", "img/s"]
    row = next(line for line in printed if line.startswith("DFM-SiT-S/2 ") and "fp32-tf32" in line).split()
    first = results["train"][1]
    assert row[:4] == ["DFM-SiT-S/2", "4", "fp32-tf32", f"{first['images_per_sec']:.4g}"]
    assert {r["model"] for r in results["train"]} == {"SiT-S/2", "DFM-SiT-S/2"}
    assert all(math.isfinite(r["final_loss"]) and r["images_per_sec"] > 0 for r in results["train"])
    fp32, bf16 = results["sample"]
    assert fp32["max_abs_error_vs_fp32"] == 0
    assert 0 < bf16["max_abs_error_vs_fp32"] < 0.1
    assert results["loader"][0]["items_per_sec"] > 0


def test_cpu_smoke_mode_reports_elit_at_two_budgets():
    from bench.benchmark import ELIT_BUDGETS, bench_elit

    rows = bench_elit(torch.device("cpu"), tiny=True, steps=1, warmup=0, variant="fp32-tf32", sample_batch=2)
    assert [(r["kind"], r["budget"]) for r in rows] == [(k, b) for k in ("train", "sample") for b in ELIT_BUDGETS]
    assert all(r["model"] == "ELIT-SiT-S/2" and r["images_per_sec"] > 0 for r in rows)
    train = {r["budget"]: r for r in rows if r["kind"] == "train"}
    sample = {r["budget"]: r for r in rows if r["kind"] == "sample"}
    # counted FLOPs fall with the budget (the core sees 1 of the 4 latents per window at 25 %)
    assert train[0.25]["train_gflop_per_image"] < train[1.0]["train_gflop_per_image"]
    assert sample[0.25]["gflop_per_forward_per_image"] < sample[1.0]["gflop_per_forward_per_image"]
    assert train[1.0]["train_gflop_per_image"] == pytest.approx(3 * sample[1.0]["gflop_per_forward_per_image"])
    assert all(math.isfinite(r["final_loss"]) for r in train.values())


def test_table_aligns_numbers_right_and_text_left():
    from bench.table import Table

    lines = []
    table = Table("demo", [("model", "model"), ("images_per_sec", "img/s"), ("mfu", "MFU")], out=lines.append)
    table.add({"model": "SiT-XL/2", "images_per_sec": 1234.5678, "mfu": None})
    table.add({"model": "DFM-ELIT-SiT-XL/2", "images_per_sec": float("inf"), "mfu": 0.41})
    assert lines == ["\ndemo",
                     "model" + " " * 13 + "  " + " " * 5 + "img/s" + "  " + " " * 7 + "MFU",
                     "SiT-XL/2" + " " * 10 + "  " + " " * 6 + "1235" + "  " + " " * 9 + "-",
                     "DFM-ELIT-SiT-XL/2" + " " + "  " + " " * 7 + "inf" + "  " + " " * 6 + "0.41"]
