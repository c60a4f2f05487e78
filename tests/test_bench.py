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


def test_cpu_smoke_mode(tmp_path):
    from bench.benchmark import main

    out = tmp_path / "bench.json"
    results = main(["--cpu-smoke", "--out", str(out)])
    assert out.exists()
    assert {r["model"] for r in results["train"]} == {"SiT-S/2", "DFM-SiT-S/2"}
    assert all(math.isfinite(r["final_loss"]) and r["images_per_sec"] > 0 for r in results["train"])
    fp32, bf16 = results["sample"]
    assert fp32["max_abs_error_vs_fp32"] == 0
    assert 0 < bf16["max_abs_error_vs_fp32"] < 0.1
    assert results["loader"][0]["items_per_sec"] > 0
