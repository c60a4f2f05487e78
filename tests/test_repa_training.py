"""REPA training (SPEC §10): train.py with proj_coeff > 0 on a tiny images + latents set, a tiny
random timm DINOv2 from a file, and the bad inputs that must stop a run before any heavy work.

Shapes: 64 px images -> 8x8 latents; a /2 model has 4x4 = 16 tokens, and the encoder runs at
224 * 64 / 256 = 56 px = 4x4 patches of 14 px = 16 tokens.
"""
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import train as train_cli
from conftest import save_tiny_vae
from training.config import ConfigError, parse_config
from training.loop import train

from train_helpers import assert_same_weights, load_ckpt, read_losses, run_torchrun

TINY_ENCODER = dict(depth=2, embed_dim=48, num_heads=2)
NUM_ITEMS = 16

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def repa_data(tmp_path_factory):
    """REPA's layout written by our tools: `convert` (64 px PNGs) + `encode` (tiny VAE), and a
    32 px conversion of the same images."""
    from data.convert import convert_dataset
    from data.encode import encode_dataset

    root = tmp_path_factory.mktemp("repa")
    rng = np.random.default_rng(0)
    for i in range(NUM_ITEMS):
        folder = root / "raw" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(folder / f"x{i}.png")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        convert_dataset(str(root / "raw"), str(root / "data" / "images"), resolution=(64, 64), workers=1,
                        progress=False)
        convert_dataset(str(root / "raw"), str(root / "images32"), resolution=(32, 32), workers=1, progress=False)
        encode_dataset(str(root / "data" / "images"), str(root / "data" / "vae-sd"), vae=save_tiny_vae(root / "vae"),
                       batch_size=8, progress=False, device="cpu")
    finally:
        torch.set_num_threads(before)
    return root


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """A random timm DINOv2 (ViT-S/14 shrunk) at its native 518 px, as a state-dict file."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, **TINY_ENCODER)
    with torch.no_grad():  # LayerScale starts at 1e-5: make the blocks matter
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.normal_(0, 0.5)
    path = str(tmp_path_factory.mktemp("dinov2") / "tiny_dinov2.pth")
    torch.save(model.state_dict(), path)
    return path


def repa_argv(data_dir, output_dir, encoder_file, **overrides):
    argv = [
        "model=SiT-S/2", "model_overrides={depth: 2, hidden_size: 64, num_heads: 4}", "encoder_depth=1",
        "proj_coeff=0.5", "enc_type=dinov2-vit-s", f"encoder_weights={encoder_file}",
        "encoder_overrides={depth: 2, embed_dim: 48, num_heads: 2}",
        f"data_dir={data_dir}", f"output_dir={output_dir}", "resolution=64", "num_classes=2",
        "batch_size=8", "num_workers=0", "mixed_precision=no", "lr=1e-3", "ema_decay=0.9",
        "max_train_steps=4", "checkpointing_steps=2", "log_every=1", "sampling_steps=0", "report_to=none",
        "resume=auto", "preview.num_samples=0", "seed=3", "cpu_threads=1",
    ]
    return argv + [f"{k}={v}" for k, v in overrides.items()]


def repa_config(repa_data, tmp_path, encoder_file, **overrides):
    return parse_config(repa_argv(str(repa_data / "data"), str(tmp_path), encoder_file, **overrides))


def _proj_losses(exp_dir):
    import json

    with open(os.path.join(exp_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["proj_loss"] for r in map(json.loads, f)}


# ---------------------------------------------------------------- runs


def test_train_cli_runs_repa_and_keeps_the_encoder_out_of_checkpoints(repa_data, encoder_file, tmp_path, capsys):
    argv = repa_argv(str(repa_data / "data"), str(tmp_path), encoder_file, exp_name="cli")
    assert train_cli.main(argv) == 0
    exp = tmp_path / "cli"
    proj = _proj_losses(str(exp))
    assert sorted(proj) == [1, 2, 3, 4]
    assert all(-1 <= v <= 1 for v in proj.values()) and len(set(proj.values())) == 4
    ckpt = load_ckpt(str(exp / "checkpoints" / "0000004.pt"))
    assert ckpt["arch"]["z_dims"] == [48] and ckpt["arch"]["encoder_depth"] == 1
    assert {k for k in ckpt["model"] if k.startswith("projectors.")} == {
        f"projectors.0.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}
    assert ckpt["model"]["projectors.0.4.weight"].shape == (48, 2048)
    assert not any(k.startswith(("encoder", "blocks.0.ls", "patch_embed", "norm.")) for k in ckpt["model"])
    assert sum(v.numel() for v in ckpt["model"].values()) < 5e6  # the model alone
    log = open(exp / "log.txt").read()
    assert "REPA: proj_coeff 0.5, encoder_depth 1, frozen FrozenEncoder('dinov2-vit-s', 64px -> 56px, " \
           "16 tokens x 48)" in log
    assert "16 training items (paired)" in log


def test_batch_features_equal_the_encoder_on_the_png_files(repa_data, encoder_file):
    """BatchPreparer: the features are the encoder's on the decoded PNG of the same index, the
    latents the posterior sample of that index's moments (an independent read of both files)."""
    import json

    import data
    from data.vae import sample_latents
    from models.encoders import load_encoders
    from training.batch import BatchPreparer
    from training.repa import RepaFeatures

    ds = data.open_paired(str(repa_data / "data"), resolution=64)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)))
    encoders = load_encoders("dinov2-vit-s", encoder_file, resolution=64, arch_overrides=TINY_ENCODER)
    inputs = BatchPreparer(False, torch.device("cpu"), RepaFeatures(encoders))(batch, torch.Generator().manual_seed(5))

    meta = json.load(open(repa_data / "data" / "images" / "dataset.json"))
    pngs = torch.stack([torch.from_numpy(np.asarray(Image.open(repa_data / "data" / "images" / rel).convert("RGB"))
                                         .transpose(2, 0, 1).copy()) for rel, _ in meta["labels"][:4]])
    with torch.no_grad():
        expected = encoders[0](pngs)
    [features] = inputs.encoder_features
    assert features.shape == (4, 16, 48)
    torch.testing.assert_close(features, expected)
    lat_meta = json.load(open(repa_data / "data" / "vae-sd" / "dataset.json"))
    moments = torch.stack([torch.from_numpy(np.load(repa_data / "data" / "vae-sd" / rel)) for rel, _ in
                           lat_meta["labels"][:4]])
    torch.testing.assert_close(inputs.x, sample_latents(moments, generator=torch.Generator().manual_seed(5)))
    assert inputs.y.tolist() == [lab for _, lab in meta["labels"][:4]]


