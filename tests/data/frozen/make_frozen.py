"""Makes the frozen checkpoints of tests/test_frozen_checkpoints.py (run once, with the code of main @402bfaf).

    git worktree add /tmp/base 402bfaf
    cd /tmp/base && PYTHONPATH=. python /path/to/tests/data/frozen/make_frozen.py OUT_DIR

For every run of RUNS: train a tiny 16 px pixel-space model on the tests' 2-class demo data for 4 steps
(checkpoints at steps 2 and 4, exported .safetensors), keep the step-2 checkpoint and exported weights,
record the losses of steps 1-4 and float64 sums of the step-4 weights, and sample 4 images from the
step-2 checkpoint with each sampler setting of SAMPLES through generate.py's code path. Everything the
test compares lands in OUT_DIR/meta.json and OUT_DIR/<run>-<sample>.npy.
"""
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

COMMON = ["vae=none", "resolution=16", "num_classes=2", "batch_size=8", "num_workers=0", "mixed_precision=no",
          "lr=1e-3", "ema_decay=0.9", "max_train_steps=4", "checkpointing_steps=2", "log_every=1",
          "sampling_steps=0", "report_to=none", "resume=auto", "preview.num_samples=0", "seed=3", "cpu_threads=1",
          "save_format=safetensors"]
RUNS = {
    "dfm": ["model=DFM-SiT-S/4", "model_overrides={depth: 2, hidden_size: 16, num_heads: 2}"],
    "calibrated": ["model=DFM-SiT-S/4", "model_overrides={depth: 2, hidden_size: 16, num_heads: 2}",
                   "stage_scales=[1.0, 4.0]", "stage_time_shift=[0.3, 0.0]", "stage_weights=[0.6, 0.4]",
                   "stage_sampling=per_sample"],
    "sit": ["model=SiT-S/4", "model_overrides={depth: 2, hidden_size: 16, num_heads: 2}", "weighting=uniform"],
    "elit": ["model=DFM-ELIT-SiT-S/4", "model_overrides={depth: 3, hidden_size: 16, num_heads: 2, elit_tail_depth: 1}",
             "encoder_depth=1", "group_size=2", "elit_max_mask_prob=0.75"],
}
SAMPLES = {  # generate.py keys per sample setting; the ELIT run adds a budget
    "euler": ["method=euler", "num_steps_per_scale=[3,2]"],
    "heun": ["method=heun", "num_steps_per_scale=[3,2]", "cfg_scale=2.0"],
    "sde": ["method=sde", "num_steps_per_scale=[3,3]"],
}


def main(out: str) -> None:
    from generation.config import load_generate_config
    from generation.runner import run
    from training.config import parse_config
    from training.demo_data import write_demo_dataset
    from training.loop import train

    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp()
    data = write_demo_dataset(os.path.join(work, "data"), resolution=16, num_classes=2, images_per_class=10, seed=0)
    meta = {"made_with": "main @402bfaf", "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "runs": {}}
    for name, argv in RUNS.items():
        cfg = parse_config(argv + COMMON + [f"data_dir={data}", f"output_dir={work}/runs", f"exp_name={name}"])
        result = train(cfg)
        exp = result.exp_dir
        losses = {}
        with open(os.path.join(exp, "metrics.jsonl")) as f:
            for line in f:
                rec = json.loads(line)
                if "loss" in rec:
                    losses[str(rec["step"])] = rec["loss"]
        final = torch.load(os.path.join(exp, "checkpoints", "0000004.pt"), map_location="cpu", weights_only=True)
        sums = {part: {k: float(v.double().sum()) for k, v in final[part].items()} for part in ("model", "ema")}
        shutil.copy(os.path.join(exp, "checkpoints", "0000002.pt"), os.path.join(out, f"{name}.pt"))
        shutil.copy(os.path.join(exp, "weights", "0000002.safetensors"), os.path.join(out, f"{name}.safetensors"))
        meta["runs"][name] = {"argv": argv, "losses": losses, "step4_sums": sums, "samples": {}}
        for kind, keys in SAMPLES.items():
            for source in ("pt", "safetensors"):
                extra = ["inference_budget=0.5"] if name == "elit" else []
                if name == "elit" and kind == "heun":
                    extra.append("unconditional_inference_budget=0.25")
                gen_argv = [f"--ckpt={out}/{name}.{source}", "num_samples=4", "labels=balanced", "save_png=false",
                            f"sample_dir={work}/samples", f"run_name={name}-{kind}-{source}", "cpu_threads=1"]
                if name == "sit":  # one stage: the steps of both chunks in one
                    keys = [k.replace("[3,2]", "[5]").replace("[3,3]", "[6]") for k in keys]
                gen_argv += keys + extra
                run(load_generate_config(gen_argv))
                images = np.load(f"{work}/samples/{name}-{kind}-{source}.npz")["arr_0"]
                np.save(os.path.join(out, f"{name}-{kind}-{source}.npy"), images)
                meta["runs"][name]["samples"][f"{kind}-{source}"] = keys + extra
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main(sys.argv[1])
