"""`cpu_threads` (utils/threads.py): one rule for train.py, generate.py, the budget sweep and the
evaluation tools, measured where the work runs (torch.get_num_threads() inside the step or the
sampler), and honoured when accelerate's multi-CPU start-up resets the threads."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from utils.threads import default_cpu_threads, using_cpu_threads

from train_helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_rule(monkeypatch):
    import utils.threads as threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    busy = [0.0]
    monkeypatch.setattr(threads, "busy_cpus", lambda window=0.1: busy[0])
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_cpu_threads() == 3  # the user's / launcher's choice
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_cpu_threads() == 6  # every CPU this process may use, on an idle machine
    busy[0] = 2.3
    assert default_cpu_threads() == 4  # less the CPUs other jobs keep busy (6 - 2.3, rounded)
    busy[0] = 6.0
    assert default_cpu_threads() == 1  # at least one
    busy[0] = 0.0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_cpu_threads() == 3  # shared by the processes of this machine (6 // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_cpu_threads() == 1  # (6 // 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_cpu_threads() == 1  # at least one


def test_busy_cpus_sees_a_busy_loop_beside_it():
    """/proc/stat counts other processes' CPU time: one busy loop keeps about one CPU busy."""
    import utils.threads as threads

    if threads._cpu_times() is None:
        pytest.skip("no /proc/stat here")
    idle_before = threads.busy_cpus(0.2)
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        busy = threads.busy_cpus(0.5)
    finally:
        loop.kill()
        loop.wait()
    assert busy >= idle_before - 0.2 and busy > 0.6  # the loop's CPU (plus whatever else runs)


def test_using_cpu_threads_sets_and_restores():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with using_cpu_threads(other) as n:
        assert n == other == torch.get_num_threads()
    assert torch.get_num_threads() == before


def _record_threads(monkeypatch, module, name):
    """Wrap module.name so that every call records torch.get_num_threads(); returns the list."""
    seen = []
    original = getattr(module, name)

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return seen


def test_training_step_runs_with_cpu_threads(tiny_data, tmp_path, monkeypatch):
    from training.loop import train
    from training.step import TrainStep

    seen = _record_threads(monkeypatch, TrainStep, "finish")
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    train(tiny_config(tiny_data, str(tmp_path), exp_name="explicit", max_train_steps=2, cpu_threads=other))
    assert seen == [other, other] and torch.get_num_threads() == before
    seen.clear()  # null: the rule (here OMP_NUM_THREADS), not whatever the process had
    monkeypatch.setenv("OMP_NUM_THREADS", str(other))
    train(tiny_config(tiny_data, str(tmp_path), exp_name="default", max_train_steps=2, cpu_threads="null"))
    assert seen == [other, other]


MULTI_NODE_RUN = """
import json, sys, warnings
import torch
from training.loop import train
from training.step import TrainStep
from train_helpers import tiny_config

seen, finish = [], TrainStep.finish
TrainStep.finish = lambda self, *a: (seen.append(torch.get_num_threads()), finish(self, *a))[1]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    train(tiny_config(sys.argv[1], sys.argv[2], exp_name="multinode", max_train_steps=2,
                      cpu_threads=int(sys.argv[3])))
resets = [str(w.message) for w in caught if "OMP_NUM_THREADS/MKL_NUM_THREADS unset" in str(w.message)]
print(json.dumps({"in_step": seen, "accelerate_resets": resets}))
"""


