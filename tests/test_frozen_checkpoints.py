"""Checkpoints written by main @402bfaf (tests/data/frozen, made by make_frozen.py there) still load,
sample the same images and resume the same training: DFM-SiT, calibrated DFM-SiT (stage scales,
time shift), SiT and multi-budget DFM-ELIT-SiT, as `.pt` training checkpoints and exported
`.safetensors` weights.

Bit for bit where the CPU kernels are those that made the fixtures; elsewhere within tolerances.
"The same kernels" is decided by what they compute, not by the CPU capability string (an Intel
AVX512 machine reports what the AMD EPYC that made the fixtures reports, and its BLAS differs in the
8th digit): `kernels.json` holds every arithmetic aten call that makes the fixtures and that these
tests make, with the fingerprint of their outputs on fixed inputs on the fixtures' machine kind
(tests/frozen_kernels.py, written by make_kernels.py); a machine that replays them to the same
fingerprint must reproduce the fixtures exactly.

The tolerances for other kernels (measured 2026-12-07 on the 2-core AMD EPYC VM that reproduces the
fixtures, emulating other kernels with MKL_CBWR=COMPATIBLE, ONEDNN_MAX_CPU_ISA=AVX2,
ATEN_CPU_CAPABILITY=avx2 and =default; each of them also changes the fingerprint): images differ
by at most 1 level (measured 1); losses by a relative 8e-8 at most, allowed 1e-6; weight sums by a
relative 1.4e-5 at most (sums above 1e-3 in size) and 1.9e-9 absolute (the others), allowed a
relative 1e-4 or 1e-7 absolute, whichever is larger. A real change is 100 times larger: a learning
rate 0.1% higher moves the sums by a relative 1.1e-2 (3e-6 absolute) and the losses by 8.5e-6, an EMA
decay of 0.9001 for 0.9 the sums by 1.0e-2.
"""
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch

import frozen_kernels

FROZEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "frozen")
META = json.load(open(os.path.join(FROZEN, "meta.json")))
LOSS_RTOL, SUM_RTOL, SUM_ATOL = 1e-6, 1e-4, 1e-7
_spec = importlib.util.spec_from_file_location("make_frozen", os.path.join(FROZEN, "make_frozen.py"))
make_frozen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_frozen)


@pytest.fixture(scope="module")
def same_kernels() -> bool:
    """Whether this machine computes every call of kernels.json as the fixtures' machine did."""
    kernels = json.load(open(os.path.join(FROZEN, "kernels.json")))
    return kernels["torch"] == torch.__version__ and frozen_kernels.replay(kernels["calls"]) == kernels["sha256"]


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's note when the flags change
def test_the_fingerprint_is_reproducible_and_tells_another_kernel():
    calls = json.load(open(os.path.join(FROZEN, "kernels.json")))["calls"]
    assert any("addmm" in c["op"] for c in calls) and any("flash_attention" in c["op"] for c in calls)
    convolutions = [c for c in calls if c["op"].startswith("aten::convolution")]
    assert len(convolutions) >= 4 and frozen_kernels.replay(convolutions) == frozen_kernels.replay(convolutions)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build: no second convolution kernel to compare with")
    with torch.backends.mkldnn.flags(enabled=False):  # torch's own convolution instead of oneDNN's
        other = frozen_kernels.replay(convolutions)
    assert other != frozen_kernels.replay(convolutions)


@pytest.fixture(scope="module")
def frozen_data(tmp_path_factory):
    from training.demo_data import write_demo_dataset

    return write_demo_dataset(str(tmp_path_factory.mktemp("frozen") / "data"), resolution=16, num_classes=2,
                              images_per_class=10, seed=0)


@pytest.mark.parametrize("run", sorted(META["runs"]))
def test_frozen_checkpoint_samples_the_same_images(run, tmp_path, same_kernels):
    from generation.config import load_generate_config
    from generation.runner import run as generate

    for name, keys in META["runs"][run]["samples"].items():
        kind, source = name.rsplit("-", 1)
        argv = [f"--ckpt={FROZEN}/{run}.{source}", "num_samples=4", "labels=balanced", "save_png=false",
                f"sample_dir={tmp_path}", f"run_name={run}-{name}", "cpu_threads=1", *keys]
        generate(load_generate_config(argv))
        got = np.load(tmp_path / f"{run}-{name}.npz")["arr_0"]
        want = np.load(os.path.join(FROZEN, f"{run}-{name}.npy"))
        assert got.shape == want.shape == (4, 16, 16, 3), name
        if same_kernels:
            assert np.array_equal(got, want), (run, name)
        else:
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, (run, name)


@pytest.mark.parametrize("run", sorted(META["runs"]))
def test_frozen_checkpoint_resumes_the_same_training(run, frozen_data, tmp_path, same_kernels):
    from training.config import parse_config
    from training.loop import train

    folder = tmp_path / run / "checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(os.path.join(FROZEN, f"{run}.pt"), folder / "0000002.pt")
    argv = make_frozen.RUNS[run] + make_frozen.COMMON + [f"data_dir={frozen_data}", f"output_dir={tmp_path}",
                                                         f"exp_name={run}"]
    result = train(parse_config(argv))
    assert result.steps == 4
    log = open(tmp_path / run / "log.txt").read()
    assert "resuming from" in log and "at step 2" in log
    # the same settings under today's key names (weighting -> time_distribution): only the data folder moved
    warning = next(line for line in log.splitlines() if "differ from the checkpoint" in line)
    assert warning.split("checkpoint's run: ")[1].startswith(f"data_dir: ") and warning.count(" -> ") == 1
    losses = {}
    for line in open(tmp_path / run / "metrics.jsonl"):
        record = json.loads(line)
        losses[str(record["step"])] = record["loss"]
    want = META["runs"][run]["losses"]
    final = torch.load(tmp_path / run / "checkpoints" / "0000004.pt", map_location="cpu", weights_only=True)
    sums = {part: {k: float(v.double().sum()) for k, v in final[part].items()} for part in ("model", "ema")}
    for step in ("3", "4"):
        if same_kernels:
            assert losses[step] == want[step], (run, step)
        else:
            assert losses[step] == pytest.approx(want[step], rel=LOSS_RTOL), (run, step)
    for part in ("model", "ema"):
        assert sums[part].keys() == META["runs"][run]["step4_sums"][part].keys()
        for key, value in META["runs"][run]["step4_sums"][part].items():
            if same_kernels:
                assert sums[part][key] == value, (run, part, key)
            else:
                assert sums[part][key] == pytest.approx(value, rel=SUM_RTOL, abs=SUM_ATOL), (run, part, key)
