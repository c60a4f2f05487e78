"""Training imports the metric registry (its config check names metrics); the heavy libraries the
metrics use come only when a metric runs (docs/PERFORMANCE.md, "train.py main process")."""
import subprocess
import sys

HEAVY = ("scipy", "torch_fidelity", "torchvision", "wandb", "diffusers", "timm")


def test_training_and_its_config_check_import_no_metric_libraries():
    code = (
        "import sys\n"
        "import train, training.loop, training.config, evaluation.scores, evaluation.features\n"
        "from evaluation.scores import METRICS\n"
        "assert 'swd' in METRICS.names() and 'fid' in METRICS.names()\n"
        f"print(','.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ""

