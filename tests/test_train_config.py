"""Config loading and validation: precedence, and one clear error per bad input."""
import os

import pytest

from training.config import ConfigError, parse_config
from training.loop import check_batch_split
from utils.config import save_config


BASE = ["data_dir=/nonexistent-ok-for-parsing"]


def test_precedence_defaults_yaml_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: SiT-B/2\nlr: 2.0e-4\nbatch_size: 128\npreview: {cfg_scale: 4.0}\n")
    cfg = parse_config(["--config", str(path), "--batch-size", "64", "--data-dir=/d", "preview.method=heun"])
    assert cfg.model == "SiT-B/2" and cfg.stages == 1 and cfg.stage_weights == [1.0]
    assert cfg.lr == pytest.approx(2e-4)            # from YAML
    assert cfg.batch_size == 64 and cfg.data_dir == "/d"  # overrides beat YAML
    assert cfg.preview.cfg_scale == 4.0 and cfg.preview.method == "heun"
    assert cfg.weight_decay == 0.0 and cfg.ema_decay == 0.9999  # defaults (SPEC §6)
    assert cfg.preview.num_steps_per_scale == [50] and cfg.preview.thresholds == []
    dfm_cfg = parse_config(BASE + ["model=DFM-SiT-XL/2"])
    assert dfm_cfg.stages == 2 and dfm_cfg.stage_weights == [0.9, 0.1]
    assert dfm_cfg.preview.num_steps_per_scale == [40, 10] and dfm_cfg.preview.thresholds == [0.1]
    assert dfm_cfg.exp_name == "dfm-sit-xl-2-256-lognormal"


def test_save_config_roundtrip(tmp_path):
    cfg = parse_config(BASE + ["model=DFM-SiT-B/2", "stages=3", "resolution=512"])
    save_config(cfg, tmp_path / "c.yaml")
    again = parse_config(["--config", str(tmp_path / "c.yaml")])
    assert again == cfg
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


@pytest.mark.parametrize("argv, words", [
    (["lrr=1e-4"], ["lrr", "Did you mean: lr"]),
    (["preview.cfg_scal=2"], ["preview.cfg_scal", "preview.cfg_scale"]),
    (["lr=fast"], ["'lr'"]),
    (["stage_weights=[0.5,0.4]"], ["stage_weights", "sum to 1"]),
    (["stage_weights=[0.5,0.3,0.2]"], ["stage_weights", "one entry per stage"]),
    (["model=SiT-XL/2", "stages=2"], ["stages", "plain SiT"]),
    (["model=DFM-SiT-XL/3"], ["model", "unknown name"]),
    (["weighting=cosmic"], ["time_distribution (weighting)", "unknown time distribution 'cosmic'", "uniform"]),
    (["prediction=epsilon"], ["prediction", "unknown prediction target 'epsilon'"]),
    (["model=DFM-SiT-XL/8", "resolution=96"], ["patch size 8", "12"]),
    (["model=DFM-SiT-XL/2", "stages=4", "resolution=32"], ["stages=4", "divisible"]),
    (["proj_coeff=0.5"], ["proj_coeff", "DINOv2"]),
    (["model_overrides={input_size: 8}"], ["model_overrides.input_size", "resolution"]),
    (["preview.thresholds=[0.1,0.2]", "stages=3", "model=DFM-SiT-B/2"], ["thresholds", "decreasing"]),
    (["batch_size=10", "gradient_accumulation_steps=4"], ["batch_size", "gradient_accumulation_steps"]),
    (["resume=/no/such/file.pt"], ["resume", "does not exist"]),
    (["not-an-assignment"], ["Cannot parse"]),
    (["seed=99999999999999999999"], ["seed must be between -2**40 and 2**40"]),  # was a torch traceback
    ([f"seed={-2 ** 40 - 1}"], ["seed", str(-2 ** 40 - 1)]),
    (["num_workers=257"], ["num_workers must be at most 256"]),  # 10**20 started workers until killed
    (["preview.num_steps_per_scale=[99999999999999999999,10]"], ["at most 100,000 steps"]),
])
def test_config_errors_name_the_key(argv, words):
    with pytest.raises(ConfigError) as err:
        parse_config(BASE + argv)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_missing_data_dir_and_yaml_unknown_key(tmp_path):
    with pytest.raises(ConfigError, match="data_dir is not set"):
        parse_config([])
    path = tmp_path / "bad.yaml"
    path.write_text("modle: SiT-B/2\n")
    with pytest.raises(ConfigError, match=r"Unknown config key 'modle' in config file .*Did you mean: model"):
        parse_config(BASE + ["--config", str(path)])
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        parse_config(BASE + ["--config", str(tmp_path / "missing.yaml")])


def test_batch_split_across_processes():
    cfg = parse_config(BASE + ["batch_size=256", "gradient_accumulation_steps=2"])
    assert check_batch_split(cfg, 8) == 16
    with pytest.raises(ConfigError, match="cannot be split evenly over 3 processes"):
        check_batch_split(cfg, 3)


