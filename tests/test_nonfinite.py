"""on_nonfinite: skip: a step whose gradients are not finite changes nothing, decided on the device, the
same on every rank; counted; a run that skips forever stops with one line; resume stays exact."""
import json
import os
import subprocess
import sys

import pytest
import torch

from training import loop
from training.loop import train

from train_helpers import assert_same_weights, load_ckpt, read_losses, tiny_argv, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def nan_at(monkeypatch):
    """`nan_at({2, 3})`: the micro-batches of those (0-based) calls become NaN in this process."""
    def install(steps):
        real, calls = loop.BatchPreparer.__call__, [0]

        def poisoned(self, items, generator):
            inputs = real(self, items, generator)
            if calls[0] in steps:
                inputs.x = inputs.x * float("nan")
            calls[0] += 1
            return inputs

        monkeypatch.setattr(loop.BatchPreparer, "__call__", poisoned)
    return install


def _states_equal(a, b):
    assert_same_weights(a, b)
    for key, value in a["opt"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, b["opt"]["state"][key][name]), (key, name)
    for x, y in zip(a["posthoc_ema"]["profiles"], b["posthoc_ema"]["profiles"]):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_a_skipped_step_changes_nothing_and_is_counted(tiny_data, tmp_path, nan_at):
    keys = dict(on_nonfinite="skip", max_train_steps=5, checkpointing_steps=1, **{"posthoc_ema.stds": "[0.1]",
                                                                                  "posthoc_ema.every": 1})
    nan_at({2})  # the third optimizer step (step 3) gets a NaN batch
    result = train(tiny_config(tiny_data, str(tmp_path), exp_name="skip", **keys))
    ckpt = lambda s: load_ckpt(os.path.join(result.exp_dir, "checkpoints", f"{s:07d}.pt"))  # noqa: E731
    _states_equal(ckpt(2), ckpt(3))  # weights, AdamW moments and step counts, EMA, post-hoc profiles
    key = "blocks.0.attn.qkv.weight"
    assert not torch.equal(ckpt(4)["model"][key], ckpt(3)["model"][key])  # the next step moves on
    assert not torch.equal(ckpt(4)["ema"][key], ckpt(3)["ema"][key])
    assert ckpt(3)["nonfinite"] == {"skipped_steps": 1, "skipped_in_a_row": 1}
    assert ckpt(5)["nonfinite"] == {"skipped_steps": 1, "skipped_in_a_row": 0}
    records = [json.loads(line) for line in open(os.path.join(result.exp_dir, "metrics.jsonl"))]
    assert [r["skipped_steps"] for r in records if "loss" in r] == [0, 0, 1, 1, 1]
    losses = read_losses(result.exp_dir)
    assert all(v == v for v in losses.values()) and losses[3] == 0.0  # the window of step 3 kept no step


def test_resume_across_a_skipped_step_is_exact(tiny_data, tmp_path, nan_at):
    keys = dict(on_nonfinite="skip", max_train_steps=6, checkpointing_steps=2)
    nan_at({1, 7})  # step 2 of both runs (calls 1 and 7: the second run starts counting at 6)
    straight = train(tiny_config(tiny_data, str(tmp_path), exp_name="straight", **keys))
    train(tiny_config(tiny_data, str(tmp_path), exp_name="cut", **keys), stop_after_step=3)  # calls 6..8 next
    resumed = train(tiny_config(tiny_data, str(tmp_path), exp_name="cut", **keys))  # from step 2: calls 9..12
    a, b = load_ckpt(straight.last_checkpoint), load_ckpt(resumed.last_checkpoint)
    assert_same_weights(a, b)
    assert a["nonfinite"]["skipped_steps"] == b["nonfinite"]["skipped_steps"] == 1


def _skip_run_errors(tiny_data, tmp_path, capsys, **keys):
    """train.py with on_nonfinite=skip and `keys`: its exit status must be 1; its `error` lines."""
    import train as train_cli

    assert train_cli.main(tiny_argv(tiny_data, str(tmp_path), on_nonfinite="skip", **keys)) == 1
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]


def test_skipping_forever_stops_with_one_line(tiny_data, tmp_path, nan_at, capsys):
    nan_at(set(range(1, 100)))
    errors = _skip_run_errors(tiny_data, tmp_path, capsys, exp_name="forever", max_skipped_steps=3,
                              max_train_steps=50, checkpointing_steps=50)
    assert errors == ["error: the training loss stayed non-finite (NaN/inf) for 3 steps in a row (skipped) at step 2; "
                      "training stopped (no checkpoint was written). Check the learning rate (lower lr); the data "
                      "(bad_samples, dataset_tools.py verify)."]


def test_bad_keys(tiny_data, tmp_path):
    from training.config import ConfigError

    with pytest.raises(ConfigError, match=r"on_nonfinite must be one of \['stop', 'skip'\], got 'ignore'"):
        tiny_config(tiny_data, str(tmp_path), on_nonfinite="ignore")
    with pytest.raises(ConfigError, match="max_skipped_steps must be an integer >= 1, got 0"):
        tiny_config(tiny_data, str(tmp_path), max_skipped_steps=0)


