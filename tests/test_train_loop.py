"""In-process training runs of a tiny pixel-space DFM-SiT: exact resume, auto-resume past a
truncated checkpoint, bad data, the CLI error path, previews, and the demo configuration."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import train as train_cli
from training.config import ConfigError, parse_config
from training.loop import train

from train_helpers import assert_same_weights, load_ckpt, read_losses, tiny_argv, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_exact_resume_and_auto_resume_past_truncated_checkpoint(tiny_data, tmp_path):
    out = str(tmp_path)
    steps = dict(max_train_steps=6, checkpointing_steps=2)
    straight = train(tiny_config(tiny_data, out, exp_name="straight", **steps))
    assert straight.steps == 6 and straight.last_checkpoint.endswith("0000006.pt")

    # killed after step 5: checkpoints at 2 and 4 exist, step 5's work is lost
    cut = train(tiny_config(tiny_data, out, exp_name="cut", **steps), stop_after_step=5)
    assert cut.steps == 5
    kept = sorted(f for f in os.listdir(os.path.join(out, "cut", "checkpoints")) if f.endswith(".pt"))
    assert kept == ["0000002.pt", "0000004.pt"]
    resumed = train(tiny_config(tiny_data, out, exp_name="cut", **steps))  # resume=auto -> step 4
    assert resumed.steps == 6

    # the same, but the newest checkpoint is truncated (crash while copying): resumes from step 2
    train(tiny_config(tiny_data, out, exp_name="trunc", **steps), stop_after_step=5)
    newest = os.path.join(out, "trunc", "checkpoints", "0000004.pt")
    size = os.path.getsize(newest)
    with open(newest, "r+b") as f:
        f.truncate(size // 3)
    train(tiny_config(tiny_data, out, exp_name="trunc", **steps))
    log = open(os.path.join(out, "trunc", "log.txt")).read()
    assert "skipping corrupt checkpoint" in log and "resuming from" in log and "0000002.pt at step 2" in log
    assert ", 20 training items (images), 1 process(es) on cpu (" in log  # (not "20 images items")

    ref = load_ckpt(straight.last_checkpoint)
    ref_losses = read_losses(straight.exp_dir)
    assert sorted(ref_losses) == [1, 2, 3, 4, 5, 6] and len(set(ref_losses.values())) == 6
    for name in ("cut", "trunc"):
        got = load_ckpt(os.path.join(out, name, "checkpoints", "0000006.pt"))
        assert_same_weights(got, ref)
        assert got["opt"]["state"][0]["step"] == ref["opt"]["state"][0]["step"] == 6
        assert read_losses(os.path.join(out, name)) == ref_losses  # bit-identical losses
    # the checkpoint format of docs/API_CONTRACT.md
    assert ref["steps"] == 6 and ref["arch"]["name"] == "DFM-SiT-S/4" and ref["config"]["vae"] == "none"
    assert ref["data_position"]["epoch"] == 3 and len(ref["rng"]) == 1
    assert "x_embedder.embedders.0.proj.weight" in ref["model"]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ref["model"])
    assert not torch.equal(ref["model"]["final_layer.projections.1.linear.weight"],
                           ref["ema"]["final_layer.projections.1.linear.weight"])


def test_bad_data_is_one_clear_error_before_training(tiny_data, tmp_path):
    out = str(tmp_path / "out")
    cases = [
        (str(tmp_path / "missing"), {}, "does not exist"),
        (str(tmp_path), {}, "not a dataset"),                                   # empty folder
        (tiny_data, {"resolution": 32}, "images are 16x16"),                    # shape != model
        (tiny_data, {"vae": "ft-ema", "resolution": 32}, "encode them first"),  # images for a latent run
        (tiny_data, {"num_classes": 1}, "has 2 classes"),
        (tiny_data, {"batch_size": 64}, "fewer than one global batch"),
    ]
    for data_dir, over, words in cases:
        with pytest.raises(ConfigError, match=words):
            train(tiny_config(data_dir, out, exp_name="bad", **over))
    assert not os.path.isdir(os.path.join(out, "bad", "checkpoints"))


def test_cli_reports_errors_without_traceback(tiny_data, tmp_path, capsys):
    assert train_cli.main(tiny_argv(tiny_data, str(tmp_path), lr_rate=1)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Unknown config key 'lr_rate'") and "Traceback" not in err
    assert train_cli.main(["--help"]) == 0 and "ema_decay" in capsys.readouterr().out


def test_nonfinite_loss_stops_naming_the_step(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, str(tmp_path), exp_name="nan", lr=1e30, max_grad_norm=0.0, max_train_steps=8,
                      checkpointing_steps=1)
    from training.loop import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"non-finite .* at step (\d+)") as err:
        train(cfg)
    bad_step = int(err.value.args[0].split("at step ")[1].split(";")[0])
    ckpts = sorted(f for f in os.listdir(os.path.join(str(tmp_path), "nan", "checkpoints")) if f.endswith(".pt"))
    assert ckpts and int(ckpts[-1][:7]) < bad_step  # only checkpoints from before the bad step
    last = load_ckpt(os.path.join(str(tmp_path), "nan", "checkpoints", ckpts[-1]))
    assert all(torch.isfinite(v).all() for v in last["model"].values())


def test_demo_config_few_steps_with_previews(tmp_path):
    """experiments/train/demo_cpu.yaml, shortened: writes the demo data, trains, previews, and
    leaves a checkpoint that models.load_pretrained reads."""
    import models

    argv = ["--config", os.path.join(REPO, "experiments", "train", "demo_cpu.yaml"),
            f"data_dir={tmp_path / 'demo_data'}", f"output_dir={tmp_path}", "max_train_steps=2",
            "demo_images_per_class=8", "preview.num_samples=8", "preview.num_steps_per_scale=[2,2]",
            "sampling_steps=1", "log_every=1"]
    result = train(parse_config(argv))
    cfg = parse_config(argv)
    assert result.steps == 2 and os.path.isfile(result.last_checkpoint)
    previews = sorted(os.listdir(os.path.join(result.exp_dir, "previews")))
    assert previews == ["0000000.png", "0000000_stages.png", "0000001.png", "0000001_stages.png",
                        "0000002.png", "0000002_stages.png"]
    grid = np.asarray(Image.open(result.last_preview))
    per = cfg.resolution * cfg.preview.upscale
    assert grid.shape[0] > per and grid.shape[2] == 3 and grid.std() > 0
    model = models.load_pretrained(result.last_checkpoint)
    assert model.num_stages == 2 and model.num_classes == 8 and not model.training
    assert os.path.isfile(os.path.join(result.exp_dir, "config.yaml"))


def test_demo_continued_to_more_steps_ends_where_the_longer_run_ends(tmp_path):
    """README: rerunning the demo with a larger max_train_steps continues it from its last checkpoint
    and ends with the weights a run of that length from scratch ends with (the demo's lr is constant,
    so nothing in a step depends on the run's length)."""
    base = ["--config", os.path.join(REPO, "experiments", "train", "demo_cpu.yaml"),
            f"data_dir={tmp_path / 'demo_data'}", f"output_dir={tmp_path}", "demo_images_per_class=8",
            "preview.num_samples=0", "checkpointing_steps=2", "log_every=1"]
    short = train(parse_config(base + ["exp_name=demo", "max_train_steps=2"]))
    continued = train(parse_config(base + ["exp_name=demo", "max_train_steps=4"]))
    longer = train(parse_config(base + ["exp_name=longer", "max_train_steps=4"]))
    assert short.steps == 2 and continued.steps == longer.steps == 4
    log = open(os.path.join(continued.exp_dir, "log.txt")).read()
    assert "resuming from" in log and "0000002.pt" in log
    assert_same_weights(load_ckpt(continued.last_checkpoint), load_ckpt(longer.last_checkpoint))
    losses, longer_losses = read_losses(continued.exp_dir), read_losses(longer.exp_dir)
    assert sorted(losses) == [1, 2, 3, 4] and losses == longer_losses


def test_preview_grid_places_every_image_in_its_cell():
    from training.previews import make_grid

    images = np.random.default_rng(0).integers(0, 256, (5, 3, 4, 3), dtype=np.uint8)
    grid = make_grid(images, nrow=2, pad=1, pad_value=7)
    assert grid.shape == (3 * (3 + 1) + 1, 2 * (4 + 1) + 1, 3) and grid.dtype == np.uint8
    for i, image in enumerate(images):  # row-major cells after a 1-px border
        r, c = divmod(i, 2)
        assert np.array_equal(grid[1 + r * 4:1 + r * 4 + 3, 1 + c * 5:1 + c * 5 + 4], image)
    assert (grid[0] == 7).all() and (grid[9:12, 6:10] == 7).all()  # the border and the empty last cell


def test_latent_run_with_local_vae(tmp_path):
    """Latent data (posterior moments) + a tiny local VAE for the preview decode."""
    import json

    from conftest import save_tiny_vae

    save_tiny_vae(tmp_path / "vae")
    data_dir = tmp_path / "latents"
    labels = []
    rng = np.random.default_rng(0)
    for idx in range(16):
        rel = f"{idx // 1000:05d}/img-mean-std-{idx:08d}.npy"
        (data_dir / os.path.dirname(rel)).mkdir(parents=True, exist_ok=True)
        moments = np.concatenate([rng.normal(size=(4, 4, 4)), np.full((4, 4, 4), 0.1)]).astype(np.float32)
        np.save(data_dir / rel, moments)
        labels.append([rel, idx % 2])
    (data_dir / "dataset.json").write_text(json.dumps({"labels": labels}))
    cfg = tiny_config(str(data_dir), str(tmp_path / "out"), exp_name="latent", model="DFM-SiT-S/2",
                      vae=str(tmp_path / "vae"), resolution=32, max_train_steps=2, **{
                          "preview.num_samples": 2, "preview.show_stages": True})
    result = train(cfg)
    grid = np.asarray(Image.open(result.last_preview))
    assert grid.shape == (2 + 32 + 2, 2 * (32 + 2) + 2, 3)  # decoded by the VAE to 32 px
    ckpt = load_ckpt(result.last_checkpoint)
    assert ckpt["arch"]["in_channels"] == 4 and ckpt["arch"]["input_size"] == 4
    assert ckpt["config"]["vae"] == str(tmp_path / "vae")


def test_images_per_sec_leaves_out_the_work_between_steps(monkeypatch):
    """Checkpoints, previews and evaluation between steps are not training time (a fake clock)."""
    import torch
    from types import SimpleNamespace

    import training.metrics as metrics_module

    clock = [100.0]
    monkeypatch.setattr(metrics_module.time, "time", lambda: clock[0])
    window = metrics_module.MetricWindow(1, "cpu")
    out = {"loss": torch.tensor(1.0), "stage_losses": torch.tensor([1.0])}
    for _ in range(4):
        window.add_micro_batch(out, 0, 1)
        window.add_step(torch.tensor(0.5))
    clock[0] = 150.0  # 50 s since the window started, 30 of them an evaluation:
    window.exclude(30.0)
    values = window.read(SimpleNamespace(num_processes=1), batch_size=8)
    assert values["images_per_sec"] == 8 * 4 / 20.0
