"""Trust, fourth pass (issue 32), the files a run reads and writes: regular files opened without
following links (A), records read from outside as bounded plain data and text that stays text (B),
the run lock held once (F), a finished run's provenance record kept (G), and the small items of the
run folder (config history, refused resumes, run.lock as a folder, the full-disk line)."""
import contextlib
import errno
import hashlib
import json
import os
import signal

import pytest
import torch

import generate
import train as train_cli
from conftest import randomize_, tiny_model
from utils.records import RecordError
from utils.regular_files import NotRegularFile, open_regular, read_regular

from train_helpers import tiny_argv, tiny_config

SECRET = "hunter2-do-not-print"


@contextlib.contextmanager
def no_hang(seconds=20):
    """Fail (instead of hanging CI) if the block blocks, e.g. on a FIFO."""
    def stop(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _plant(path, kind, target):
    """Put a `kind` ("symlink", "fifo", "folder", "hardlink") at `path`; `target` is the file outside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "symlink":
        path.symlink_to(target)
    elif kind == "hardlink":
        os.link(target, path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()


def _error_line(capsys, prefix="error: "):
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, captured.err
    return lines[0]


# ------------------------------------------------------------------ A. the shared opener
@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder", "hardlink"])
@pytest.mark.parametrize("mode", ["r", "rb", "a", "a+", "x"])
def test_open_regular_refuses_what_is_not_a_regular_file(tmp_path, kind, mode):
    target = tmp_path / "outside.txt"
    target.write_text("precious\n")
    path = tmp_path / "run" / "log.txt"
    _plant(path, kind, target)
    if kind == "hardlink" and mode in ("r", "rb", "x"):  # reading a file with two names changes nothing
        if mode == "x":
            with pytest.raises(FileExistsError):  # a regular file: exclusive creation says it exists
                open_regular(path, mode)
        else:
            with open_regular(path, mode) as f:
                assert f.read() in ("precious\n", b"precious\n")
        return
    with no_hang(), pytest.raises(NotRegularFile) as info:
        open_regular(path, mode)
    what = {"symlink": f"a symbolic link (to {target})", "fifo": "a FIFO (named pipe)", "folder": "a folder",
            "hardlink": "a file with 2 hard links (writing to it would change the others)"}[kind]
    assert str(info.value) == (f"{path} is {what}, not a regular file; this code never reads or writes through such a "
                               "name: move it away and start again")
    assert target.read_text() == "precious\n"


def test_open_regular_reads_appends_and_creates_regular_files(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with open_regular(path, "a") as f:
        f.write("one\n")
    with open_regular(path, "a") as f:
        f.write("two\n")
    assert open_regular(path).read() == "one\ntwo\n" == path.read_text()
    with pytest.raises(FileExistsError):
        open_regular(path, "x")
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "missing")
    assert read_regular(path, 8, "record") == b"one\ntwo\n"
    with pytest.raises(ValueError, match=r"record .*metrics.jsonl is 8 bytes, more than the 7 bytes such a file"):
        read_regular(path, 7, "record")
    # a user's own file may be a link (follow_links), but a link to a FIFO is still no regular file
    (tmp_path / "config.yaml").symlink_to(path)
    assert open_regular(tmp_path / "config.yaml", follow_links=True).read() == "one\ntwo\n"
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "to_pipe").symlink_to(tmp_path / "pipe")
    with no_hang(), pytest.raises(NotRegularFile, match="is a FIFO"):
        open_regular(tmp_path / "to_pipe", follow_links=True)


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_atomic_write_replaces_a_link_and_leaves_its_target(tmp_path, kind):
    from utils.atomic import atomic_write

    target = tmp_path / "outside.yaml"
    target.write_text("precious\n")
    path = tmp_path / "run" / "config.yaml"
    _plant(path, kind, target)
    with atomic_write(path, "w") as f:
        f.write("lr: 0.1\n")
    assert not path.is_symlink() and path.read_text() == "lr: 0.1\n" and path.stat().st_nlink == 1
    assert target.read_text() == "precious\n"


def test_an_atomic_write_error_names_its_file(tmp_path):
    from utils.atomic import atomic_write

    with pytest.raises(OSError) as info:
        with atomic_write(tmp_path / "x.json", "w"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert info.value.filename == str(tmp_path / "x.json") and os.listdir(tmp_path) == []


# ------------------------------------------------------------------ A. planted names in a run folder
PLANTED = [("run.lock", "symlink"), ("run.lock", "fifo"), ("log.txt", "symlink"), ("log.txt", "hardlink"),
           ("metrics.jsonl", "fifo"), ("bad_samples.json", "symlink"), ("config.yaml", "symlink"),
           ("wandb_run_id.txt", "fifo"), ("configs/0000000.yaml", "symlink")]


@pytest.mark.parametrize("name,kind", PLANTED)
def test_a_planted_name_in_a_run_folder_is_one_line_and_its_target_untouched(tiny_data, tmp_path, capsys, name, kind):
    target = tmp_path / "outside.txt"
    target.write_text("precious\n")
    exp = tmp_path / "out" / "run"
    _plant(exp / name, kind, target)
    with no_hang(120):
        assert train_cli.main(tiny_argv(tiny_data, str(tmp_path / "out"), exp_name="run", max_train_steps=2)) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: {exp / name} is a") and "not a regular file" in line, line
    assert target.read_text() == "precious\n"
    assert not (exp / "checkpoints").exists()


def test_run_lock_as_a_folder_is_one_line_naming_it(tiny_data, tmp_path, capsys):
    (tmp_path / "run" / "run.lock").mkdir(parents=True)
    assert train_cli.main(tiny_argv(tiny_data, str(tmp_path), exp_name="run")) == 2
    assert _error_line(capsys) == (f"error: {tmp_path}/run/run.lock is a folder, not a regular file; this code never "
                                   "reads or writes through such a name: move it away and start again")
    assert sorted(os.listdir(tmp_path / "run")) == ["run.lock"]  # nothing written


# ------------------------------------------------------------------ A. planted names in a sample folder
def _pixel_checkpoint(path, **config):
    model = randomize_(tiny_model("DFM-SiT-S/2", in_channels=3, num_classes=4))
    torch.save({"ema": model.state_dict(), "arch": model.arch, "steps": 0,
                "config": {"vae": "none", "path_type": "linear", **config}}, path)
    return str(path)


def _gen_argv(ckpt, sample_dir, **kw):
    opts = dict(num_samples=4, per_proc_batch_size=4, num_steps_per_scale="[1,1]", run_name="run",
                sample_dir=str(sample_dir), cpu_threads=1)
    opts.update(kw)
    return ["--ckpt", str(ckpt)] + [f"{k}={v}" for k, v in opts.items()]


@pytest.mark.parametrize("name,kind", [("run/config.yaml", "symlink"), ("run.provenance.json", "fifo"),
                                       ("run.provenance.json", "symlink"), ("run.npz", "fifo")])
def test_a_planted_name_in_a_sample_folder_is_one_line(tmp_path, capsys, name, kind):
    ckpt = _pixel_checkpoint(tmp_path / "m.pt")
    target = tmp_path / "outside.txt"
    target.write_text("precious\n")
    _plant(tmp_path / "samples" / name, kind, target)
    with no_hang(120):
        assert generate.main(_gen_argv(ckpt, tmp_path / "samples")) == 2
    line = _error_line(capsys, "generate.py: error: ")
    assert line.startswith(f"generate.py: error: {tmp_path / 'samples' / name} is a") and "not a regular file" in line
    assert target.read_text() == "precious\n" and not list((tmp_path / "samples").glob("run/*.png"))


# ------------------------------------------------------------------ B. bounded records, plain data
def test_a_provenance_record_is_read_bounded_and_never_followed(tmp_path):
    from generation.provenance import load_record

    huge = tmp_path / "huge.provenance.json"
    with open(huge, "wb") as f:
        f.truncate(400 << 20)  # 400 MB (sparse): refused from its size, never read
    deep = tmp_path / "deep.provenance.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    os.mkfifo(tmp_path / "fifo.provenance.json")
    (tmp_path / "link.provenance.json").symlink_to(deep)
    lines = {}
    for name in ("huge", "deep", "fifo", "link"):
        with no_hang(), pytest.raises(ValueError) as info:
            load_record(tmp_path / f"{name}.provenance.json")
        lines[name] = str(info.value)
    assert lines["huge"] == (f"provenance record {huge} is 400 MiB, more than the 1 MiB such a file ever needs: is it "
                             "the right file?; rerun generate.py to rewrite it, or delete it")
    assert lines["deep"] == (f"provenance record {deep}: nested more than 32 levels deep; not a record this code "
                             "writes; rerun generate.py to rewrite it, or delete it")
    assert "is a FIFO (named pipe), not a regular file" in lines["fifo"]
    assert f"is a symbolic link (to {deep})" in lines["link"]
    assert load_record(tmp_path / "none.provenance.json") is None


def test_records_are_plain_data_bounded_in_depth_and_never_interpolated():
    from utils.records import check_record, parse_json, parse_yaml

    assert parse_yaml("a: ${oc.env:HOME}\nb: 1e-4\nc: [1, {d: x}]\n", "x") == {
        "a": "${oc.env:HOME}", "b": 1e-4, "c": [1, {"d": "x"}]}
    assert parse_json('{"a": "${oc.env:HOME}"}', "x") == {"a": "${oc.env:HOME}"}
    nested = {"a": [[[{"b": 1}]]]}
    assert check_record(nested, "x", max_depth=5) is nested
    for bad, message in ((lambda: check_record(nested, "rec", max_depth=4), "rec: nested more than 4 levels deep"),
                         (lambda: parse_yaml("a: !!python/object/apply:os.system [echo]", "rec"),
                          "rec: not valid YAML here (could not determine a constructor for the tag"),
                         (lambda: parse_yaml("a: !!python/object/apply:pathlib.Path [x]", "rec"),
                          "rec: holds a PosixPath (a YAML tag?), not plain data"),
                         (lambda: parse_yaml("a: [" * 40 + "]" * 40, "rec"), "rec: nested more than 32 levels deep"),
                         (lambda: check_record({"a": "x" * 2000}, "rec", max_bytes=1000),
                          "rec: 2,009 bytes as JSON, more than the 1,000")):
        with pytest.raises(RecordError) as info:
            bad()
        assert str(info.value).startswith(message), str(info.value)


def test_weights_header_fields_are_bounded_plain_data(tmp_path):
    from safetensors.torch import save_file

    from models import read_checkpoint
    from models.weights_io import export_weights

    path = tmp_path / "w.safetensors"
    export_weights(path, {"ema": {"w": torch.zeros(2)}}, arch={"name": "x"}, config={"vae": "${oc.env:HOME}"}, steps=3)
    assert read_checkpoint(str(path))["config"] == {"vae": "${oc.env:HOME}"}  # text, never interpolated
    for name, meta, message in (
            ("deep", {"config": "[" * 5000 + "]" * 5000}, "header field config: nested more than 32 levels deep"),
            ("big", {"config": json.dumps({"a": "x" * (2 << 20)})}, "header field config: 2,097,161 bytes of JSON"),
            ("steps", {"steps": "9" * 5000}, "header field steps is '9999")):
        bad = tmp_path / f"{name}.safetensors"
        save_file({"ema.w": torch.zeros(2)}, str(bad), metadata={"format": "dfm-weights", "groups": '["ema"]', **meta})
        with pytest.raises(ValueError) as info:
            read_checkpoint(str(bad))
        assert message in str(info.value) and "\n" not in str(info.value)


def test_a_huge_or_deep_bad_samples_record_is_one_line(tiny_data, tmp_path, capsys):
    exp = tmp_path / "run"
    exp.mkdir()
    (exp / "bad_samples.json").write_text('{"files": ' + "[" * 40 + "]" * 40 + "}")
    assert train_cli.main(tiny_argv(tiny_data, str(tmp_path), exp_name="run", max_train_steps=2)) == 2
    assert _error_line(capsys) == (f"error: bad samples record {exp}/bad_samples.json: nested more than 32 levels "
                                   "deep; not a record this code writes; move it away to start its list again")


# ------------------------------------------------------------------ B. text stays text
def test_command_line_and_file_text_stays_as_written(tmp_path, monkeypatch):
    from training.config import parse_config
    from utils.config import config_to_dict, save_config
    from utils.records import read_record

    monkeypatch.setenv("DFM_SECRET", SECRET)
    (tmp_path / "c.yaml").write_text("wandb_project: p-${oc.env:DFM_SECRET}\n")
    cfg = parse_config(["--config", str(tmp_path / "c.yaml"), f"data_dir={tmp_path}/d-${{oc.env:DFM_SECRET}}",
                        "exp_name=x-${oc.env:DFM_SECRET}-${y", "output_dir=o\\${x}", "resume=none"])
    assert (cfg.exp_name, cfg.data_dir, cfg.wandb_project, cfg.output_dir) == (
        "x-${oc.env:DFM_SECRET}-${y", f"{tmp_path}/d-${{oc.env:DFM_SECRET}}", "p-${oc.env:DFM_SECRET}", "o\\${x}")
    plain = config_to_dict(cfg)
    assert (plain["exp_name"], plain["output_dir"]) == ("x-${oc.env:DFM_SECRET}-${y", "o\\${x}")
    save_config(cfg, tmp_path / "saved.yaml")
    text = (tmp_path / "saved.yaml").read_text()
    assert "exp_name: x-${oc.env:DFM_SECRET}-${y" in text and SECRET not in text + json.dumps(plain)
    assert read_record(tmp_path / "saved.yaml", "config", fmt="yaml") == plain  # read back: the same text


@pytest.mark.parametrize("arg,message", [
    ("stage_weights=[0.5,", "'[0.5,': not valid YAML here (did not find expected node content)"),
    ("stage_weights=!!python/object/apply:os.system [touch MARKER]",
     "not valid YAML here (could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system')"),
    ("lr=" + "9" * 400,
     "Invalid value for config key 'lr' in command-line overrides: int too large to convert to float"),
    ("model_overrides={depth: " + "[" * 40 + "]" * 40 + "}", "nested more than 32 levels deep"),
])
def test_command_line_yaml_errors_are_one_line(tiny_data, tmp_path, capsys, monkeypatch, arg, message):
    monkeypatch.chdir(tmp_path)
    assert train_cli.main(tiny_argv(tiny_data, str(tmp_path), exp_name="run") + [arg]) == 2
    line = _error_line(capsys)
    assert message in line and len(line) < 400, line
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_a_checkpoint_config_cannot_read_the_environment(tmp_path, capsys, monkeypatch, fmt):
    from models.weights_io import export_checkpoint

    monkeypatch.setenv("DFM_SECRET", SECRET)
    ckpt = _pixel_checkpoint(tmp_path / "m.pt", vae="${oc.env:DFM_SECRET}")
    if fmt == "safetensors":
        ckpt = export_checkpoint(ckpt, str(tmp_path / "m.safetensors"))
    assert generate.main(_gen_argv(ckpt, tmp_path / "samples")) == 2
    captured = capsys.readouterr()
    assert "config key 'vae': could not load the VAE '${oc.env:DFM_SECRET}'" in captured.err
    assert SECRET not in captured.out + captured.err and "Traceback" not in captured.err


def test_a_run_keeps_its_text_end_to_end(tiny_data, tmp_path, capsys, monkeypatch):
    """A run named with `${oc.env:...}` trains, resumes and is sampled under that name as text."""
    monkeypatch.setenv("DFM_SECRET", SECRET)
    name = "x-${oc.env:DFM_SECRET}"
    keys = dict(exp_name=name, max_train_steps=2, checkpointing_steps=1)
    assert train_cli.main(tiny_argv(tiny_data, str(tmp_path), **keys)) == 0
    assert train_cli.main(tiny_argv(tiny_data, str(tmp_path), **{**keys, "max_train_steps": 3, "resume": 2})) == 0
    exp = tmp_path / name
    assert sorted(os.listdir(exp / "checkpoints"))[-1] == "0000003.pt.sha256"
    assert f"exp_name: {name}" in (exp / "config.yaml").read_text()
    assert torch.load(exp / "checkpoints" / "0000003.pt", weights_only=True)["config"]["exp_name"] == name
    captured = capsys.readouterr()
    everything = captured.out + captured.err + "".join(
        open(os.path.join(root, f), errors="replace").read() for root, _, files in os.walk(exp) for f in files
        if f.endswith((".txt", ".yaml", ".jsonl")))
    assert SECRET not in everything and "Traceback" not in captured.err


# ------------------------------------------------------------------ F. the run lock
def test_the_run_lock_is_never_held_twice_under_stress(tmp_path):
    """8 processes take and give back one run folder's lock for 3 s; an O_EXCL marker file each holder
    creates and removes counts two holders at once (on main, ~40 in ~4,000 acquisitions)."""
    from lock_worker import stress

    (tmp_path / "run").mkdir()
    counts = stress(str(tmp_path / "run"), seconds=3.0, workers=8)
    assert counts["acquired"] > 0 and counts["overlaps"] == 0, counts
    assert not (tmp_path / "run" / "run.lock").exists()


def test_a_lock_won_on_a_file_its_holder_removed_is_not_held(tmp_path, monkeypatch):
    """The race itself, step by step: B opens run.lock while A holds it; A ends (removes the file, closes);
    C locks a new run.lock; only then does B's flock run. B must not hold the folder too."""
    import fcntl

    from training import run_folder

    exp = str(tmp_path)
    a, _ = run_folder.acquire_lock(exp)
    real_flock, held = fcntl.flock, {}

    def flock_after_a_ends(fd, op):
        if "c" not in held:  # B's first flock: A ends and C takes the folder in between
            run_folder.release_lock(a, exp)
            monkeypatch.setattr(fcntl, "flock", real_flock)
            held["c"] = run_folder.acquire_lock(exp)[0]
            monkeypatch.setattr(fcntl, "flock", flock_after_a_ends)
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_ends)
    with pytest.raises(run_folder.RunLocked, match="is in use by another run"):
        run_folder.acquire_lock(exp)  # B: its stale lock is dropped, and C holds the file at the name
    monkeypatch.setattr(fcntl, "flock", real_flock)
    run_folder.release_lock(held["c"], exp)
    assert os.listdir(exp) == []