def test_two_processes_skip_the_same_step(tiny_data, tmp_path):
    """A NaN batch on rank 1 only: both ranks skip (the decision is on the all-reduced gradients), so
    they stay identical (the checkpoint's rank check) and the step changes nothing."""
    argv = tiny_argv(tiny_data, str(tmp_path), exp_name="ddp", on_nonfinite="skip", max_train_steps=4,
                     checkpointing_steps=1)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1",
               PYTHONPATH=REPO)
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "tests/nonfinite_worker.py", "1", "2", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = lambda s: load_ckpt(os.path.join(tmp_path, "ddp", "checkpoints", f"{s:07d}.pt"))  # noqa: E731
    assert_same_weights(ckpt(2), ckpt(3))
    assert ckpt(4)["nonfinite"]["skipped_steps"] == 1


def test_a_stop_run_resumes_with_skip(tiny_data, tmp_path, nan_at):
    """The natural next step after a NaN stop: resume the same run with on_nonfinite=skip. Its optimizer
    state (from a run without skip) restored `fused: False`, and the first step crashed in AdamW
    (`Expected grad_scale and found_inf to be None`); the kernel is now the resumed run's choice."""
    out = str(tmp_path)
    first = train(tiny_config(tiny_data, out, exp_name="run", max_train_steps=2))  # on_nonfinite=stop
    assert load_ckpt(first.last_checkpoint)["opt"]["param_groups"][0]["fused"] is False
    nan_at({0})  # the first step of the resumed run (step 3) is non-finite
    resumed = train(tiny_config(tiny_data, out, exp_name="run", on_nonfinite="skip", max_train_steps=4,
                                checkpointing_steps=1))
    ckpt = lambda s: load_ckpt(os.path.join(resumed.exp_dir, "checkpoints", f"{s:07d}.pt"))  # noqa: E731
    assert_same_weights(ckpt(2), ckpt(3))  # the skipped step changed nothing
    assert ckpt(3)["nonfinite"] == {"skipped_steps": 1, "skipped_in_a_row": 1}
    key = "blocks.0.attn.qkv.weight"
    assert not torch.equal(ckpt(4)["model"][key], ckpt(3)["model"][key])  # the next step trains
    assert ckpt(4)["opt"]["param_groups"][0]["fused"] is True


def test_a_run_that_skipped_every_step_is_not_done(tiny_data, tmp_path, nan_at, capsys):
    """Every step non-finite, but fewer in a row than max_skipped_steps: it logged loss=0 grad_norm=0 and
    ended "done" with exit 0, having trained nothing. Now it says so, exits 1 and writes no last checkpoint."""
    nan_at(set(range(100)))
    errors = _skip_run_errors(tiny_data, tmp_path, capsys, exp_name="all", max_skipped_steps=10, max_train_steps=4,
                              checkpointing_steps=4)
    assert errors == ["error: the training loss was non-finite (NaN/inf) at every step of this run, steps 1-4 (all 4 "
                      "skipped, fewer than max_skipped_steps=10 in a row): nothing was trained; training stopped (no "
                      "checkpoint was written). Check the learning rate (lower lr); the data (bad_samples, "
                      "dataset_tools.py verify)."]
    log = open(os.path.join(tmp_path, "all", "log.txt")).read()
    assert "done:" not in log and not os.path.exists(os.path.join(tmp_path, "all", "checkpoints", "0000004.pt"))


def test_a_run_that_skipped_some_steps_is_done(tiny_data, tmp_path, nan_at):
    nan_at({0, 1, 2})  # steps 1-3 skipped, step 4 trains
    result = train(tiny_config(tiny_data, str(tmp_path), exp_name="some", on_nonfinite="skip", max_skipped_steps=10,
                               max_train_steps=4, checkpointing_steps=4))
    assert result.steps == 4 and load_ckpt(result.last_checkpoint)["nonfinite"]["skipped_steps"] == 3
    assert "done: 4 steps" in open(os.path.join(result.exp_dir, "log.txt")).read()


def test_damaged_skip_counters_are_named(tiny_data, tmp_path):
    from training.nonfinite import SkipGuard

    SkipGuard.check_state(None)
    SkipGuard.check_state({"skipped_steps": 3, "skipped_in_a_row": 1})
    for state, message in [("x", "its 'nonfinite' entry is a str, not a mapping of skipped-step counters"),
                           ({"skipped_steps": "abc"},
                            "its nonfinite.skipped_steps is 'abc', not a non-negative integer"),
                           ({"skipped_steps": 1, "skipped_in_a_row": -1}, "its nonfinite.skipped_in_a_row is -1"),
                           ({"skipped_steps": 1, "skipped_in_a_row": 2},
                            r"its nonfinite.skipped_in_a_row \(2\) exceeds nonfinite.skipped_steps \(1\)")]:
        with pytest.raises(ValueError, match=f"^{message}"):
            SkipGuard.check_state(state)
