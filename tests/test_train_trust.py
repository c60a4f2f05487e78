"""Training runs stop with one clear line and lose nothing: a checkpoint that cannot be written
(disk full), errors in log.txt; independent random streams; the LR warm-up; quiet progress bars
in log files."""
import io
import os

import pytest
import torch

import train as train_cli
from training.rng import micro_batch_seed, seed_micro_batch
from utils.atomic import atomic_write

from train_helpers import assert_same_weights, tiny_argv


def test_disk_full_gives_one_line_and_keeps_the_last_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    import training.run_folder as run_folder

    real_save = run_folder.atomic_torch_save
    calls = []

    def save_then_fill_disk(obj, path):
        calls.append(path)
        if len(calls) == 1:
            return real_save(obj, path)
        with atomic_write(path, "wb", fsync=True) as f:  # torch's zip writer fails part-way
            f.write(b"PK\x03\x04 half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 5184 vs 5120")

    monkeypatch.setattr(run_folder, "atomic_torch_save", save_then_fill_disk)
    argv = tiny_argv(tiny_data, str(tmp_path), exp_name="full", max_train_steps=4, checkpointing_steps=2)
    code = train_cli.main(argv)
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("error")]
    assert "Traceback" not in captured.err + captured.out
    first = os.path.join(str(tmp_path), "full", "checkpoints", "0000002.pt")
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: cannot write checkpoint "), err
    assert "0000004.pt" in err[0] and "disk full or quota" in err[0] and f"{first} is intact" in err[0]
    assert sorted(os.listdir(os.path.dirname(first))) == ["0000002.pt", "0000002.pt.sha256"]  # no partial file
    assert torch.load(first, weights_only=True)["steps"] == 2
    with open(os.path.join(str(tmp_path), "full", "log.txt")) as f:
        assert "error: cannot write checkpoint" in f.read()  # the same line is in the run's log


def test_errors_that_stop_a_run_are_in_log_txt(tiny_data, tmp_path, capsys):
    argv = tiny_argv(tiny_data, str(tmp_path), exp_name="nan", lr=1e30, max_train_steps=3)
    assert train_cli.main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "non-finite" in err[0]
    with open(os.path.join(str(tmp_path), "nan", "log.txt")) as f:
        assert "error: the training loss became non-finite" in f.read()


def test_random_streams_are_independent():
    """Label dropout (global RNG) and posterior/time noise (the generator) of one micro-batch no
    longer start from the same seed, so their first numbers differ."""
    gen = torch.Generator()
    seed_micro_batch(0, 5, 1, gen)
    a, b = torch.rand(8, generator=gen), torch.rand(8)
    assert not torch.equal(a, b)
    seeds = {micro_batch_seed(0, 5, 1, s) for s in ("data", "labels", "budget")}
    assert len(seeds) == 3
    # pure functions of (seed, step, slot): the same again, different for another slot
    assert micro_batch_seed(0, 5, 1) == micro_batch_seed(0, 5, 1) != micro_batch_seed(0, 5, 2)


def test_linear_warmup_schedule(tiny_data, tmp_path):
    from training.config import parse_config
    from training.setup import build_train_state

    cfg = parse_config(tiny_argv(tiny_data, str(tmp_path), lr_scheduler="constant_with_linear_warmup",
                                 warmup_steps=4, lr=1e-3))
    state = build_train_state(cfg, 3, 16, "cpu", None, None)
    seen = []
    for _ in range(6):
        seen.append(state.optimizer.param_groups[0]["lr"])
        state.optimizer.step()
        state.lr_schedule.step()
    assert seen == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    # a resumed run rebuilds the schedule at its step
    resumed = build_train_state(cfg, 3, 16, "cpu", {"model": state.model.state_dict(),
                                                    "ema": state.ema_model.state_dict(),
                                                    "opt": state.optimizer.state_dict(), "steps": 2,
                                                    "arch": state.model.arch}, "x.pt")
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    resumed.optimizer.step()
    resumed.lr_schedule.step()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(7.5e-4)


def test_progress_bars_are_quiet_in_log_files():
    from utils.progress import LOG_FILE_INTERVAL_S, progress_bar

    log_file = io.StringIO()  # not a terminal
    bar = progress_bar(total=10, file=log_file)
    assert bar.mininterval == LOG_FILE_INTERVAL_S >= 30
    bar.close()

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = progress_bar(total=10, file=Terminal())
    assert bar.mininterval < 1
    bar.close()


def _corrupt_copy(src, dst):
    """A copy of the demo dataset with one garbage PNG."""
    import json
    import shutil

    shutil.copytree(src, dst)
    with open(os.path.join(dst, "dataset.json")) as f:
        victim = json.load(f)["labels"][3][0]
    with open(os.path.join(dst, victim), "wb") as f:
        f.write(b"this is not a png")
    return dst, victim