# ------------------------------------------------------------------ G. a finished run's record is kept
def test_a_rerun_never_rewrites_a_finished_runs_record(tmp_path, capsys):
    from generation.provenance import record_path

    ckpt = _pixel_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "samples"
    assert generate.main(_gen_argv(ckpt, out)) == 0
    record = record_path(out / "run.npz")
    before = record.read_bytes()
    assert generate.main(_gen_argv(ckpt, out, save_npz="false")) == 0
    assert record.read_bytes() == before  # not `npz: null`: the .npz it describes is untouched
    assert json.loads(before)["npz_sha256"] == hashlib.sha256((out / "run.npz").read_bytes()).hexdigest()
    assert f"{record} is kept as it is" in capsys.readouterr().out
    # a run that did not write the .npz, rerun with save_npz=true: the .npz is new, so is the record
    assert generate.main(_gen_argv(ckpt, out, run_name="b", save_npz="false")) == 0
    assert json.loads(record_path(out / "b.npz").read_text())["npz"] is None
    assert generate.main(_gen_argv(ckpt, out, run_name="b")) == 0
    rewritten = json.loads(record_path(out / "b.npz").read_text())
    assert rewritten["complete"] and rewritten["npz_sha256"] == hashlib.sha256((out / "b.npz").read_bytes()).hexdigest()


