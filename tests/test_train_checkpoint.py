"""Checkpoint files, EMA and the resumable data order (no training run needed)."""
import os
import warnings

import pytest
import torch

from training.checkpoint import (atomic_torch_save, checkpoint_path, find_resume_checkpoint, list_checkpoints,
                                 prune_checkpoints)
from training.ema import EMA, create_ema
from training.sampler import ResumableBatchSampler


def _fake_ckpt(step):
    return {"model": {"w": torch.full((3,), float(step))}, "ema": {}, "opt": {}, "steps": step}


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path):
    path = checkpoint_path(str(tmp_path), 5)
    atomic_torch_save(_fake_ckpt(5), path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"model": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["steps"] == 5  # the old checkpoint is intact
    assert sorted(os.listdir(os.path.dirname(path))) == ["0000005.pt", "0000005.pt.sha256"]  # no temporary left


def test_prune_keeps_newest_k(tmp_path):
    exp = str(tmp_path)
    for step in (10, 20, 30, 40):
        atomic_torch_save(_fake_ckpt(step), checkpoint_path(exp, step))
    removed = prune_checkpoints(exp, 2)
    assert [os.path.basename(p) for p in removed] == ["0000010.pt", "0000020.pt"]
    assert [s for s, _ in list_checkpoints(exp)] == [30, 40]
    assert prune_checkpoints(exp, None) == []


def test_auto_resume_skips_truncated_and_foreign_files(tmp_path):
    exp = str(tmp_path)
    for step in (2, 4, 6):
        atomic_torch_save(_fake_ckpt(step), checkpoint_path(exp, step))
    newest = checkpoint_path(exp, 6)
    data = open(newest, "rb").read()
    open(newest, "wb").write(data[: len(data) // 2])      # truncated by a crash
    torch.save({"not": "a checkpoint"}, checkpoint_path(exp, 5))  # complete file, wrong content
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path, state = find_resume_checkpoint(exp)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "0000006.pt" in messages[0] and "0000005.pt" in messages[1]
    assert all(m.startswith("skipping corrupt checkpoint") for m in messages)
    assert path.endswith("0000004.pt") and state["steps"] == 4
    assert find_resume_checkpoint(str(tmp_path / "empty")) == (None, None)


def test_ema_update_matches_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model[0].bias.requires_grad_(False)  # frozen parameters are copied, not averaged
    ema_model = create_ema(model)
    ema = EMA(model, ema_model, decay=0.75)
    before = {k: v.clone() for k, v in ema_model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.add_(1.0)
    ema.update()
    new = model.state_dict()
    ema_state = ema_model.state_dict()
    torch.testing.assert_close(ema_state["0.weight"], 0.75 * before["0.weight"] + 0.25 * new["0.weight"])
    torch.testing.assert_close(ema_state["1.weight"], 0.75 * before["1.weight"] + 0.25 * new["1.weight"])
    assert torch.equal(ema_state["0.bias"], new["0.bias"])
    assert torch.equal(ema_state["1.running_mean"], new["1.running_mean"])
    assert not any(p.requires_grad for p in ema_model.parameters()) and not ema_model.training


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_data_order_is_process_count_independent_and_resumable():
    N, B = 50, 12  # 4 steps per epoch, the tail of 2 is dropped
    one = ResumableBatchSampler(N, B, num_processes=1, rank=0, seed=7)
    steps = 9  # crosses two epoch boundaries
    single = _take(one, steps)
    assert all(len(b) == B for b in single)
    for e in range(2):  # within an epoch no sample repeats
        flat = sum(single[4 * e:4 * e + 4], [])
        assert len(set(flat)) == 48
    assert single[:4] != single[4:8]  # a new permutation each epoch
    # 3 processes x 2 accumulation steps: the union of the micro-batches of a step is the same batch
    parts = [_take(ResumableBatchSampler(N, B, 3, r, gradient_accumulation_steps=2, seed=7), 2 * steps)
             for r in range(3)]
    for s in range(steps):
        union = [i for r in range(3) for a in range(2) for i in parts[r][2 * s + a]]
        assert sorted(union) == sorted(single[s]) and len(union) == B
        assert [i for a in range(2) for r in range(3) for i in parts[r][2 * s + a]] == single[s]
    # resuming at step 6 continues with exactly the batches of the uninterrupted order
    assert _take(ResumableBatchSampler(N, B, 1, 0, seed=7, start_step=6), 3) == single[6:9]
    assert one.position(6) == {"epoch": 1, "batch_in_epoch": 2, "steps_per_epoch": 4, "dataset_len": 50,
                               "batch_size": 12, "seed": 7}
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableBatchSampler(5, 8)


def test_logger_never_stops_training(tmp_path, monkeypatch, caplog):
    """wandb without an API key -> offline with a warning; a failing tracker -> warning only;
    tensorboard not installed -> warning only. metrics.jsonl is always written."""
    import sys
    import types

    from training import logger as tlog

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert not tlog.wandb_api_key_available()
    calls = []

    class FakeRun:
        id = "abc"

        def log(self, *a, **k):
            raise RuntimeError("network down")

        def finish(self):
            pass

    def fake_init(**kwargs):
        calls.append(kwargs)
        if len(calls) == 2:
            raise RuntimeError("wandb servers unreachable")
        return FakeRun()

    import importlib.machinery

    fake_wandb = types.ModuleType("wandb")  # a module with a spec: accelerate looks wandb up before importing it
    fake_wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake_wandb.init = fake_init
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    log = tlog.setup_file_logger(str(tmp_path), True, name="t")
    with caplog.at_level("WARNING", logger="dfm.t"):
        log.propagate = True
        run = tlog.RunLogger(str(tmp_path), log, "wandb", wandb_mode="online")
        assert calls[0]["mode"] == "offline" and run.kind == "wandb"
        run.log_metrics({"loss": 1.0}, 1)  # the tracker fails: warning, file logging goes on
        run.log_metrics({"loss": 0.5}, 2)
        run.close()
        failed = tlog.RunLogger(str(tmp_path), log, "wandb", wandb_mode="offline")
        assert failed.kind == "none"
        failed.close()
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
        tb = tlog.RunLogger(str(tmp_path), log, "tensorboard")
        assert tb.kind == "none"
        tb.close()
    text = caplog.text
    assert "no API key" in text and "logging failed" in text and "failed to start" in text
    assert "tensorboard package is not installed" in text
    lines = open(tmp_path / "metrics.jsonl").read().splitlines()
    assert len(lines) == 2


@pytest.mark.parametrize("bad", [-7, 60, "50", 50.0, True, None])
def test_a_steps_field_that_disagrees_with_the_name_is_damaged(tmp_path, bad):
    """`checkpoints/0000050.pt` (no sidecar) holding steps=-7 (or 60, "50", ...) is skipped like a
    file with a bad checksum: resume falls back to step 40."""
    from training.checkpoint import select_resume_checkpoint

    exp = str(tmp_path)
    for step in range(0, 50, 10):
        atomic_torch_save(_fake_ckpt(step), checkpoint_path(exp, step))
    torch.save(dict(_fake_ckpt(50), steps=bad), checkpoint_path(exp, 50))
    choice = select_resume_checkpoint(exp)
    assert choice.path == checkpoint_path(exp, 40) and choice.state["steps"] == 40
    [(path, reason)] = choice.rejected
    assert path == checkpoint_path(exp, 50) and f"steps={bad!r}" in reason
    assert choice.messages() == [f"WARNING: skipping corrupt checkpoint {path}: {reason}"]


def test_a_checkpoint_outside_a_checkpoints_folder_needs_a_non_negative_step(tmp_path):
    from training.checkpoint import load_checkpoint

    path = str(tmp_path / "0000050.pt")  # not in checkpoints/: the name promises nothing
    torch.save(_fake_ckpt(7), path)
    assert load_checkpoint(path)["steps"] == 7
    torch.save(_fake_ckpt(-7), path)
    with pytest.raises(ValueError, match=r"steps=-7, not a non-negative integer"):
        load_checkpoint(path)


def run_folder(exp, limit=None):
    """A RunFolder of one process (no collective) on `exp`, with checkpoints_total_limit `limit`."""
    from types import SimpleNamespace

    from training.run_folder import RunFolder

    cfg = SimpleNamespace(checkpoints_total_limit=limit, exp_name="x", output_dir=str(exp))
    return RunFolder(cfg, str(exp), SimpleNamespace(is_main_process=True), lambda obj: [obj])


def test_a_resumed_run_never_writes_a_checkpoint_at_or_before_its_start(tmp_path):
    from training.errors import CheckpointWriteError

    exp = str(tmp_path)
    path = checkpoint_path(exp, 40)
    atomic_torch_save(_fake_ckpt(40), path)
    before = open(path, "rb").read()
    with run_folder(exp) as folder, pytest.raises(CheckpointWriteError) as info:
        folder.save_checkpoint(_fake_ckpt(40), checkpoint_path(exp, 50), resumed_step=50)
    assert str(info.value) == (f"refusing to write checkpoint {path} for step 40: this run resumed at step 50 "
                               "and writes only later steps")
    assert open(path, "rb").read() == before
    with run_folder(exp) as folder:
        folder.save_checkpoint(_fake_ckpt(51), path, resumed_step=50)  # later: written
    assert torch.load(checkpoint_path(exp, 51), weights_only=True)["steps"] == 51


def test_wandb_offline_through_accelerates_tracker_resumes_its_run(tmp_path, monkeypatch):
    """The real wandb, offline, through accelerate's WandBTracker: metrics, an image and the run config
    land in <run>/wandb, and a second start in the same folder continues the same wandb run."""
    import numpy as np

    from training.logger import RunLogger, setup_file_logger

    monkeypatch.setenv("WANDB_SILENT", "true")
    log = setup_file_logger(str(tmp_path), True, name="wandb_test")
    ids = []
    for step in (1, 2):
        tracker = RunLogger(str(tmp_path), log, "wandb", config={"lr": 1e-3, "preview": {"num_samples": 4}},
                            run_name="run", wandb_mode="offline")
        assert tracker.kind == "wandb"
        tracker.log_metrics({"loss": 1.0 / step}, step)
        tracker.log_image("previews/samples", np.zeros((8, 8, 3), np.uint8), step, caption=f"step {step}")
        tracker.close()
        ids.append((tmp_path / "wandb_run_id.txt").read_text())
    assert ids[0] == ids[1] and len(ids[0]) >= 6  # resumed: one wandb run
    runs = sorted(p.name for p in (tmp_path / "wandb").iterdir() if p.name.startswith("offline-run-"))
    assert runs and all(name.endswith(ids[0]) for name in runs)