def test_bad_samples_error_names_the_file_and_skip_resumes_exactly(tiny_data, tmp_path, capsys):
    from training.config import parse_config
    from training.loop import train

    data, victim = _corrupt_copy(tiny_data, str(tmp_path / "data"))
    out = str(tmp_path / "runs")
    # error (default): one line naming the file and the problem
    assert train_cli.main(tiny_argv(data, out, exp_name="err", max_train_steps=6)) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and victim in err[0] and "bad_samples=skip" in err[0], err
    # skip: the run completes, lists the file, and a kill/resume repeats the straight run exactly
    steps = dict(max_train_steps=6, checkpointing_steps=2, bad_samples="skip")
    straight = train(parse_config(tiny_argv(data, out, exp_name="straight", **steps)))
    train(parse_config(tiny_argv(data, out, exp_name="cut", **steps)), stop_after_step=3)
    resumed = train(parse_config(tiny_argv(data, out, exp_name="cut", **steps)))
    a = torch.load(straight.last_checkpoint, weights_only=True)
    b = torch.load(resumed.last_checkpoint, weights_only=True)
    assert_same_weights(a, b)
    import json

    with open(os.path.join(out, "straight", "bad_samples.json")) as f:
        report = json.load(f)
    assert report["num_files"] == 1 and victim in report["files"][0]["file"]
    with open(os.path.join(out, "straight", "log.txt")) as f:
        assert victim in f.read()


def test_safetensors_export_loads_without_unpickling(tiny_data, tmp_path):
    from models import load_pretrained
    from training.config import parse_config
    from training.loop import train
    from training.run_folder import exported_weights_path

    result = train(parse_config(tiny_argv(tiny_data, str(tmp_path), exp_name="st", save_format="safetensors",
                                          max_train_steps=4, checkpointing_steps=2, checkpoints_total_limit=1)))
    path = exported_weights_path(result.exp_dir, 4)
    assert sorted(os.listdir(os.path.dirname(path))) == ["0000004.safetensors"]  # pruned with its checkpoint
    model = load_pretrained(path)
    ema = torch.load(result.last_checkpoint, weights_only=True)["ema"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, ema[key]), key


def test_a_planted_checkpoint_with_a_negative_step_is_skipped_and_overwrites_nothing(tiny_data, tmp_path, capsys):
    """`checkpoints/0000006.pt` without a sidecar holding steps=-7 once resumed at step -7 and then
    overwrote the genuine checkpoints: now it is skipped (warning), the run continues from step 4,
    the checkpoints 2 and 4 stay byte-identical, and the run ends where a straight run ends."""
    from training.config import parse_config
    from training.loop import train

    out = str(tmp_path)
    straight = train(parse_config(tiny_argv(tiny_data, out, exp_name="straight", max_train_steps=8)))
    run = train(parse_config(tiny_argv(tiny_data, out, exp_name="planted", max_train_steps=4)))
    folder = os.path.dirname(run.last_checkpoint)
    genuine = {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}
    planted = torch.load(run.last_checkpoint, weights_only=True)
    planted["steps"] = -7
    torch.save(planted, os.path.join(folder, "0000006.pt"))
    capsys.readouterr()
    resumed = train(parse_config(tiny_argv(tiny_data, out, exp_name="planted", max_train_steps=8)))
    printed = capsys.readouterr().out
    assert f"WARNING: skipping corrupt checkpoint {folder}/0000006.pt: {folder}/0000006.pt holds steps=-7" in printed
    assert f"resuming from {folder}/0000004.pt at step 4" in printed
    for name, data in genuine.items():
        assert open(os.path.join(folder, name), "rb").read() == data, name
    assert_same_weights(torch.load(straight.last_checkpoint, weights_only=True),
                        torch.load(resumed.last_checkpoint, weights_only=True))
    assert torch.load(os.path.join(folder, "0000006.pt"), weights_only=True)["steps"] == 6  # rewritten genuinely


def _one_error_line(capsys):
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, captured.err
    return lines[0]


