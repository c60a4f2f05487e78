"""Trust, third pass (training and generation side): pruning keeps good checkpoints, one run per
folder, a finished .npz is never shrunk, config includes, edited checkpoints, Ctrl-C, --help in a
pipe, a failure rank 0 alone sees, extreme stage scales, ELIT budget levels, small things."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train as train_cli
from training.checkpoint import atomic_torch_save, checkpoint_path, list_checkpoints, prune_checkpoints
from training.loop import train

from train_helpers import load_ckpt, run_torchrun, tiny_argv, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _error_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ------------------------------------------------------------------ 1. pruning never deletes good checkpoints
def test_pruning_keeps_the_checkpoint_just_written_past_a_damaged_newer_one(tiny_data, tmp_path):
    out = str(tmp_path)
    keys = dict(max_train_steps=8, checkpointing_steps=8, checkpoints_total_limit=1)
    train(tiny_config(tiny_data, out, exp_name="run", **keys))
    newest = checkpoint_path(os.path.join(out, "run"), 8)
    with open(newest, "r+b") as f:  # bytes flipped in the only checkpoint
        f.seek(2000)
        f.write(b"\xff\xfe\xfd\xfc")
    # the rerun falls back to step 0 and checkpoints every 2 steps, up to step 6 (below the damaged 8)
    result = train(tiny_config(tiny_data, out, exp_name="run", **{**keys, "checkpointing_steps": 2,
                                                                  "max_train_steps": 6}))
    kept = [step for step, _ in list_checkpoints(os.path.join(out, "run"))]
    assert kept == [6, 8]  # the newest good one (just written) and the damaged one, left for a look
    assert os.path.isfile(result.last_checkpoint) and result.last_checkpoint.endswith("0000006.pt")
    log = open(os.path.join(out, "run", "log.txt")).read()
    assert "left alone in" in log and "0000008.pt" in log and log.count("left alone in") == 1
    assert "saved checkpoint" in log and "(removed 1 old)" in log  # 2 and 4 went as 4 and 6 came


def test_pruning_leaves_look_alikes_alone(tmp_path):
    exp = str(tmp_path)
    folder = os.path.join(exp, "checkpoints")
    os.makedirs(folder)
    for step in (10, 20):
        atomic_torch_save({"model": {}, "ema": {}, "opt": {}, "steps": step}, checkpoint_path(exp, step))
    os.mkdir(os.path.join(folder, "0000080.pt"))                          # a folder
    os.symlink("/dev/zero", os.path.join(folder, "0000090.pt"))           # a symlink to a device
    os.mkfifo(os.path.join(folder, "0000100.pt"))                         # a fifo (opening it would hang)
    with open(os.path.join(folder, "0000110.pt"), "w") as f:              # a text file
        f.write("not a checkpoint")
    pruned = prune_checkpoints(exp, 1)
    assert [os.path.basename(p) for p in pruned.removed] == ["0000010.pt"]
    assert sorted(os.path.basename(p) for p in pruned.left_alone) == ["0000080.pt", "0000090.pt", "0000100.pt",
                                                                       "0000110.pt"]
    left = sorted(os.listdir(folder))
    assert left == ["0000020.pt", "0000020.pt.sha256", "0000080.pt", "0000090.pt", "0000100.pt", "0000110.pt"]
    assert [s for s, _ in list_checkpoints(exp)] == [20, 110]  # only regular files are ever read


# ------------------------------------------------------------------ 2. one run per folder
def test_a_second_run_on_the_same_folder_is_one_line_and_writes_nothing(tiny_data, tmp_path):
    argv = tiny_argv(tiny_data, str(tmp_path), exp_name="shared", max_train_steps=400, checkpointing_steps=400)
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    first = subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lock = tmp_path / "shared" / "run.lock"
    deadline = time.time() + 120
    while not (tmp_path / "shared" / "log.txt").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert lock.exists(), first.communicate()[0]
    log_before = (tmp_path / "shared" / "log.txt").read_text()
    second = subprocess.run([sys.executable, "train.py", *argv, "seed=9"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    holder = json.loads(lock.read_text())
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if line.strip()]
    assert errors == [f"error: {tmp_path}/shared is in use by another run (host {holder['host']}, process "
                      f"{first.pid}, since {holder['started']}); wait for it to finish, or choose another exp_name "
                      "/ output_dir"]
    assert holder["pid"] == first.pid
    log_after = (tmp_path / "shared" / "log.txt").read_text()
    assert log_after.startswith(log_before) and "seed=9" not in log_after and ": 9" not in log_after
    assert "seed: 3" in (tmp_path / "shared" / "config.yaml").read_text()  # the first run's config
    assert not lock.exists()  # released at the end of the first run


def test_a_lock_left_by_a_dead_process_is_taken_over_with_one_line(tiny_data, tmp_path):
    import socket

    exp = tmp_path / "run"
    exp.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (exp / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                              "started": "2026-01-01T00:00:00+00:00"}))
    train(tiny_config(tiny_data, str(tmp_path), exp_name="run", max_train_steps=2))
    log = (exp / "log.txt").read_text()
    assert f"WARNING: took over {exp}/run.lock from a run that is no longer running (host {socket.gethostname()}, " \
           f"process {int(dead.stdout)}, since 2026-01-01T00:00:00+00:00)" in log
    (exp / "run.lock").write_text(json.dumps({"host": "another-node", "pid": 1, "started": "x"}))
    assert train_cli.main(tiny_argv(tiny_data, str(tmp_path), exp_name="run", max_train_steps=4)) == 2


# ------------------------------------------------------------------ 3. a finished .npz is never shrunk
def test_a_finished_npz_is_not_replaced_by_fewer_samples(tmp_path):
    from conftest import tiny_model
    from generation.config import GenerationError, load_generate_config
    from generation.runner import run

    model = tiny_model("SiT-S/2", in_channels=3, num_classes=4)
    ckpt = tmp_path / "m.pt"
    torch.save({"ema": model.state_dict(), "arch": model.arch, "config": {"vae": "none"}}, ckpt)

    def generate(n):
        return run(load_generate_config([f"--ckpt={ckpt}", "run_name=x", "save_png=false", f"num_samples={n}",
                                         "num_steps_per_scale=[2]", f"sample_dir={tmp_path}"]))

    generate(8)
    before = (tmp_path / "x.npz").read_bytes()
    with pytest.raises(GenerationError) as info:
        generate(3)
    assert str(info.value) == (f"{tmp_path}/x is a finished run of 8 samples ({tmp_path}/x.npz is complete); "
                               f"num_samples=3 would replace it: choose another run_name, or delete "
                               f"{tmp_path}/x.npz first")
    assert (tmp_path / "x.npz").read_bytes() == before


# ------------------------------------------------------------------ 8 and 10. config includes
def test_includes_are_read_once_in_a_defined_order(tmp_path):
    from utils.config import config_file_layers

    (tmp_path / "d.yaml").write_text("lr: 1.0\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("include: d.yaml\nlr: 2.0\n")
    (tmp_path / "c.yaml").write_text("include: d.yaml\nseed: 3\n")
    (tmp_path / "a.yaml").write_text("include: [b.yaml, c.yaml]\n")
    layers = config_file_layers(str(tmp_path / "a.yaml"))
    assert [os.path.basename(p) for p, _ in layers] == ["d.yaml", "b.yaml", "c.yaml", "a.yaml"]
    from training.config import TrainConfig
    from utils.config import load_config

    merged = load_config(TrainConfig, ["--config", str(tmp_path / "a.yaml")])
    assert merged.lr == 2.0 and merged.seed == 3  # b's lr is not undone by d again
    # a wide fan-out: 7 files, each including the next one 10 times over, 6 levels: each read once
    for i in range(7):
        include = "" if i == 6 else "include: [" + ", ".join([f"f{i + 1}.yaml"] * 10) + "]\n"
        (tmp_path / f"f{i}.yaml").write_text(include + f"seed: {i}\n")
    assert [os.path.basename(p) for p, _ in config_file_layers(str(tmp_path / "f0.yaml"))] == \
        [f"f{i}.yaml" for i in range(6, -1, -1)]


@pytest.mark.parametrize("text,message", [
    ("include: 5\n", "`include` takes a file name or a list of file names, got 5"),
    ("include: true\n", "`include` takes a file name or a list of file names, got True"),
    ("include: {a: 1}\n", "`include` takes a file name or a list of file names, got {'a': 1}"),
    ("include: [null]\n", "`include` takes a file name or a list of file names, got [None]"),
    ("include: /etc/passwd\n", "config file /etc/passwd does not look like a config file: 'root:"),
])
def test_bad_includes_are_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert train_cli.main(["--config", str(path)]) == 2
    [line] = _error_lines(capsys)
    assert line.startswith("error: ") and message in line and len(line) < 400


def test_a_nested_stage_time_shift_is_one_line(tiny_data, tmp_path, capsys):
    assert train_cli.main(tiny_argv(tiny_data, str(tmp_path), stage_time_shift="[[1],[2]]")) == 2
    assert _error_lines(capsys) == ["error: stage_time_shift needs 2 finite numbers (one per stage), got [[1], [2]]"]


# ------------------------------------------------------------------ 15. edited checkpoints
def _edited(tiny_data, tmp_path, name, edit, **keys):
    train(tiny_config(tiny_data, str(tmp_path), exp_name="base", max_train_steps=2, checkpointing_steps=2))
    ckpt = load_ckpt(checkpoint_path(str(tmp_path / "base"), 2))
    edit(ckpt)
    os.makedirs(tmp_path / name / "checkpoints")
    torch.save(ckpt, checkpoint_path(str(tmp_path / name), 2))
    return tiny_argv(tiny_data, str(tmp_path), exp_name=name, max_train_steps=4, checkpointing_steps=2, **keys)


@pytest.mark.parametrize("name,edit,line", [
    ("opt", lambda c: c["opt"]["state"].__setitem__(0, {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3)}),
     "its optimizer state does not fit this model (parameter 0 has no exp_avg_sq); the file is damaged or was edited"),
    ("opt_groups", lambda c: c["opt"].__setitem__("param_groups", []),
     "its optimizer state does not fit this model (loaded state dict has a different number of parameter groups)"),
    ("scales", lambda c: c["arch"].__setitem__("stage_scales", ["a", 1]),  # resume=auto would skip it (resume_check)
     "cannot be resumed from: its arch cannot be built: model option 'stage_scales' must be a finite number, got 'a'"),
])
def test_edited_checkpoint_fields_are_one_line(tiny_data, tmp_path, capsys, name, edit, line):
    explicit = {"stage_scales": "auto", "resume": checkpoint_path(str(tmp_path / name), 2)} if name == "scales" else {}
    argv = _edited(tiny_data, tmp_path, name, edit, **explicit)
    capsys.readouterr()
    assert train_cli.main(argv) == 2
    [error] = _error_lines(capsys)
    assert error.startswith("error: resume: ") and line in error


@pytest.mark.parametrize("name,edit,warning", [
    ("rng", lambda c: c["rng"][0].__setitem__("numpy", [1, 2]), "the checkpoint's random states do not read back"),
    ("rng_str", lambda c: c.__setitem__("rng", "garbage"), "the checkpoint's random states are unreadable (str)"),
    ("position", lambda c: c.__setitem__("data_position", "bogus"), "the checkpoint's data_position is unreadable"),
])
def test_edited_random_states_and_data_position_only_warn_and_stay_exact(tiny_data, tmp_path, name, edit, warning):
    argv = _edited(tiny_data, tmp_path, name, edit)
    assert train_cli.main(argv) == 0
    assert warning in (tmp_path / name / "log.txt").read_text()
    straight = train(tiny_config(tiny_data, str(tmp_path), exp_name="straight", max_train_steps=4,
                                 checkpointing_steps=2))
    a, b = load_ckpt(straight.last_checkpoint), load_ckpt(checkpoint_path(str(tmp_path / name), 4))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # every draw re-seeds per step


# ------------------------------------------------------------------ 16. Ctrl-C
def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_a_second_one_at_once(tiny_data, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    argv = tiny_argv(tiny_data, str(tmp_path), exp_name="int", max_train_steps=100000, checkpointing_steps=100000,
                     log_every=1)
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = tmp_path / "int" / "log.txt"
    deadline = time.time() + 120
    while (not log.exists() or "step 3/" not in log.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "preempted: SIGINT received, stopped after step" in log.read_text()
    assert list_checkpoints(str(tmp_path / "int"))  # the step it stopped at
    # a second Ctrl-C while the first one's checkpoint is written: one line, no traceback, no .tmp left
    from training.preemption import Preemption

    with Preemption() as p:
        os.kill(os.getpid(), signal.SIGINT)
        assert p.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)


# ------------------------------------------------------------------ 17. --help in a pipe; rank 0's failure
def test_help_into_a_closed_pipe_is_quiet():
    for script in ("train.py", "generate.py"):
        done = subprocess.run(f"{sys.executable} {script} --help | head -1", shell=True, cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "Error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert done.stdout.strip()


def test_a_failure_only_rank_0_sees_stops_every_rank(tiny_data, tmp_path, small_tmpfs):
    out = small_tmpfs(200 * 1024)  # room for the log and config, not for a checkpoint
    argv = tiny_argv(tiny_data, str(out), exp_name="full", max_train_steps=2, checkpointing_steps=2)
    done = run_torchrun(argv, nproc=2, timeout=300)  # the gloo barrier would wait 30 min
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors and errors[0] == (f"error: cannot write checkpoint {out}/full/checkpoints/0000002.pt: the write "
                                    "failed part-way (disk full or quota exceeded?); no earlier checkpoint exists")


# ------------------------------------------------------------------ 18. extreme stage scales
@pytest.mark.parametrize("value", ["[1, 1e-320]", "[1, 1e39]"])
def test_scales_float32_cannot_hold_are_refused(tiny_data, tmp_path, capsys, value):
    assert train_cli.main(tiny_argv(tiny_data, str(tmp_path), stage_scales=value)) == 2
    [line] = _error_lines(capsys)
    assert "the levels are scaled in float32, which holds positive numbers from 1.18e-38 to 3.4e+38 only" in line


def test_the_nonfinite_loss_line_names_huge_scales_first():
    from types import SimpleNamespace

    from training.loop import nonfinite_suspects

    line = nonfinite_suspects(SimpleNamespace(stage_scales=[1.0, 1e30], mixed_precision="no"))
    assert line.startswith("Check the stage_scales [1.0, 1e+30] (they multiply a level's energy by up to 1e+60")
    assert nonfinite_suspects(SimpleNamespace(stage_scales=None, mixed_precision="bf16")).startswith(
        "Check the learning rate (lower lr)")


# ------------------------------------------------------------------ 19. ELIT budgets between levels
def test_a_budget_between_levels_is_logged_as_the_level_used(tmp_path, capsys):
    from conftest import tiny_model
    from generation.config import load_generate_config
    from generation.runner import run

    model = tiny_model("ELIT-SiT-S/2", in_channels=3, num_classes=4, depth=4, encoder_depth=1, elit_tail_depth=1,
                       group_size=2, elit_max_mask_prob=0.75)
    ckpt = tmp_path / "elit.pt"
    torch.save({"ema": model.state_dict(), "arch": model.arch, "config": {"vae": "none"}}, ckpt)
    run(load_generate_config([f"--ckpt={ckpt}", "num_samples=2", "num_steps_per_scale=[2]", "inference_budget=0.3",
                              "unconditional_inference_budget=0.25", f"sample_dir={tmp_path}", "save_png=false"]))
    captured = capsys.readouterr()
    assert "budget 0.3 (the level used: 0.25 = 1 of 4 latents per window)" in captured.out
    assert ("warning: unconditional_inference_budget=0.25 has no effect with cfg_scale=1: the guiding pass runs "
            "only with guidance (cfg_scale > 1)") in captured.err


# ------------------------------------------------------------------ 20. small things
def test_a_checkpoint_folder_and_a_finished_run_say_what_they_are(tiny_data, tmp_path, capsys):
    import generate

    result = train(tiny_config(tiny_data, str(tmp_path), exp_name="r", max_train_steps=2, checkpointing_steps=2))
    capsys.readouterr()
    assert generate.main(["--ckpt", result.exp_dir, f"sample_dir={tmp_path / 's'}"]) == 2
    [line] = _error_lines(capsys)
    assert line == (f"generate.py: error: checkpoint {result.exp_dir} is a folder, not a checkpoint file (it holds "
                    "checkpoints/0000002.pt); pass the file, e.g. exps/RUN/checkpoints/0400000.pt")
    train(tiny_config(tiny_data, str(tmp_path), exp_name="r", max_train_steps=1))
    assert ("WARNING: the checkpoint is at step 2, max_train_steps=1: nothing was trained (raise max_train_steps "
            "to continue the run)") in open(os.path.join(result.exp_dir, "log.txt")).read()


def test_resume_compares_registry_specs_in_their_canonical_form(tmp_path):
    """A spec spelled another way is the same setting (no spurious `decomposition: null -> laplacian`),
    and a key that changes is still named."""
    from training.config import TrainConfig
    from training.run_folder import config_changes
    from utils.config import config_to_dict
    from omegaconf import OmegaConf

    defaults = config_to_dict(OmegaConf.structured(TrainConfig))
    old = {**defaults, "decomposition": None, "time_distribution": "lognormal", "prediction": "v"}
    same = {**defaults, "decomposition": "laplacian", "time_distribution": {"name": "lognormal"},
            "prediction": "velocity"}
    assert config_changes(old, same, defaults) == []
    changed = {**same, "time_distribution": "uniform", "preview": {**defaults["preview"], "method": "heun"}}
    assert config_changes(old, changed, defaults) == ["preview.method: euler -> heun",
                                                      "time_distribution: lognormal -> uniform"]
