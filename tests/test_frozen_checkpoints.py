"""Checkpoints written by main @402bfaf (tests/data/frozen, made by make_frozen.py there) still load,
sample the same images and resume the same training: DFM-SiT, calibrated DFM-SiT (stage scales,
time shift), SiT and multi-budget DFM-ELIT-SiT, as `.pt` training checkpoints and exported
`.safetensors` weights.

Bit for bit on the machine kind that made them (same torch build and CPU kernels); elsewhere the
float arithmetic of the kernels may differ in the last digits, so the images may differ by one
level and the losses in the last digits.
"""
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch

FROZEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "frozen")
META = json.load(open(os.path.join(FROZEN, "meta.json")))
SAME_MACHINE = (META["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and META["torch"] == torch.__version__)
_spec = importlib.util.spec_from_file_location("make_frozen", os.path.join(FROZEN, "make_frozen.py"))
make_frozen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_frozen)


@pytest.fixture(scope="module")
def frozen_data(tmp_path_factory):
    from training.demo_data import write_demo_dataset

    return write_demo_dataset(str(tmp_path_factory.mktemp("frozen") / "data"), resolution=16, num_classes=2,
                              images_per_class=10, seed=0)


@pytest.mark.parametrize("run", sorted(META["runs"]))
def test_frozen_checkpoint_samples_the_same_images(run, tmp_path):
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
        if SAME_MACHINE:
            assert np.array_equal(got, want), (run, name)
        else:
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, (run, name)


@pytest.mark.parametrize("run", sorted(META["runs"]))
def test_frozen_checkpoint_resumes_the_same_training(run, frozen_data, tmp_path):
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
        if SAME_MACHINE:
            assert losses[step] == want[step], (run, step)
        else:
            assert losses[step] == pytest.approx(want[step], rel=1e-4), (run, step)
    for part in ("model", "ema"):
        assert sums[part].keys() == META["runs"][run]["step4_sums"][part].keys()
        for key, value in META["runs"][run]["step4_sums"][part].items():
            if SAME_MACHINE:
                assert sums[part][key] == value, (run, part, key)
            else:
                assert sums[part][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (run, part, key)
