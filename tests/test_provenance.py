"""Results that carry their provenance: generate.py's record beside the .npz (complete, or incomplete
after a kill), evaluate copying it with the inputs' hashes and refusing comparisons that cannot be
right, and the report table. Every field is checked against an independent computation (hashlib of
the files, the checkpoint as torch.load reads it, the settings passed, git run here)."""
import csv
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import generation.runner as runner_module
from evaluation import evaluate as evaluate_module
from evaluation import features as features_module
from evaluation import report as report_module
from evaluation.stats_file import ReferenceStatistics, save_statistics
from generation.config import GenerateConfig
from generation.runner import run
from utils.checksum import write_sidecar
from utils.config import load_config

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_INFO = {"kind": "posthoc_ema", "std": 0.08, "sources": ["0000050.pt", "0000100.pt"]}


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tiny(seed):
    from models import create_model

    model = create_model("DFM-SiT-S/2", depth=2, hidden_size=64, num_heads=4, input_size=8, in_channels=3,
                         num_classes=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _generate(ckpt, out, **kw):
    opts = dict(num_samples=8, per_proc_batch_size=8, num_steps_per_scale="[3,2]", labels="balanced",
                sample_dir=str(out))
    opts.update(kw)
    return run(load_config(GenerateConfig, ["--ckpt", str(ckpt)] + [f"{k}={v}" for k, v in opts.items()]))


def _now():
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def _git_version():
    """The commit of ROOT and whether `git status --porcelain` lists anything, asked of git here."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True,
                            check=True)
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run a: EMA weights of a .pt without a sidecar (weights_info, steps 100), Euler [3, 2], no CFG.
    Run b: raw weights of a copy with a .sha256 sidecar, Heun [2, 2], CFG 2 on t <= 0.7, seed 1."""
    folder = tmp_path_factory.mktemp("provenance")
    model, ema = _tiny(1), _tiny(0)
    ckpt = folder / "0000100.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "arch": model.arch, "steps": 100,
                "weights_info": WEIGHTS_INFO, "config": {"vae": "none", "path_type": "linear"}}, ckpt)
    ckpt_b = folder / "with_sidecar.pt"
    shutil.copyfile(ckpt, ckpt_b)
    write_sidecar(str(ckpt_b), _sha256(ckpt_b))
    out = folder / "samples"
    before = _now()
    _generate(ckpt, out, run_name="a")
    _generate(ckpt_b, out, run_name="b", method="heun", num_steps_per_scale="[2,2]", cfg_scale=2.0,
              guidance_high=0.7, use_ema="false", seed=1, labels="random")
    after = _now()
    rng = np.random.default_rng(0)
    np.savez(folder / "ref.npz", arr_0=rng.integers(0, 256, (10, 8, 8, 3), np.uint8))
    (folder / "inception.pth").write_bytes(b"stand-in Inception weights")
    (folder / "dinov2.pth").write_bytes(b"stand-in DINOv2 weights")
    return dict(folder=folder, out=out, ckpt=ckpt, ckpt_b=ckpt_b, before=before, after=after)


def _record(npz):
    with open(Path(npz).with_name(Path(npz).stem + ".provenance.json")) as f:
        return json.load(f)


