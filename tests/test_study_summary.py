"""experiments/study/summarize.py: mean ± std over seeds and the steps to reach the other model's best."""
import importlib.util
import json
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("summarize", os.path.join(REPO, "experiments", "study", "summarize.py"))
summarize = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summarize)


def _run(folder, values, every=100):
    os.makedirs(folder)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for i, v in enumerate(values, 1):
            f.write(json.dumps({"step": i * every, "images_seen": i * every * 32, "loss": 1.0}) + "\n")
            f.write(json.dumps({"step": i * every, "images_seen": i * every * 32, "swd": v}) + "\n")
    return str(folder)


def test_mean_std_table_and_crossings(tmp_path):
    sit = [_run(tmp_path / f"sit_s{s}", v) for s, v in enumerate([[90, 60, 40], [100, 70, 50], [110, 80, 60]])]
    dfm = [_run(tmp_path / f"dfm_s{s}", v) for s, v in enumerate([[70, 45, 30], [80, 55, 35]])]
    floor = {"num_images": 8, "repeats": 3, "mean": 10.0, "std": 1.0}
    text = summarize.summarize({"SiT": sit, "DFM": dfm}, "swd", floor, str(tmp_path))
    assert f"| 200 | 70.0 ± {np.std([60, 70, 80], ddof=1):.1f} | 50.0 ± {np.std([45, 55], ddof=1):.1f} |" in text
    assert "floor" in text and "10.0 ± 1.0" in text
    # SiT's final mean is 50 at step 300: dfm_s0 gets there at 200 (45; interpolated 100 + 20/25 * 100
    # = 180), dfm_s1 at 300 (35; interpolated 200 + 5/20 * 100 = 225)
    assert "Steps to reach SiT's final mean value 50.0 (step 300)" in text
    assert "| DFM | dfm_s0 | 200 | 180 | 0.60 |" in text and "| DFM | dfm_s1 | 300 | 225 | 0.75 |" in text
    assert f"| DFM | mean of 2 | | | **{np.mean([180 / 300, 225 / 300]):.2f}** |" in text
    # DFM's best mean is 32.5: no SiT seed reaches it
    assert "| DFM | 32.5 (300) | not reached, not reached, not reached |" in text
    with open(tmp_path / "study_swd.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_ema_sweep_table_groups_seeds_and_orders_the_fixed_decay_first():
    spec = importlib.util.spec_from_file_location("ema_sweep", os.path.join(REPO, "experiments", "study",
                                                                            "ema_sweep.py"))
    ema_sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ema_sweep)
    records = [{"run": "sit_s0", "std": 0.1, "swd": 58.0}, {"run": "sit_s1", "std": 0.1, "swd": 61.0},
               {"run": "sit_s0", "std": None, "ema_decay": 0.995, "swd": 56.0},
               {"run": "dfm_s12", "std": 0.05, "swd": 50.0}, {"run": "sit_s0", "std": 0.05, "swd": 55.0}]
    lines = ema_sweep.table(records).splitlines()
    assert lines[0] == "| EMA (swd x 1e3, mean ± std, n) | sit | dfm |"
    assert lines[2] == "| fixed decay 0.995 | 56.0 ± 0.0 (1) |  |"
    assert lines[3] == "| 0.05 | 55.0 ± 0.0 (1) | 50.0 ± 0.0 (1) |"
    assert lines[4] == f"| 0.1 | 59.5 ± {np.std([58.0, 61.0], ddof=1):.1f} (2) |  |"
