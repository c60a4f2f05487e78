"""Config loading: the last value wins for every key type, and the reference code's option
names (train.py / generate.py / the DFM README) are accepted as aliases of ours."""
import os

import pytest
import yaml

from generation.config import load_generate_config, resolve_config
from training.config import ConfigError, parse_config
from utils.config import load_config

BASE = ["data_dir=/d"]


@pytest.mark.parametrize("argv, key, want", [
    (["data_dir=/a", "data_dir=null"], "data_dir", None),
    (["exp_name=a", "exp_name='b'"], "exp_name", "b"),
    (["exp_name='b'", "exp_name=a"], "exp_name", "a"),
    (["exp_name=a", 'exp_name="c d"'], "exp_name", "c d"),
    (["lr=1e-4", "lr=3e-4"], "lr", 3e-4),
    (["cpu_threads=2", "cpu_threads=null"], "cpu_threads", None),
    (["stage_weights=[0.5,0.5]", "stage_weights=null"], "stage_weights", None),
    (["preview.labels=[1,2]", "preview.labels=null"], "preview.labels", None),
    (["--compile", "compile=false"], "compile", False),
])
def test_last_value_wins_for_every_key_type(argv, key, want):
    from training.config import TrainConfig

    cfg = load_config(TrainConfig, argv)
    value = cfg
    for part in key.split("."):
        value = value[part]
    assert value == want