def test_record_is_complete_and_correct(runs):
    out, ckpt = runs["out"], runs["ckpt"]
    record = _record(out / "a.npz")
    with np.load(out / "a.npz") as f:
        num_images = f["arr_0"].shape[0]
    stored = torch.load(ckpt, weights_only=True)
    started = datetime.datetime.fromisoformat(record["started"])
    finished = datetime.datetime.fromisoformat(record["finished"])
    assert runs["before"] <= started <= finished <= runs["after"]
    config = OmegaConf.to_container(OmegaConf.load(out / "a" / "config.yaml"))
    assert record == {
        "format": "dfm-sample-provenance", "version": 1, "complete": True,
        "started": record["started"], "finished": record["finished"],
        "npz": "a.npz", "npz_sha256": _sha256(out / "a.npz"), "num_images": num_images,
        "checkpoint": {"path": str(ckpt), "bytes": os.path.getsize(ckpt), "sha256": _sha256(ckpt),
                       "sha256_from": "file", "step": 100, "use_ema": True, "weights": "ema",
                       # the arch the model was built from: path_type came from the run config (an older checkpoint)
                       "weights_info": WEIGHTS_INFO, "arch": {**stored["arch"], "path_type": "linear"}},
        "sampler": {"method": "euler", "method_text": "euler", "num_steps_per_scale": [3, 2], "thresholds": [0.1],
                    "nfe": 5, "nfe_with_cfg": 5, "cfg_scale": 1.0, "guidance_low": 0.0, "guidance_high": 1.0,
                    "inference_budget": None, "unconditional_inference_budget": None, "autoguidance": False,
                    "path_type": "linear", "precision": "tf32", "vae": "none", "resolution": 8,
                    "prediction": "velocity"},
        "seed": 0, "labels": "balanced", "num_classes": 4, "num_samples": 8, "num_processes": 1,
        "code_version": _git_version(), "torch_version": torch.__version__,
        "python_version": platform.python_version(), "config": config,
    }
    assert num_images == 8 and config["ckpt"] == str(ckpt)


def test_raw_weights_sidecar_and_guidance_are_recorded(runs):
    out, ckpt_b = runs["out"], runs["ckpt_b"]
    record = _record(out / "b.npz")
    assert record["complete"] and record["npz_sha256"] == _sha256(out / "b.npz")
    assert record["checkpoint"] == {
        "path": str(ckpt_b), "bytes": os.path.getsize(ckpt_b), "sha256": _sha256(ckpt_b), "sha256_from": "sidecar",
        "step": 100, "use_ema": False, "weights": "model", "weights_info": WEIGHTS_INFO,
        "arch": {**torch.load(ckpt_b, weights_only=True)["arch"], "path_type": "linear"}}
    sampler = record["sampler"]
    # Heun: 2N - 1 evaluations over N = 4 steps; CFG doubles them
    assert (sampler["method"], sampler["num_steps_per_scale"], sampler["nfe"], sampler["nfe_with_cfg"]) == (
        "heun", [2, 2], 7, 14)
    assert (sampler["cfg_scale"], sampler["guidance_low"], sampler["guidance_high"]) == (2.0, 0.0, 0.7)
    assert (record["seed"], record["labels"], record["num_samples"]) == (1, "random", 8)


class Killed(BaseException):
    """A kill between two steps of the run (SIGKILL cannot be caught; this stops the run at that point)."""