# ------------------------------------------------------------------ the rest: the run folder
def test_an_unparsable_config_version_does_not_stop_a_resume(tiny_data, tmp_path):
    from training.loop import train

    keys = dict(exp_name="run", max_train_steps=2, checkpointing_steps=2)
    train(tiny_config(tiny_data, str(tmp_path), **keys))
    history = tmp_path / "run" / "configs"
    (history / "0000002.yaml").write_text("lr: [0.1,\n")  # damaged; the resume from step 2 writes this name
    result = train(tiny_config(tiny_data, str(tmp_path), **{**keys, "max_train_steps": 4}))
    assert result.steps == 4
    assert (history / "0000002.1.yaml").read_text() == "lr: [0.1,\n"  # kept, under the next free name
    assert "max_train_steps: 4" in (history / "0000002.yaml").read_text()
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"WARNING: config {history}/0000002.yaml: not valid YAML here (" in log and "kept as it is" in log


def test_a_refused_resume_leaves_the_config_history_as_it_was(tiny_data, tmp_path, capsys):
    from conftest import read_tree

    keys = dict(exp_name="run", max_train_steps=2, checkpointing_steps=2, **{"posthoc_ema.stds": "[0.05]"})
    assert train_cli.main(tiny_argv(tiny_data, str(tmp_path), **keys)) == 0
    before = {k: v for k, v in read_tree(tmp_path / "run").items() if k.startswith("config")}
    capsys.readouterr()
    argv = tiny_argv(tiny_data, str(tmp_path), **{**keys, "max_train_steps": 4, "posthoc_ema.stds": "[0.1]"})
    assert train_cli.main(argv) == 2
    assert "posthoc_ema.stds=[0.1], but checkpoint" in _error_line(capsys)
    after = {k: v for k, v in read_tree(tmp_path / "run").items() if k.startswith("config")}
    assert after == before and sorted(after) == ["config.yaml", "configs/0000000.yaml"]