def test_multi_node_cpu_launch_keeps_cpu_threads(tiny_data, tmp_path):
    """One process per node (LOCAL_WORLD_SIZE=1), OMP_NUM_THREADS unset: accelerate's multi-CPU
    start-up sets torch to all physical cores; the run's cpu_threads must win inside the step."""
    import psutil

    accelerate_sets = max(1, psutil.cpu_count(logical=False) or 1)
    want = 1 if accelerate_sets != 1 else 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(ACCELERATE_USE_CPU="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WANDB_MODE="disabled", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    proc = subprocess.run([sys.executable, "-c", MULTI_NODE_RUN, tiny_data, str(tmp_path), str(want)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["accelerate_resets"], "the simulated launch did not trigger accelerate's thread reset"
    assert f"we set it at {accelerate_sets}" in result["accelerate_resets"][0]
    assert result["in_step"] == [want, want]
    log = open(os.path.join(str(tmp_path), "multinode", "log.txt")).read()
    assert f"({want} CPU threads each)" in log


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A pixel-space ELIT-SiT checkpoint (2 budget levels) for generate.py and the budget sweep."""
    from models import create_model

    model = create_model("ELIT-SiT-S/2", depth=3, hidden_size=32, num_heads=2, input_size=8, in_channels=3,
                         num_classes=4, encoder_depth=1, elit_tail_depth=1, group_size=2, elit_max_mask_prob=0.25)
    path = tmp_path_factory.mktemp("ckpt") / "0000001.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "arch": model.arch, "steps": 1,
                "config": {"model": model.arch["name"], "vae": "none", "path_type": "linear", "num_classes": 4}},
               path)
    return str(path)


def _other_threads():
    return 1 if torch.get_num_threads() != 1 else 2


def test_generate_runs_with_cpu_threads(checkpoints, tmp_path, monkeypatch):
    import generate
    import samplers

    seen = _record_threads(monkeypatch, samplers, "sample")
    other = _other_threads()
    argv = ["--ckpt", checkpoints, "num_samples=2", "per_proc_batch_size=2", "num_steps_per_scale=[2]",
            "inference_budget=1.0", f"sample_dir={tmp_path}"]
    assert generate.main(argv + [f"cpu_threads={other}", "run_name=explicit"]) == 0
    assert seen == [other]
    seen.clear()
    monkeypatch.setenv("OMP_NUM_THREADS", str(other))
    assert generate.main(argv + ["run_name=default"]) == 0
    assert seen == [other]


TOO_MANY = "100000000000000000000"  # reached torch.set_num_threads as an OverflowError traceback
BAD = [("0", "must be >= 1 or null, got 0"),
       (TOO_MANY, f"must be at most 1024 (or null for the default rule), got {TOO_MANY}")]


@pytest.mark.parametrize("value, message", BAD)
def test_generate_refuses_bad_cpu_threads(checkpoints, tmp_path, capsys, value, message):
    import generate

    assert generate.main(["--ckpt", checkpoints, f"cpu_threads={value}", f"sample_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"generate.py: error: config key 'cpu_threads': {message}"
    assert not os.listdir(tmp_path)


def test_budget_sweep_runs_with_cpu_threads(checkpoints, tmp_path, monkeypatch):
    import samplers
    from generation import budget_sweep

    seen = _record_threads(monkeypatch, samplers, "sample")
    other = _other_threads()
    assert budget_sweep.main(["--ckpt", checkpoints, "--class-label", "1", "--num-seeds", "1", "--steps", "2",
                              "--out", str(tmp_path), "--cpu-threads", str(other)]) == 0
    assert seen == [other, other]  # both budget levels


@pytest.mark.parametrize("tool, function, argv, result", [
    ("evaluation.evaluate", "evaluate", ["ref.npz", "samples.npz"], {}),
    ("evaluation.ref_stats", "compute_statistics", ["images", "--out", "stats.npz"], None),
])
def test_evaluation_tools_run_with_cpu_threads(tool, function, argv, result, monkeypatch):
    """The tools' work (Inception / DINOv2 features) runs inside the call the thread setting wraps."""
    import importlib

    module = importlib.import_module(tool)
    seen = []
    monkeypatch.setattr(module, function, lambda *a, **k: seen.append(torch.get_num_threads()) or result)
    other = _other_threads()
    assert module.main(argv + ["--cpu-threads", str(other)]) == 0
    assert seen == [other]


@pytest.mark.parametrize("tool, argv", [
    ("evaluation.evaluate", ["ref.npz", "samples.npz"]),
    ("evaluation.ref_stats", ["images", "--out", "stats.npz"]),
])
@pytest.mark.parametrize("value, message", [("0", "must be an integer >= 1, got '0'"), BAD[1]])
def test_tools_refuse_bad_cpu_threads(tool, argv, capsys, value, message):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(tool).main(argv + ["--cpu-threads", value])
    assert exit_info.value.code == 2
    assert f"argument --cpu-threads: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("value, message", BAD)
def test_budget_sweep_refuses_bad_cpu_threads_like_generate(capsys, value, message):
    from generation import budget_sweep

    assert budget_sweep.main(["--ckpt", "x.pt", "--class-label", "1", "--cpu-threads", value]) == 2
    assert capsys.readouterr().err.strip() == f"budget_sweep: error: config key 'cpu_threads': {message}"


@pytest.mark.parametrize("value, message", BAD)
def test_training_config_refuses_bad_cpu_threads(value, message):
    from training.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as error:
        parse_config(["--config", "experiments/train/demo_cpu.yaml", f"cpu_threads={value}"])
    assert str(error.value) == f"cpu_threads {message}"


def test_apply_refuses_what_the_configs_refuse():
    """The last guard, for callers that bypass the configs' checks."""
    from utils.threads import apply_cpu_threads

    before = torch.get_num_threads()
    for value in (0, 10 ** 20, True):
        with pytest.raises(ValueError, match="^cpu_threads must be"):
            apply_cpu_threads(value)
    assert torch.get_num_threads() == before