def test_file_then_command_line_last_wins(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("exp_name: from_a\ndata_dir: /from_a\n")
    b = tmp_path / "b.yaml"
    b.write_text("exp_name: null\n")
    cfg = parse_config(["--config", str(a), "--config", str(b), "data_dir=null", "data_dir=/cli"])
    assert cfg.data_dir == "/cli"
    assert cfg.exp_name == "dfm-sit-xl-2-256-lognormal"  # b's null beat a's text, then derived


# The reference train.py's DEFAULTS, as its YAML files spell them (a copy written by the test).
REFERENCE_TRAIN = {
    "output_dir": "exps", "exp_name": "dfm-sit-b-2-256px", "logging_dir": "logs", "report_to": "wandb",
    "sampling_steps": 10000, "resume_step": 0, "model": "DFM-SiT-B/2", "num_classes": 1000,
    "encoder_depth": 4, "fused_attn": True, "qk_norm": False, "data_dir": "../data/imagenet256",
    "resolution": 256, "batch_size": 256, "allow_tf32": True, "mixed_precision": "bf16", "epochs": 1400,
    "max_train_steps": 400000, "checkpointing_steps": 50000, "gradient_accumulation_steps": 1,
    "learning_rate": 2.0e-4, "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_weight_decay": 0.01,
    "adam_epsilon": 1.0e-6, "max_grad_norm": 1.0, "seed": 0, "num_workers": 4, "path_type": "linear",
    "prediction": "v", "cfg_prob": 0.1, "enc_type": "none", "proj_coeff": 0.0, "weighting": "lognormal",
    "legacy": False, "stages_count": 2, "stage_weights": [0.8, 0.2], "stage_sampling_thresholds": [0.2],
    "num_steps_per_scale": [30, 20], "elit_max_mask_prob": 0.0, "elit_min_mask_prob": None,
    "elit_group_size": 4, "s3_cache_dir": "s3://bucket/cache",
}


def test_reference_train_yaml_runs_unchanged(tmp_path, capsys):
    path = tmp_path / "dfm_sit_b_256.yaml"
    path.write_text(yaml.safe_dump(REFERENCE_TRAIN))
    cfg = parse_config(["--config", str(path)])
    assert cfg.model == "DFM-SiT-B/2" and cfg.stages == 2
    assert cfg.lr == pytest.approx(2e-4) and cfg.betas == [0.8, 0.95]
    assert cfg.weight_decay == pytest.approx(0.01) and cfg.adam_eps == pytest.approx(1e-6)
    assert cfg.stage_weights == [0.8, 0.2]
    assert cfg.preview.thresholds == [0.2] and cfg.preview.num_steps_per_scale == [30, 20]
    assert cfg.resume == "auto" and cfg.encoder_depth == 4
    err = capsys.readouterr().err
    for ignored in ("epochs", "logging_dir", "fused_attn", "legacy", "s3_cache_dir"):
        assert f"'{ignored}'" in err, err  # one warning line each, no crash
    assert len([line for line in err.splitlines() if line.startswith("warning:")]) == 5


def test_reference_names_on_the_command_line():
    cfg = parse_config(BASE + ["--stages-count", "3", "--learning-rate", "5e-5", "model=DFM-SiT-B/2",
                               "--stage-sampling-thresholds", "[0.2,0.05]", "--num-steps-per-scale=[20,10,5]"])
    assert cfg.stages == 3 and cfg.lr == pytest.approx(5e-5)
    assert cfg.preview.thresholds == [0.2, 0.05] and cfg.preview.num_steps_per_scale == [20, 10, 5]
    # ours and the alias: the one given last wins
    assert parse_config(BASE + ["lr=1e-3", "learning_rate=2e-3"]).lr == pytest.approx(2e-3)
    assert parse_config(BASE + ["learning_rate=2e-3", "lr=1e-3"]).lr == pytest.approx(1e-3)


def test_resume_step_names_a_checkpoint_of_this_experiment(tmp_path):
    base = BASE + [f"output_dir={tmp_path}", "exp_name=run"]
    assert parse_config(base + ["resume_step=-1"]).resume == "auto"
    with pytest.raises(ConfigError, match="resume: step 50 has no checkpoint"):
        parse_config(base + ["resume_step=50"])
    ckpt = tmp_path / "run" / "checkpoints" / "0000050.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    assert parse_config(base + ["resume_step=50"]).resume == str(ckpt)
    assert parse_config(base + ["resume=50"]).resume == str(ckpt)


def test_unknown_keys_still_fail():
    with pytest.raises(ConfigError, match=r"Unknown config key 'stage_count'.*Did you mean: (\w+, )*stages[,?]"):
        parse_config(BASE + ["stage_count=2"])


REFERENCE_GENERATE = {
    "global_seed": 3, "tf32": True, "sample_dir": "results", "exp_name": "x", "model": "SiT-XL/2",
    "num_classes": 1000, "encoder_depth": 8, "resolution": 256, "fused_attn": False, "qk_norm": False,
    "enable_repa": False, "projector_embed_dims": "768", "vae": "ema", "per_proc_batch_size": 32,
    "num_fid_samples": 50000, "mode": "sde", "cfg_scale": 1.8, "path_type": "linear", "num_steps": 250,
    "heun": False, "guidance_low": 0.0, "guidance_high": 0.7, "legacy": False, "elit_max_mask_prob": 0.5,
    "elit_min_mask_prob": None, "elit_group_size": 4, "stages_count": 1,
    "stage_sampling_thresholds": [], "num_steps_per_scale": None,
}


def test_reference_generation_yaml_and_train_config(tmp_path):
    gen = tmp_path / "gen.yaml"
    gen.write_text(yaml.safe_dump(REFERENCE_GENERATE))
    train = tmp_path / "train.yaml"
    train.write_text(yaml.safe_dump({**REFERENCE_TRAIN, "model": "SiT-XL/2", "path_type": "cosine"}))
    cfg = load_generate_config(["--train-config", str(train), "--eval-config", str(gen), "--ckpt", "c.pt"])
    assert cfg.seed == 3 and cfg.num_samples == 50000 and cfg.method == "sde" and cfg.precision == "tf32"
    assert cfg.path_type == "linear"  # the generation config beats the training config
    assert cfg.guidance_high == 0.7 and cfg.vae == "ema" and cfg.num_steps == 250
    out = resolve_config(cfg, arch_name="SiT-XL/2", num_stages=1, num_classes=1000, input_size=32,
                         ckpt_config=None)
    assert out.num_steps_per_scale == [250] and out.thresholds == []
    # the training config alone supplies the model settings
    only_train = load_generate_config(["--train-config", str(train), "--ckpt", "c.pt"])
    assert only_train.model == "SiT-XL/2" and only_train.path_type == "cosine" and only_train.method == "euler"
    # mode=ode + heun=true -> heun, in either order
    assert load_generate_config(["--ckpt", "c", "heun=true", "mode=ode"]).method == "heun"
    assert load_generate_config(["--ckpt", "c", "mode=ode", "heun=true"]).method == "heun"
    assert load_generate_config(["--ckpt", "c", "tf32=false"]).precision == "fp32"


def test_trust_checkpoint_is_an_explicit_flag():
    assert load_generate_config(["--ckpt", "c.pt"]).trust_checkpoint is False
    assert load_generate_config(["--ckpt", "c.pt", "--trust-checkpoint"]).trust_checkpoint is True