def test_every_shipped_config_validates():
    folder = os.path.join(os.path.dirname(__file__), "..", "experiments", "train")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".yaml"))
    assert "demo_cpu.yaml" in names and len(names) >= 9
    seen = {}
    for name in names:
        cfg = parse_config(["--config", os.path.join(folder, name), "data_dir=/x"])
        seen[name] = cfg
    # The baseline uses the same timestep weighting as DFM (SPEC §4).
    for name, cfg in seen.items():
        if name.startswith("sit_") and "uniform" not in name:
            twin = seen[name.replace("sit_", "dfm_sit_", 1)]
            assert cfg.time_distribution == twin.time_distribution and cfg.model == twin.model.replace("DFM-", "")
            assert cfg.batch_size == twin.batch_size == 256 and cfg.lr == twin.lr
    # The reference baselines behind the published 18.97 / 21.82 (SPEC §9) use uniform timesteps.
    for res in (256, 512):
        uniform, ours = seen[f"sit_xl_2_{res}_uniform.yaml"], seen[f"sit_xl_2_{res}.yaml"]
        assert uniform.time_distribution == "uniform" and ours.time_distribution == "lognormal"
        assert {k: v for k, v in uniform.items() if k not in ("time_distribution", "exp_name")} == \
            {k: v for k, v in ours.items() if k not in ("time_distribution", "exp_name")}


def test_evaluation_scripts_defaults_resolve_against_their_training_config():
    """Each eval script's default CKPT is the final checkpoint its TRAIN_CONFIG run writes, and its
    generation config exists."""
    import re

    from training.checkpoint import checkpoint_path

    root = os.path.join(os.path.dirname(__file__), "..")
    folder = os.path.join(root, "experiments", "evaluation")
    scripts = sorted(n for n in os.listdir(folder) if n.startswith("eval_") and n.endswith(".sh"))
    assert len(scripts) >= 8
    for name in scripts:
        text = open(os.path.join(folder, name)).read()
        train_cfg = re.search(r"TRAIN_CONFIG=\$\{TRAIN_CONFIG:-([^}]+)\}", text).group(1)
        ckpt = re.search(r"CKPT=\$\{CKPT:-([^}]+)\}", text).group(1)
        gen_cfg = re.search(r"generate_and_evaluate.sh\" (\S+)", text).group(1)
        cfg = parse_config(["--config", os.path.join(root, train_cfg), "data_dir=/x"])
        want = checkpoint_path(os.path.join(cfg.output_dir, cfg.exp_name), cfg.max_train_steps)
        assert ckpt == want, (name, ckpt, want)
        assert os.path.isfile(os.path.join(root, gen_cfg)), (name, gen_cfg)
        assert f"bash experiments/evaluation/{name}" in text  # the usage line names the script itself


def test_text_keys_keep_their_text_and_flags():
    cfg = parse_config(BASE + ["mixed_precision=no", "exp_name=null", "--compile", "resume=null", "vae=none"])
    assert cfg.mixed_precision == "no"          # YAML would read a bare `no` as False
    assert cfg.exp_name == "dfm-sit-xl-2-256px-lognormal"  # null -> derived name (pixel space)
    assert cfg.compile is True and cfg.resume == "none" and cfg.vae == "none"


def test_evaluation_inherits_the_preview_method_and_specs_replace_whole():
    cfg = parse_config(BASE + ["preview.method={name: sde, last_noisy_time: 0.05}", "preview.num_steps_per_scale=[8,4]"])
    assert cfg.eval_sampler.method == {"name": "sde", "last_noisy_time": 0.05}  # null = the preview's, like its steps
    assert list(cfg.eval_sampler.num_steps_per_scale) == [8, 4]
    # a later spec replaces an earlier one whole (no stale last_noisy_time merged into euler)
    cfg = parse_config(BASE + ["preview.method={name: sde, last_noisy_time: 0.05}", "preview.method=euler"])
    assert cfg.preview.method == "euler" and cfg.eval_sampler.method == "euler"
    with pytest.raises(ConfigError, match=r"preview.method: sampler method 'sde' takes no parameter 'tau'; its "
                                          r"parameters: last_noisy_time: float = 0.04"):
        parse_config(BASE + ["preview.method={name: sde, tau: 0.1}"])


def test_default_experiment_names_tell_different_runs_apart(tmp_path):
    from training.config import NAMING

    base = BASE + [f"output_dir={tmp_path}"]
    plain = parse_config(base)
    assert plain.exp_name == "dfm-sit-xl-2-256-lognormal"  # the defaults: today's name
    names = {parse_config(base + extra).exp_name for extra in
             (["lr=2e-4"], ["seed=1"], ["stage_weights=[0.6,0.4]"], ["stage_scales=auto"], ["stage_sampling=per_sample"])}
    assert len(names) == 5 and all(n.startswith("dfm-sit-xl-2-256-lognormal-") and len(n) == len("dfm-sit-xl-2-256-lognormal-") + 8 for n in names)
    assert parse_config(base + ["lr=2e-4"]).exp_name == parse_config(base + ["lr=2e-4"]).exp_name  # stable
    logit = parse_config(base + ["time_distribution={name: logit_normal, loc: 0.5}"]).exp_name
    assert logit.startswith("dfm-sit-xl-2-256-logit_normal-loc0.5-")
    # a folder of the plain name from before the hash, holding the same run, is kept
    old = tmp_path / "dfm-sit-xl-2-256-lognormal"
    old.mkdir()
    seeded = parse_config(base + ["seed=1"])
    save_config({**dict(seeded), "exp_name": old.name}, old / "config.yaml")
    assert parse_config(base + ["seed=1"]).exp_name == old.name
    assert parse_config(base + ["seed=2"]).exp_name != old.name
    assert NAMING.default_exp_name(seeded, None, pixel=False) == old.name