def test_killed_run_leaves_an_incomplete_record_and_a_rerun_completes_it(runs, monkeypatch, capsys):
    out, ckpt = runs["out"], runs["ckpt"]
    npz, record_file = out / "k.npz", out / "k.provenance.json"
    write_npz = runner_module.write_npz_from_pngs

    def killed_before_npz(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(runner_module, "write_npz_from_pngs", killed_before_npz)
    with pytest.raises(Killed):
        _generate(ckpt, out, run_name="k", num_samples=4)
    record = json.loads(record_file.read_text())
    assert not npz.exists() and len(list((out / "k").glob("*.png"))) == 4
    assert (record["complete"], record["finished"], record["npz_sha256"], record["num_images"]) == (
        False, None, None, None)
    assert record["checkpoint"]["sha256"] == _sha256(ckpt) and record["num_samples"] == 4

    def killed_after_npz(*args, **kwargs):
        write_npz(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(runner_module, "write_npz_from_pngs", killed_after_npz)
    with pytest.raises(Killed):
        _generate(ckpt, out, run_name="k", num_samples=4)
    assert npz.is_file() and json.loads(record_file.read_text())["complete"] is False
    assert _refusal(runs, npz, out / "k.json", capsys) == (
        f"error: sample batch {npz}: its provenance record {record_file} says the run that made it is incomplete "
        "(killed, or still running); rerun the same generate.py command to finish it\n")

    monkeypatch.setattr(runner_module, "write_npz_from_pngs", write_npz)
    assert _generate(ckpt, out, run_name="k", num_samples=4)["generated"] == 0  # nothing to do but the record
    record = json.loads(record_file.read_text())
    assert (record["complete"], record["npz_sha256"], record["num_images"]) == (True, _sha256(npz), 4)


class FakeInception:
    """Features straight from the pixels: evaluate's wiring runs without a network."""

    def __init__(self, weights_path, device):
        pass

    def __call__(self, images):
        flat = images.reshape(len(images), -1).astype(np.float32) / 255
        return {"pool": flat[:, :4], "spatial": flat[:, 4:7], "logits": 4 * flat[:, :4]}


class FakeDino:
    def __init__(self, model):
        pass

    def __call__(self, images):
        return images.reshape(len(images), -1)[:, 7:12].astype(np.float32) / 255


@pytest.fixture
def fake_network(monkeypatch):
    monkeypatch.setattr(features_module, "InceptionFeatureExtractor", FakeInception)
    monkeypatch.setattr(features_module, "DinoV2FeatureExtractor", FakeDino)
    monkeypatch.setattr(features_module, "load_dinov2", lambda *args: None)


def _evaluate(runs, samples, out, *extra):
    folder = runs["folder"]
    return evaluate_module.main([str(folder / "ref.npz"), str(samples), "--device", "cpu", "--no-progress",
                                 "--inception-weights", str(folder / "inception.pth"), "--fid-method", "eigh",
                                 "--out", str(out), *extra])


def _identity(path):
    return {"file": Path(path).name, "sha256": _sha256(path), "bytes": os.path.getsize(path)}


def test_evaluate_copies_the_record_and_the_hashes(runs, fake_network, tmp_path, capsys):
    folder, out = runs["folder"], runs["out"]
    assert _evaluate(runs, out / "a.npz", tmp_path / "a.json", "--fdd",
                     "--dinov2-weights", str(folder / "dinov2.pth")) == 0
    result = json.loads((tmp_path / "a.json").read_text())
    assert result["sample_record"] == _record(out / "a.npz")
    assert result["inputs"] == {
        "samples": {"path": str(out / "a.npz"), "sha256": _sha256(out / "a.npz"), "num_images": 8},
        "ref": {"path": str(folder / "ref.npz"), "sha256": _sha256(folder / "ref.npz"), "num_images": 10},
        "inception_weights": _identity(folder / "inception.pth"), "dinov2_weights": _identity(folder / "dinov2.pth")}
    assert result["fdd"] is not None
    # a foreign .npz (no record beside it) is evaluated; its record is null
    foreign = tmp_path / "foreign.npz"
    with np.load(out / "a.npz") as f:
        np.savez(foreign, arr_0=f["arr_0"])
    assert _evaluate(runs, foreign, tmp_path / "foreign.json") == 0
    result = json.loads((tmp_path / "foreign.json").read_text())
    assert result["sample_record"] is None and result["inputs"]["samples"]["sha256"] == _sha256(foreign)
    assert result["inputs"]["dinov2_weights"] is None
    capsys.readouterr()


def _refusal(runs, samples, out, capsys, ref=None):
    folder = runs["folder"]
    code = evaluate_module.main([str(ref or folder / "ref.npz"), str(samples), "--device", "cpu", "--no-progress",
                                 "--inception-weights", str(folder / "inception.pth"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not Path(out).exists() and err.count("\n") == 1
    return err


def test_evaluate_refuses_comparisons_that_cannot_be_right(runs, fake_network, tmp_path, capsys):
    folder, out = runs["folder"], runs["out"]
    samples = out / "a.npz"
    ref16 = tmp_path / "ref16.npz"
    np.savez(ref16, arr_0=np.zeros((10, 16, 16, 3), np.uint8))
    assert _refusal(runs, samples, tmp_path / "r.json", capsys, ref=ref16) == (
        f"error: reference batch {ref16} is 16x16 but samples {samples} are 8x8; use the reference batch of the "
        "samples' resolution (e.g. VIRTUAL_imagenet8_labeled.npz), or pass --allow-resolution-mismatch to compare "
        "anyway\n")

    few = tmp_path / "few.npz"
    np.savez(few, arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    assert _refusal(runs, few, tmp_path / "r.json", capsys) == (
        f"error: sample batch {few}: 3 image(s); pr needs at least 4 (k = 3 nearest neighbours)\n")
    stats = tmp_path / "stats.npz"
    save_statistics(ReferenceStatistics({"mu": np.zeros(4), "sigma": np.eye(4)},
                                        {"num_images": 10, "resolution": [8, 8], "inception": None}), str(stats))
    one = tmp_path / "one.npz"
    np.savez(one, arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    assert _refusal(runs, one, tmp_path / "r.json", capsys, ref=stats) == (
        f"error: sample batch {one}: 1 image(s); fid, sfid need at least 2 (a covariance)\n")

    # the .npz replaced after its record was written
    replaced = tmp_path / "replaced.npz"
    shutil.copyfile(out / "a.provenance.json", tmp_path / "replaced.provenance.json")
    with np.load(samples) as f:
        np.savez(replaced, arr_0=f["arr_0"][::-1])
    assert _refusal(runs, replaced, tmp_path / "r.json", capsys) == (
        f"error: sample batch {replaced} is not the file its provenance record {tmp_path / 'replaced.provenance.json'} "
        f"describes (sha256 {_sha256(replaced)[:12]}..., recorded {_sha256(samples)[:12]}...): it was replaced "
        "after the run; regenerate it, or delete the record to evaluate it as a foreign file\n")

    # a file under the record's name that is not a record
    (tmp_path / "replaced.provenance.json").write_text('{"format": "something else"}')
    assert _refusal(runs, replaced, tmp_path / "r.json", capsys) == (
        f"error: sample batch {replaced}: provenance record {tmp_path / 'replaced.provenance.json'}: not a record "
        "of generate.py (format dfm-sample-provenance with 'complete'); rerun generate.py to rewrite it, "
        "or delete it\n")


def test_report_turns_results_into_the_table(runs, fake_network, tmp_path, capsys):
    folder, out = runs["folder"], runs["out"]
    results = []
    for name in ("a", "b"):
        assert _evaluate(runs, out / f"{name}.npz", tmp_path / f"{name}.json") == 0
        results.append(json.loads((tmp_path / f"{name}.json").read_text()))
    capsys.readouterr()
    paths = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    assert report_module.main(paths + ["--out", str(tmp_path / "table.md")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'table.md'} and {tmp_path / 'table.csv'}\n"
    md = (tmp_path / "table.md").read_text()
    lines = md.splitlines()
    # the label mode and the sample count tell rows apart; the columns are those of the metrics computed
    assert lines[0] == "| # | model | steps | NFE | CFG | labels | N | FID | sFID | IS | Prec. | Rec. |"

    def metrics(r):
        return [f"{r[k]:.2f}" for k in ("fid", "sfid", "inception_score", "precision", "recall")]

    assert lines[2] == "| " + " | ".join(["1", "DFM-SiT-S/2", "3+2", "5", "1", "balanced", "8"] + metrics(results[0])) + " |"
    assert lines[3] == "| " + " | ".join(["2", "DFM-SiT-S/2", "2+2", "7×2", "2 [0, 0.7]", "random", "8"]
                                         + metrics(results[1])) + " |"
    ref_sha, code = _sha256(folder / "ref.npz")[:12], _git_version()
    code = code.replace("-dirty", "")[:12] + ("-dirty" if code.endswith("-dirty") else "")
    assert lines[4:7] == ["", "Provenance:", ""]
    assert lines[7] == (
        f"1. `{paths[0]}`: checkpoint `{runs['ckpt']}` (sha256 `{_sha256(runs['ckpt'])[:12]}`), step 100, "
        f"post-hoc EMA std 0.08; sampler euler, thresholds [0.1], path linear, tf32, VAE none; seed 0, labels balanced, "
        f"8 samples, 1 process(es); code {code}; reference `ref.npz` (sha256 `{ref_sha}`), samples `a.npz` "
        f"(sha256 `{_sha256(out / 'a.npz')[:12]}`)")
    assert lines[8].startswith(f"2. `{paths[1]}`: checkpoint `{runs['ckpt_b']}` (sha256 "
                               f"`{_sha256(runs['ckpt_b'])[:12]}`), step 100, raw; sampler heun, thresholds [0.1]")
    assert len(lines) == 9

    with open(tmp_path / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and list(rows[0]) == list(report_module.csv_columns())
    for row, result, name, ckpt in zip(rows, results, "ab", (runs["ckpt"], runs["ckpt_b"])):
        assert {k: float(row[k]) for k in ("fid", "sfid", "inception_score", "precision", "recall")} == {
            k: result[k] for k in ("fid", "sfid", "inception_score", "precision", "recall")}  # unrounded
        assert row["fdd"] == ""
        assert (row["checkpoint_sha256"], row["ref_sha256"], row["samples_sha256"]) == (
            _sha256(ckpt), _sha256(folder / "ref.npz"), _sha256(out / f"{name}.npz"))
        assert (row["step"], row["num_samples"], row["num_processes"]) == ("100", "8", "1")
    assert (rows[1]["nfe"], rows[1]["cfg"], rows[1]["seed"], rows[1]["labels"]) == ("7×2", "2 [0, 0.7]", "1", "random")

    assert report_module.main(paths) == 0  # without --out: the Markdown on stdout
    assert capsys.readouterr().out == md


def test_report_bad_input_is_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    other = tmp_path / "other.json"
    other.write_text('{"fid": 3.5, "samples": "s.npz"}')
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    table = tmp_path / "table"
    for path, line in ((missing, f"error: {missing}: no such file"),
                       (other, f"error: {other}: not a result of python -m evaluation.evaluate --out "
                               "(no num_samples, ref)"),
                       (broken, f"error: {broken}: not a result of python -m evaluation.evaluate --out (not valid "
                                "JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)))")):
        assert report_module.main([str(path), "--out", str(table)]) == 2
        assert capsys.readouterr().err == line + "\n"
    assert not list(tmp_path.glob("table*"))


def test_the_report_escapes_what_records_hold_and_trusts_no_field_type(tmp_path):
    """Records anyone can edit: a `|`, a newline or a backtick cannot break the Markdown table, a cell
    starting with = + - @ is no spreadsheet formula, and fields of the wrong type are shown, not computed."""
    import csv
    import io
    import json

    result = {"fid": 3.5, "num_samples": 8, "ref": "ref|x.npz", "samples": "s.npz",
              "sample_record": {"sampler": "euler", "checkpoint": {"arch": {"name": "SiT-XL/2 | `rm`\nX"},
                                                                  "path": "=HYPERLINK(\"x\")", "weights_info": "odd"},
                                "labels": "@bad", "seed": "=1+1", "config": {}}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    md, table = report_module.report([str(path)])
    row = md.splitlines()[2]
    assert row.count(" | ") == md.splitlines()[0].count(" | ")  # every cell where the header says
    assert "SiT-XL/2 \\| \\`rm\\` X" in row and "\n" not in row
    cells = next(csv.DictReader(io.StringIO(table)))
    assert cells["checkpoint"] == "'=HYPERLINK(\"x\")" and cells["labels"] == "'@bad" and cells["seed"] == "'=1+1"
    assert cells["fid"] == "3.5"  # numbers stay numbers