def _tiny_repa_model(name, encoder_depth, **extra):
    from conftest import tiny_model

    torch.manual_seed(0)
    return tiny_model(name, num_classes=2, z_dims=[48], encoder_depth=encoder_depth, projector_dim=128, **extra)


def _fixed_batch(repa_data, encoder_file):
    import data
    from models.encoders import load_encoders
    from training.batch import BatchPreparer
    from training.repa import RepaFeatures

    ds = data.open_paired(str(repa_data / "data"))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)))
    encoders = load_encoders("dinov2-vit-s", encoder_file, resolution=64, arch_overrides=TINY_ENCODER)
    return BatchPreparer(False, torch.device("cpu"), RepaFeatures(encoders))(batch, torch.Generator().manual_seed(0))


def test_projection_loss_falls_on_a_fixed_batch(repa_data, encoder_file):
    import dfm

    inputs = _fixed_batch(repa_data, encoder_file)
    model = _tiny_repa_model("SiT-S/2", 1)
    objective = dfm.FlowMatchingObjective(1, time_distribution="uniform", proj_coeff=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(25):
        out = objective(model, inputs.x, inputs.y, encoder_features=inputs.encoder_features,
                        generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["proj_loss"].item())
    # -cos similarity: starts near 0 (random projector), and the alignment is learned
    assert abs(losses[0]) < 0.3
    assert np.mean(losses[-5:]) < losses[0] - 0.2, losses


@pytest.mark.parametrize("name,extra,aligned,free", [
    ("DFM-SiT-S/2", {}, "blocks.0.", "blocks.1."),
    ("ELIT-SiT-S/2", dict(depth=4, elit_tail_depth=1, group_size=2), "blocks.0.", "blocks.3."),
])
def test_dfm_and_elit_repa_step(repa_data, encoder_file, name, extra, aligned, free):
    """One REPA step of DFM-SiT and ELIT-SiT: the alignment gradient reaches the blocks up to
    encoder_depth (ELIT: the head) and the projector, never the blocks after it."""
    import dfm
    from dfm.objective import projection_loss

    inputs = _fixed_batch(repa_data, encoder_file)
    model = _tiny_repa_model(name, 1, **extra)
    objective = dfm.FlowMatchingObjective(model.num_stages, time_distribution="uniform", proj_coeff=0.5)
    out = objective(model, inputs.x, inputs.y, encoder_features=inputs.encoder_features,
                    generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and out["proj_loss"] != 0
    # the projection term alone, recomputed from the model's features (independent of the objective)
    t = torch.rand(8, model.num_stages)
    xs = [torch.randn(8, *shape) for shape in model.stage_shapes]
    _, zs = model(xs if model.num_stages > 1 else xs[0], t, inputs.y, return_features=True)
    cos = torch.nn.functional.cosine_similarity(zs[0], inputs.encoder_features[0], dim=-1)
    proj = projection_loss(zs, inputs.encoder_features)
    torch.testing.assert_close(proj, -cos.mean())
    model.zero_grad()
    proj.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["projectors.0.0.weight"].abs().sum() > 0
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(aligned))
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if n.startswith(free))


