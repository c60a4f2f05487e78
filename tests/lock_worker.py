"""The run-lock stress test's worker (tests/test_trust_files.py): a process that takes and gives back
the lock of one run folder as often as it can, and checks mutual exclusion by a mechanism of its own.

While it holds the lock, a worker creates `<exp_dir>.holder` with O_CREAT | O_EXCL (the kernel refuses
a second one) and removes it before giving the lock back: a refusal means that two processes held the
lock at once. `remove_then_close` gives the lock back the way the run folder did before it compared
inodes (remove the file, then close), to show that the test finds that race.

    python tests/lock_worker.py EXP_DIR SECONDS WORKERS [--remove-then-close]

runs WORKERS such processes (forked) for SECONDS and prints their counts as one JSON line.
"""
import errno
import json
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hammer(exp_dir: str, seconds: float, start, out: str, remove_then_close: bool = False) -> None:
    """Take and release the lock of `exp_dir` for `seconds` after the `start` event; write
    {"acquired": n, "overlaps": n} to the file `out`."""
    from training import run_folder
    from training.run_folder import LOCK_NAME, RunLocked, acquire_lock

    marker = exp_dir + ".holder"
    acquired = overlaps = 0
    start.wait()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            f, _ = acquire_lock(exp_dir)
        except RunLocked:
            continue
        acquired += 1
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os.remove(marker)
        except FileExistsError:
            overlaps += 1
        if remove_then_close:
            try:
                os.remove(os.path.join(exp_dir, LOCK_NAME))
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
            f.close()
        else:
            run_folder.release_lock(f, exp_dir)
    with open(out, "w") as f:
        json.dump({"acquired": acquired, "overlaps": overlaps}, f)


def stress(exp_dir: str, seconds: float, workers: int, remove_then_close: bool = False) -> dict:
    """`workers` forked processes hammering the lock of `exp_dir` at once: their summed counts."""
    import training.run_folder  # noqa: F401 - imported once here, not in every child

    context = multiprocessing.get_context("fork")
    start = context.Event()
    outs = [f"{exp_dir}.counts.{i}" for i in range(workers)]
    procs = [context.Process(target=hammer, args=(exp_dir, seconds, start, out, remove_then_close)) for out in outs]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(seconds + 60)
    counts = [json.load(open(out)) for out in outs]
    return {key: sum(c[key] for c in counts) for key in ("acquired", "overlaps")}


if __name__ == "__main__":
    folder = sys.argv[1]
    os.makedirs(folder, exist_ok=True)
    print(json.dumps(stress(folder, float(sys.argv[2]), int(sys.argv[3]), "--remove-then-close" in sys.argv[4:])))
