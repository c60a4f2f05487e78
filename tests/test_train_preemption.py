"""Preemption: SIGTERM / SIGUSR1 stop training after the current step with one checkpoint and one
line, exit code 75, and the resumed run ends bit for bit where an uninterrupted one ends; the
ranks of a multi-process run agree on the step even when only one of them got the signal."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from training.loop import train
from training.preemption import PREEMPTED_EXIT_CODE, Preemption

from preemption_worker import agreement_worker
from train_helpers import assert_same_weights, load_ckpt, tiny_argv, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stop_line(exp_dir, name, step):
    ckpt = os.path.join(exp_dir, "checkpoints", f"{step:07d}.pt")
    return (f"preempted: {name} received, stopped after step {step} with checkpoint {ckpt}; continue with "
            f"resume=auto (exit code {PREEMPTED_EXIT_CODE})")


def _assert_resume_matches_straight(data, out, exp_name, stopped_at):
    """Resume `exp_name` to stopped_at + 2 steps; compare with a straight run of as many steps."""
    steps = stopped_at + 2
    resumed = train(tiny_config(data, out, exp_name=exp_name, max_train_steps=steps, checkpointing_steps=1000))
    straight = train(tiny_config(data, out, exp_name=f"{exp_name}-straight", max_train_steps=steps,
                                 checkpointing_steps=1000))
    a, b = load_ckpt(resumed.last_checkpoint), load_ckpt(straight.last_checkpoint)
    assert a["steps"] == b["steps"] == steps
    assert_same_weights(a, b, parts=("model", "ema"))
    for x, y in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_sigterm_to_a_real_train_py_checkpoints_exits_75_and_resumes_bit_exactly(tiny_data, tmp_path):
    out = str(tmp_path)
    argv = tiny_argv(tiny_data, out, exp_name="term", max_train_steps=100000, checkpointing_steps=1000)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # training is under way: step 3 is logged
            if " step 3/100000 " in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    exp_dir = os.path.join(out, "term")
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
    assert "Traceback" not in err
    [ckpt] = [n for n in os.listdir(os.path.join(exp_dir, "checkpoints")) if n.endswith(".pt")]
    stopped_at = int(ckpt[:-3])
    assert stopped_at >= 3 and load_ckpt(os.path.join(exp_dir, "checkpoints", ckpt))["steps"] == stopped_at
    expected = _stop_line(exp_dir, "SIGTERM", stopped_at)
    assert rest.strip().splitlines()[-1].endswith(expected)  # the last line printed
    with open(os.path.join(exp_dir, "log.txt")) as f:
        assert f.read().strip().splitlines()[-1].endswith(expected)  # and logged
    _assert_resume_matches_straight(tiny_data, out, "term", stopped_at)


def test_sigusr1_in_process_and_a_second_signal_while_saving(tiny_data, tmp_path, monkeypatch):
    """SIGUSR1 during step 3 stops the run after step 3; a SIGTERM that arrives while that
    checkpoint is being written changes nothing; after the stop the handlers stay, after a run
    without a signal the previous ones are back."""
    import training.loop as loop
    import training.run_folder as run_folder

    real_add_step, real_save = loop.MetricWindow.add_step, run_folder.atomic_torch_save
    steps_done = []

    def add_step(self, grad_norm, skip=None):
        real_add_step(self, grad_norm, skip)
        steps_done.append(1)
        if len(steps_done) == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    def save_with_a_second_signal(obj, path):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # let the handler run mid-write
        real_save(obj, path)

    monkeypatch.setattr(loop.MetricWindow, "add_step", add_step)
    monkeypatch.setattr(run_folder, "atomic_torch_save", save_with_a_second_signal)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    out = str(tmp_path)
    try:
        result = train(tiny_config(tiny_data, out, exp_name="usr1", max_train_steps=50, checkpointing_steps=1000))
        # stopped: the handlers stay (a launcher's next SIGTERM must not kill the exiting process)
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert result.preempted == "SIGUSR1" and result.steps == 3
    assert result.last_checkpoint.endswith("0000003.pt")
    from training.checkpoint import load_checkpoint  # checks the sidecar: the file is complete

    assert load_checkpoint(result.last_checkpoint)["steps"] == 3
    with open(os.path.join(result.exp_dir, "log.txt")) as f:
        assert f.read().strip().splitlines()[-1].endswith(_stop_line(result.exp_dir, "SIGUSR1", 3))
    monkeypatch.undo()
    _assert_resume_matches_straight(tiny_data, out, "usr1", 3)  # (runs without a signal restore the handlers)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_ranks_agree_on_the_stop_step_when_only_one_got_the_signal(tmp_path, signal_rank=1):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=agreement_worker, args=(r, str(tmp_path / "init"), signal_rank, 5, results))
             for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    # the signal came after the poll of step 5; the poll of step 6 shares it, the poll of step 7 acts on it
    assert got == [(0, 7, "SIGTERM"), (1, 7, "SIGTERM")]


def test_one_process_stops_at_the_next_poll_without_any_collective():
    before = signal.getsignal(signal.SIGTERM)
    with Preemption() as preemption:  # no signal: the handlers are restored at the end
        preemption.connect(1)
        assert not preemption.requested()
    assert signal.getsignal(signal.SIGTERM) is before
    try:
        with Preemption() as preemption:
            preemption.connect(1)
            os.kill(os.getpid(), signal.SIGTERM)
            assert preemption.requested() and preemption.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # after a stop, later signals are absorbed until exit
    finally:
        signal.signal(signal.SIGTERM, before)


def _worker_of_rank(agent_pid, rank):
    """The pid of the torchrun worker with RANK=rank (a child of the agent)."""
    with open(f"/proc/{agent_pid}/task/{agent_pid}/children") as f:
        children = [int(p) for p in f.read().split()]
    for pid in children:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return pid
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.mark.slow
def test_two_gloo_processes_stop_together_when_only_rank_1_gets_sigterm(tiny_data, tmp_path):
    """torchrun, 2 CPU processes: SIGTERM to the rank-1 worker only; both finish the same step, rank
    0 writes one checkpoint holding both processes' random states and logs the line, both exit 75."""
    out = str(tmp_path)
    argv = tiny_argv(tiny_data, out, exp_name="two", max_train_steps=100000, checkpointing_steps=1000,
                     gradient_accumulation_steps=1)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=REPO)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *argv]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if " step 3/100000 " in line:
                break
        os.kill(_worker_of_rank(proc.pid, 1), signal.SIGTERM)
        output, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    exp_dir = os.path.join(out, "two")
    assert "2 process(es) on cpu" in open(os.path.join(exp_dir, "log.txt")).read()
    [ckpt] = [n for n in os.listdir(os.path.join(exp_dir, "checkpoints")) if n.endswith(".pt")]
    stopped_at = int(ckpt[:-3])
    state = load_ckpt(os.path.join(exp_dir, "checkpoints", ckpt))
    assert state["steps"] == stopped_at >= 3 and len(state["rng"]) == 2
    with open(os.path.join(exp_dir, "log.txt")) as f:
        assert f.read().strip().splitlines()[-1].endswith(_stop_line(exp_dir, "SIGTERM", stopped_at))
    # torchrun's report: the first worker to exit is the root cause, with 75; torchrun then sends SIGTERM to
    # the other, which exits with 75 too, or shows -15 if it was already in Python's shutdown (handlers gone)
    codes = re.findall(r"exitcode  : (-?\d+) ", output)
    root_cause = output.split("Root Cause")[1]
    assert f"exitcode  : {PREEMPTED_EXIT_CODE} " in root_cause and len(codes) == 2, output[-3000:]
    assert set(codes) <= {str(PREEMPTED_EXIT_CODE), "-15"}, codes