def test_dfm_repa_through_train(repa_data, encoder_file, tmp_path):
    cfg = repa_config(repa_data, tmp_path, encoder_file, model="DFM-SiT-S/2", exp_name="dfm",
                      max_train_steps=2, **{"preview.num_steps_per_scale": "[2,2]"})
    result = train(cfg)
    proj = _proj_losses(result.exp_dir)
    assert sorted(proj) == [1, 2] and all(v != 0 for v in proj.values())
    assert load_ckpt(result.last_checkpoint)["arch"]["z_dims"] == [48]


def test_kill_and_resume_is_bit_exact_with_repa(repa_data, encoder_file, tmp_path):
    steps = dict(max_train_steps=4, checkpointing_steps=2)
    straight = train(repa_config(repa_data, tmp_path, encoder_file, exp_name="straight", **steps))
    cut = train(repa_config(repa_data, tmp_path, encoder_file, exp_name="cut", **steps), stop_after_step=3)
    assert cut.steps == 3
    resumed = train(repa_config(repa_data, tmp_path, encoder_file, exp_name="cut", **steps))
    assert resumed.steps == 4
    ref, got = load_ckpt(straight.last_checkpoint), load_ckpt(resumed.last_checkpoint)
    assert_same_weights(ref, got)
    assert read_losses(straight.exp_dir) == read_losses(resumed.exp_dir)
    assert _proj_losses(straight.exp_dir) == _proj_losses(resumed.exp_dir)