def test_an_unusable_run_folder_is_one_line(tiny_data, tmp_path, monkeypatch, capsys):
    """output_dir that is a file, read-only (EACCES / EROFS, simulated: root ignores chmod), an
    exp_name too long for the file system, a disk already full for config.yaml (simulated)."""
    import errno

    import training.logger as tlog
    import training.run_folder as run_folder

    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert train_cli.main(tiny_argv(tiny_data, str(a_file), exp_name="run")) == 2
    assert _one_error_line(capsys) == (
        f"error: output_dir: cannot create the run folder {a_file}/run: [Errno 20] Not a directory ({a_file} is a "
        "file, not a folder); choose another output_dir or exp_name")

    long_name = "x" * 300
    assert train_cli.main(tiny_argv(tiny_data, str(tmp_path), exp_name=long_name)) == 2
    assert _one_error_line(capsys) == (
        f"error: exp_name: {'x' * 32!r}... (300 bytes) is too long for a folder name in {tmp_path} ([Errno 36] File "
        "name too long; most file systems allow 255 bytes); choose a shorter exp_name")

    read_only = tmp_path / "read_only"
    real_makedirs = os.makedirs

    def makedirs(path, *args, **kwargs):  # what a folder without write permission answers
        if str(path).startswith(str(read_only)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", makedirs)
    assert train_cli.main(tiny_argv(tiny_data, str(read_only), exp_name="run")) == 2
    assert _one_error_line(capsys) == (f"error: output_dir: cannot create the run folder {read_only}/run: [Errno 13] "
                                       "Permission denied; choose an output_dir you can write to")
    monkeypatch.undo()

    def read_only_file_system(self):
        raise OSError(errno.EROFS, "Read-only file system", self.baseFilename)

    monkeypatch.setattr(tlog.LogFileHandler, "_open", read_only_file_system)
    assert train_cli.main(tiny_argv(tiny_data, str(tmp_path), exp_name="rofs")) == 2
    assert _one_error_line(capsys) == (f"error: output_dir: cannot create the run folder {tmp_path}/rofs: [Errno 30] "
                                       "Read-only file system; choose an output_dir you can write to")
    monkeypatch.undo()

    def disk_full(cfg, path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(run_folder, "save_config", disk_full)
    assert train_cli.main(tiny_argv(tiny_data, str(tmp_path), exp_name="full")) == 1
    expected = (f"error: cannot write {tmp_path}/full/config.yaml: [Errno 28] No space left on device; free some "
                "space and start again (no step was trained, no checkpoint touched)")
    assert _one_error_line(capsys) == expected
    with open(tmp_path / "full" / "log.txt") as f:
        assert f.read().strip().splitlines()[-1].endswith(expected)  # the run folder exists: the line is there too
    assert not os.path.exists(tmp_path / "full" / "checkpoints")


def test_a_log_file_that_cannot_be_written_warns_once(tmp_path, capsys):
    import errno
    import logging

    from training.logger import setup_file_logger

    log = setup_file_logger(str(tmp_path), True, name="full-disk")
    [handler] = [h for h in log.handlers if isinstance(h, logging.FileHandler)]

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    real_stream, handler.stream = handler.stream, FullDisk()
    log.info("first")
    log.info("second")
    handler.stream = real_stream
    log.handlers.clear()
    handler.close()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    assert err.count(f"warning: cannot write {tmp_path}/log.txt: [Errno 28] No space left on device") == 1


def _first_image_resized(src, dst, size):
    """A copy of the demo dataset whose item 0 is a size x size image (the others stay 16x16)."""
    import json
    import shutil

    from PIL import Image

    shutil.copytree(src, dst)
    with open(os.path.join(dst, "dataset.json")) as f:
        first = json.load(f)["labels"][0][0]
    Image.new("RGB", (size, size), (200, 30, 30)).save(os.path.join(dst, first))
    return dst, first


def test_a_wrong_size_first_image_is_one_bad_sample_not_the_dataset_shape(tiny_data, tmp_path, capsys):
    """Item 0 at 32x32 among 16x16 images, resolution=16: `skip` trains and lists it, `error`
    names it; a dataset that really is 32 px still gets `set resolution=32`."""
    import json

    data, first = _first_image_resized(tiny_data, str(tmp_path / "data"), 32)
    out = str(tmp_path / "runs")
    assert train_cli.main(tiny_argv(data, out, exp_name="skip", bad_samples="skip")) == 0
    with open(os.path.join(out, "skip", "bad_samples.json")) as f:
        [record] = json.load(f)["files"]
    reason = ("shape (3, 32, 32) differs from the dataset's (3, 16, 16) (the configured resolution, which most "
              "items have)")
    assert record["index"] == 0 and record["file"].endswith(first) and record["reason"] == reason
    capsys.readouterr()
    assert train_cli.main(tiny_argv(data, out, exp_name="error")) == 1
    line = _one_error_line(capsys)
    assert line.startswith(f"error: corrupt sample 0: {os.path.join(data, first)}: {reason}")
    assert train_cli.main(tiny_argv(data, out, exp_name="wrong", resolution=32)) == 2
    assert "images are 16x16 (shape (3, 16, 16)) but resolution=32 expects (3, 32, 32); set resolution=16" in \
        _one_error_line(capsys)