def test_a_failed_output_write_names_the_file_and_what_is_kept(tiny_data, tmp_path, capsys, monkeypatch):
    """A post-hoc EMA snapshot that cannot be written before the first checkpoint: the line names the
    snapshot and says that no checkpoint was written (not that "the checkpoints are intact")."""
    from training.posthoc_ema import PowerEMA, snapshot_path
    from utils.atomic import atomic_write

    def disk_full(self, exp_dir, step, arch, config):
        with atomic_write(snapshot_path(exp_dir, step), "wb"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PowerEMA, "snapshot", disk_full)
    keys = {"exp_name": "run", "max_train_steps": 4, "checkpointing_steps": 4, "posthoc_ema.stds": "[0.05]",
            "posthoc_ema.every": 1}
    assert train_cli.main(tiny_argv(tiny_data, str(tmp_path), **keys)) == 1
    snapshot = snapshot_path(str(tmp_path / "run"), 1)
    assert _error_line(capsys) == (f"error: cannot write {snapshot}: [Errno 28] No space left on device; no checkpoint "
                                   "was written yet")


def test_resume_by_step_never_follows_a_link_in_the_run_folder(tmp_path, tiny_data):
    from train_helpers import tiny_config
    from training.config import ConfigError

    folder = tmp_path / "out" / "linked" / "checkpoints"
    folder.mkdir(parents=True)
    target = tmp_path / "elsewhere.pt"
    target.write_bytes(b"not a checkpoint")
    (folder / "0000002.pt").symlink_to(target)
    with pytest.raises(ConfigError, match=r"resume: .*0000002.pt is a symbolic link \(to .*elsewhere.pt\), not a "
                                          "checkpoint file of this run"):
        tiny_config(tiny_data, str(tmp_path / "out"), exp_name="linked", resume="2")
    assert target.read_bytes() == b"not a checkpoint"


def test_planted_names_among_the_samples_are_made_again_and_never_followed(tmp_path):
    """A FIFO, a link or a huge file under a sample's name: the resume check neither blocks nor reads
    through it, and calls the sample missing (its write then replaces the name, not the target)."""
    import numpy as np

    from generation.images import is_complete_png, missing_pngs, npz_is_complete, png_path, write_png_atomic

    run = tmp_path / "run"
    run.mkdir()
    image = np.zeros((8, 8, 3), np.uint8)
    write_png_atomic(png_path(run, 0), image)
    os.mkfifo(png_path(run, 1))
    target = tmp_path / "elsewhere.png"
    write_png_atomic(target, image)
    os.symlink(target, png_path(run, 2))
    with open(png_path(run, 3), "wb") as f:
        f.truncate(10 << 20)  # 10 MB of zeros: no 8x8 PNG is that large
    assert missing_pngs(run, range(4), 8) == [1, 2, 3]
    write_png_atomic(png_path(run, 2), image)
    assert is_complete_png(target, 8) and not os.path.islink(png_path(run, 2))  # the link replaced, target kept
    os.mkfifo(tmp_path / "run.npz")
    assert not npz_is_complete(tmp_path / "run.npz", (4, 8, 8, 3))  # returns at once