def test_two_process_gloo_repa_run_matches_one_process(repa_data, encoder_file, tmp_path):
    out = str(tmp_path / "runs")
    common = dict(max_train_steps=2, checkpointing_steps=2)
    proc = run_torchrun(repa_argv(str(repa_data / "data"), out, encoder_file, exp_name="two",
                                  gradient_accumulation_steps=1, **common))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = train(parse_config(repa_argv(str(repa_data / "data"), out, encoder_file, exp_name="one",
                                       gradient_accumulation_steps=2, **common)))
    assert re.search(r"2 process\(es\) on cpu \(\d+ CPU threads each\), global batch 8 = 2 x 1 x 4",
                     open(os.path.join(out, "two", "log.txt")).read())
    two_dir = os.path.join(out, "two")
    for a, b in ((read_losses(one.exp_dir), read_losses(two_dir)), (_proj_losses(one.exp_dir), _proj_losses(two_dir))):
        assert sorted(a) == sorted(b) == [1, 2]
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6)
    two_ckpt = load_ckpt(os.path.join(two_dir, "checkpoints", "0000002.pt"))
    for key, value in load_ckpt(one.last_checkpoint)["model"].items():
        torch.testing.assert_close(two_ckpt["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides,match", [
    (dict(enc_type="dinov2-vit-x"), r"enc_type 'dinov2-vit-x': unknown encoder 'dinov2-vit-x'; allowed: dinov2-vit-s"),
    (dict(encoder_weights="/nope/dinov2_vitb14_pretrain.pth"), r"encoder_weights: '/nope/dinov2_vitb14_pretrain.pth' "
                                                               "does not exist"),
    (dict(encoder_depth=3), r"encoder_depth=3: the REPA projector reads .* \[1, 2\] for SiT-S/2 with depth 2"),
    (dict(encoder_depth=0), r"encoder_depth=0: .*no projector input"),
    (dict(encoder_depth="null"), r"encoder_depth=4 \(the default\)"),
    (dict(model="SiT-S/4"), r"model SiT-S/4 has 4 tokens per image at resolution 64, but dinov2-vit-s gives 16"),
    (dict(enc_type="none"), r"proj_coeff=0.5 needs a frozen DINOv2 encoder: set enc_type"),
    (dict(proj_coeff=0), r"enc_type='dinov2-vit-s' but proj_coeff=0"),
    (dict(proj_coeff=-1), r"proj_coeff must be >= 0"),
    (dict(vae="none", model="SiT-S/8"), r"vae=none: REPA aligns latent models"),
    (dict(encoder_overrides="{depth: 2, img_size: 3}"), r"encoder_overrides.img_size is not allowed"),
])
def test_bad_repa_config_is_one_clear_error_before_any_file_is_read(overrides, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        parse_config(repa_argv("/no/data", str(tmp_path), str(tmp_path / "enc.pth"), **overrides))


def test_missing_weight_file_via_cli(tmp_path, capsys):
    missing = str(tmp_path / "dinov2_vits14_pretrain.pth")
    assert train_cli.main(repa_argv("/no/data", str(tmp_path), missing)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"encoder_weights: '{missing}' does not exist" in err


def _no_heavy_work(monkeypatch):
    """Loading the encoders or building the model fails the test: data errors must come first."""
    import training.loop as loop

    def forbidden(*args, **kwargs):
        raise AssertionError("heavy work started before the data was checked")

    monkeypatch.setattr(loop, "load_run_encoders", forbidden)
    monkeypatch.setattr(loop, "build_train_state", forbidden)


def test_latents_without_matching_images(repa_data, encoder_file, tmp_path, monkeypatch):
    _no_heavy_work(monkeypatch)
    data = tmp_path / "data"
    shutil.copytree(repa_data / "data" / "vae-sd", data / "vae-sd")
    with pytest.raises(ConfigError, match=r"data_dir / images_dir .*holds no images or images.zip; set images_dir"):
        train(parse_config(repa_argv(str(data), str(tmp_path), encoder_file)))
    # images of other items (a count mismatch): both paths named
    few = tmp_path / "few"
    from data.convert import convert_dataset

    convert_dataset(str(repa_data / "raw"), str(few), resolution=(64, 64), max_images=12, workers=1, progress=False)
    with pytest.raises(ConfigError, match=rf"images '{few}' and latents '{data / 'vae-sd'}' do not match: 12 images, "
                                          r"16 latents"):
        train(parse_config(repa_argv(str(data), str(tmp_path), encoder_file, images_dir=str(few))))


def test_images_of_another_resolution(repa_data, encoder_file, tmp_path, monkeypatch):
    _no_heavy_work(monkeypatch)
    with pytest.raises(ConfigError, match=r"images .*images32' are 32x32, but the run expects 64x64 \(resolution\)"):
        train(parse_config(repa_argv(str(repa_data / "data"), str(tmp_path), encoder_file,
                                     images_dir=str(repa_data / "images32"))))


def test_encoder_weights_of_another_architecture(repa_data, encoder_file, tmp_path, monkeypatch):
    import training.loop as loop

    def forbidden(*args, **kwargs):
        raise AssertionError("model built before the encoder weights were checked")

    monkeypatch.setattr(loop, "build_train_state", forbidden)
    with pytest.raises(ConfigError, match=r"encoder_weights: '.*tiny_dinov2.pth' does not load into dinov2-vit-s"):
        train(parse_config(repa_argv(str(repa_data / "data"), str(tmp_path), encoder_file,
                                     encoder_overrides="{depth: 3, embed_dim: 48, num_heads: 2}")))


def test_resuming_a_checkpoint_without_projector(repa_data, encoder_file, tmp_path):
    """A run trained without REPA cannot continue with proj_coeff > 0: its model has no projector."""
    plain = dict(proj_coeff=0, enc_type="none", encoder_weights="null", exp_name="plain", max_train_steps=2)
    result = train(repa_config(repa_data, tmp_path, encoder_file, **plain))
    with pytest.raises(ConfigError, match=r"resume: checkpoint .*0000002.pt was trained with"):
        train(repa_config(repa_data, tmp_path, encoder_file, exp_name="plain", max_train_steps=4))
    assert result.steps == 2


# ---------------------------------------------------------------- configs and benchmark


def test_shipped_repa_configs():
    """REPA's recipe (its train.py defaults + README command) and the DFM twins plus REPA's keys."""
    folder = os.path.join(os.path.dirname(__file__), "..", "experiments", "train")
    load = lambda name: parse_config(["--config", os.path.join(folder, name), "data_dir=/x"])  # noqa: E731
    repa_keys = dict(proj_coeff=0.5, enc_type="dinov2-vit-b", encoder_weights=None)
    for name, model, depth in (("repa_sit_xl_2_256.yaml", "SiT-XL/2", 8), ("repa_sit_b_2_256.yaml", "SiT-B/2", 4)):
        cfg = load(name)
        assert (cfg.model, cfg.encoder_depth, cfg.time_distribution, cfg.path_type, cfg.batch_size, cfg.lr, cfg.resolution,
                cfg.cfg_prob, cfg.max_train_steps) == (model, depth, "uniform", "linear", 256, 1e-4, 256, 0.1, 400_000)
        assert {k: cfg[k] for k in repa_keys} == repa_keys
    for res in (256, 512):
        repa, plain = load(f"repa_dfm_sit_xl_2_{res}.yaml"), load(f"dfm_sit_xl_2_{res}.yaml")
        assert {k: repa[k] for k in repa_keys} == repa_keys and repa.encoder_depth == 8
        differ = {k for k in repa if repa[k] != plain[k]}
        assert differ == {"proj_coeff", "enc_type", "encoder_depth", "exp_name"}, differ


def test_benchmark_counts_the_encoder_in_the_training_row():
    """`--repa`: the frozen encoder runs inside the timed step; its forward FLOPs are added. The
    count is checked against the ViT formula (CPU attention kernels are not counted by torch's
    FLOP counter, so the count lies between the formula without and with attention)."""
    from bench.benchmark import TINY_ENCODER, bench_train

    cpu = torch.device("cpu")
    plain = bench_train("SiT-S/2", 2, "fp32-tf32", cpu, 1, 0, True)
    repa = bench_train("SiT-S/2", 2, "fp32-tf32", cpu, 1, 0, True, repa="dinov2-vit-b")
    assert "repa" not in plain and repa["repa"] == "dinov2-vit-b" and np.isfinite(repa["final_loss"])
    D, L, N = TINY_ENCODER["embed_dim"], TINY_ENCODER["depth"], 4 * 4 + 1  # 64 px -> 56 px: 16 patches + CLS
    dense = 2 * (L * 12 * D * D * N + 16 * 3 * 14 * 14 * D)
    attention = 2 * L * 2 * N * N * D
    assert dense <= repa["encoder_gflop_per_image"] * 1e9 <= dense + attention
    from bench.flops import forward_flops_per_image
    from conftest import tiny_model

    model = tiny_model("SiT-S/2", z_dims=[48], encoder_depth=1)
    expected = 3 * forward_flops_per_image(model) / 1e9 + repa["encoder_gflop_per_image"]
    assert repa["train_gflop_per_image"] == pytest.approx(expected)


def test_multi_budget_elit_repa_through_train(repa_data, encoder_file, tmp_path):
    """ELIT + REPA through the trainer: budgets drawn per step, the projector on the head output,
    bit-exact after a kill/resume."""
    elit = dict(model="ELIT-SiT-S/2", exp_name="elit", group_size=2, elit_min_mask_prob=0.0,
                elit_max_mask_prob=0.75, max_train_steps=4, checkpointing_steps=2,
                model_overrides="{depth: 4, hidden_size: 64, num_heads: 4}")
    straight = train(repa_config(repa_data, tmp_path / "a", encoder_file, **elit))
    train(repa_config(repa_data, tmp_path / "b", encoder_file, **elit), stop_after_step=3)
    resumed = train(repa_config(repa_data, tmp_path / "b", encoder_file, **elit))
    proj = _proj_losses(straight.exp_dir)
    assert sorted(proj) == [1, 2, 3, 4] and all(v != 0 for v in proj.values())
    assert proj == _proj_losses(resumed.exp_dir)
    ref, got = load_ckpt(straight.last_checkpoint), load_ckpt(resumed.last_checkpoint)
    assert ref["arch"]["z_dims"] == [48] and ref["arch"]["name"] == "ELIT-SiT-S/2"
    assert_same_weights(ref, got)
