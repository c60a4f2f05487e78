"""Writes kernels.json beside the frozen fixtures: the arithmetic aten calls that make them and that the
frozen tests make, and their fingerprint on this machine (tests/frozen_kernels.py).

    python tests/data/frozen/make_kernels.py        # from the repository root, with its git history

It refuses to write unless this machine computes like the one that made the fixtures: main @402bfaf
(the code that wrote them, taken with `git archive`) runs make_frozen.py here, under the recorder, and
must reproduce meta.json and every .npy bit for bit. The calls kept are those of that run (what made
the fixtures: training from scratch, sampling) and those of the frozen tests with today's code
(sampling the .pt and .safetensors, resuming), once each.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
MADE_WITH = "402bfaf"
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

import frozen_kernels  # noqa: E402

# Run under the old code (PYTHONPATH = its tree): record make_frozen.main, then write the calls.
_OLD_RUN = """
import json, sys, importlib.util
sys.path.insert(0, {tests!r})
import frozen_kernels
spec = importlib.util.spec_from_file_location("make_frozen", {make!r})
make_frozen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_frozen)
calls = frozen_kernels.record(lambda: make_frozen.main({out!r}))
json.dump(calls, open({calls!r}, "w"))
"""


def calls_of_the_fixture_run(work: str) -> list:
    """The calls of make_frozen.py under main @402bfaf; SystemExit unless its outputs equal the fixtures."""
    tree, out, calls = os.path.join(work, "base"), os.path.join(work, "out"), os.path.join(work, "calls.json")
    os.makedirs(tree)
    archive = subprocess.run(["git", "archive", MADE_WITH], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    code = _OLD_RUN.format(tests=os.path.join(REPO, "tests"), make=os.path.join(HERE, "make_frozen.py"), out=out,
                           calls=calls)
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, check=True, capture_output=True)
    made, stored = (json.load(open(os.path.join(d, "meta.json"))) for d in (out, HERE))
    same = {k: v for k, v in made.items() if k != "made_with"} == {k: v for k, v in stored.items() if k != "made_with"}
    same = same and all(np.array_equal(np.load(os.path.join(out, name)), np.load(os.path.join(HERE, name)))
                        for name in os.listdir(HERE) if name.endswith(".npy"))
    if not same:
        raise SystemExit("main @402bfaf does not reproduce the frozen fixtures bit for bit on this machine: its "
                         "kernels differ from those that made them, so no fingerprint is written here")
    return json.load(open(calls))


def calls_of_the_tests(work: str) -> list:
    """The calls today's frozen tests make: every sample setting from both files, and the resumes."""
    import importlib.util

    from generation.config import load_generate_config
    from generation.runner import run as generate
    from training.config import parse_config
    from training.demo_data import write_demo_dataset
    from training.loop import train

    spec = importlib.util.spec_from_file_location("make_frozen", os.path.join(HERE, "make_frozen.py"))
    make_frozen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_frozen)
    meta = json.load(open(os.path.join(HERE, "meta.json")))
    data = write_demo_dataset(os.path.join(work, "data"), resolution=16, num_classes=2, images_per_class=10, seed=0)

    def everything():
        for run in sorted(meta["runs"]):
            for name, keys in meta["runs"][run]["samples"].items():
                source = name.rsplit("-", 1)[1]
                generate(load_generate_config([f"--ckpt={HERE}/{run}.{source}", "num_samples=4", "labels=balanced",
                                               "save_png=false", f"sample_dir={work}/samples", f"run_name={run}-{name}",
                                               "cpu_threads=1", *keys]))
            folder = os.path.join(work, "runs", run, "checkpoints")
            os.makedirs(folder)
            shutil.copy(os.path.join(HERE, f"{run}.pt"), os.path.join(folder, "0000002.pt"))
            train(parse_config(make_frozen.RUNS[run] + make_frozen.COMMON + [
                f"data_dir={data}", f"output_dir={work}/runs", f"exp_name={run}"]))

    return frozen_kernels.record(everything)


def main() -> None:
    work = tempfile.mkdtemp()
    try:
        calls = calls_of_the_fixture_run(work)
        seen = {json.dumps(c, sort_keys=True) for c in calls}
        calls += [c for c in calls_of_the_tests(work) if json.dumps(c, sort_keys=True) not in seen]
    finally:
        shutil.rmtree(work)
    record = {"made_with": f"make_kernels.py; calls of main @{MADE_WITH}'s make_frozen.py and of today's frozen tests",
              "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "sha256": frozen_kernels.replay(calls), "calls": calls}
    with open(os.path.join(HERE, "kernels.json"), "w") as f:
        json.dump(record, f, separators=(",", ":"))
    print(f"wrote {HERE}/kernels.json: {len(calls)} calls, fingerprint {record['sha256']}")


if __name__ == "__main__":
    main()
