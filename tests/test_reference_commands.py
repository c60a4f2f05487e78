"""The commands of the reference README (tests/data/dfm-readme.txt, a verbatim copy of the text
the project was specified from) work here as written, data paths aside: every `--config` file
exists and loads, every option is one of ours or an accepted alias; a missing `--config` file is
one line naming the closest existing files; `--help` speaks of every model family in YAML."""
import os
import re

import pytest

import generate as generate_cli
import train as train_cli
from generation.config import load_generate_config, validate_config
from training.config import parse_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "tests", "data", "dfm-readme.txt")
# a launcher, then the script and its options (the file's line breaks were lost: commands run into the text)
COMMAND = re.compile(r"(?:accelerate launch|torchrun(?: --[\w-]+=\S+)*|python|bash) "
                     r"((?:train|generate|dataset_tools)\.py(?: (?:convert|encode))?|experiments/\S+\.sh)"
                     r"((?:\s+\\?\s*--[\w-]+(?:=\S+|\s+(?!--)[^\s\\]+)?)*)")
OPTION = re.compile(r"--([\w-]+)(?:=(\S+)|\s+(?!--)([^\s\\]+))?")
PLACEHOLDERS = {"[MODEL_NAME]": "SiT-XL/2", "[EXP_NAME]": "my-run",
                "[CONFIG_PATH]": "experiments/train/sit_b_2_256.yaml"}


def _clean(value: str) -> str:
    """A value without the prose glued to it: 'x.yaml#' 'x.ptWe' '[DATA_DIR]where' -> 'x.yaml' 'x.pt' '[DATA_DIR]'."""
    value = value.split("#")[0]
    value = re.sub(r"(?<=[a-z\]\d])[A-Z][a-z]+,?$", "", value)
    return re.sub(r"(?<=\])[a-z]+$", "", value)


def reference_commands():
    """[(script, [(option, value)])] in the order of the README."""
    with open(README) as f:
        text = f.read()
    found = []
    for m in COMMAND.finditer(text):
        options = [(name, _clean(a or b or "")) for name, a, b in OPTION.findall(m.group(2))]
        found.append((m.group(1), options))
    return found


def _argv(options, tmp_path):
    argv = []
    for name, value in options:
        value = PLACEHOLDERS.get(value, value)
        value = re.sub(r"\[[A-Z_]+\]", str(tmp_path), value)  # data paths aside
        argv += [f"--{name}", value]
    return argv


def test_the_readme_copy_holds_the_commands_we_check():
    scripts = [script for script, _ in reference_commands()]
    assert scripts == ["dataset_tools.py convert", "dataset_tools.py encode"] + ["train.py"] * 4 + \
        ["generate.py"] * 4 + ["experiments/evaluation/eval_dfm_sit_b_256.sh"]


@pytest.mark.parametrize("script,options", reference_commands())
def test_each_reference_command_resolves(script, options, tmp_path):
    argv = _argv(options, tmp_path)
    configs = [value for flag, value in zip(argv[::2], argv[1::2]) if flag == "--config"]
    for path in configs:
        assert os.path.isfile(os.path.join(REPO, path)), path
    cwd = os.getcwd()
    os.chdir(REPO)  # the README runs from the repository root
    try:
        if script == "train.py":
            cfg = parse_config(argv)  # every option known, the config loads and validates
            assert cfg.data_dir == str(tmp_path)
            if "experiments/train/dfm_sit_b_256.yaml" in configs:  # the run the README samples from next
                assert (cfg.model, cfg.output_dir, cfg.exp_name) == ("DFM-SiT-B/2", "exps", "dfm-sit-b-2-256px")
        elif script == "generate.py":
            validate_config(load_generate_config(argv))
        elif script.startswith("dataset_tools.py"):
            import dataset_tools
            from data.transforms import parse_resolution

            args = dataset_tools._parse(script.split()[1:] + argv)
            if args.command == "convert":
                assert parse_resolution(args.resolution) == (256, 256)
                assert args.transform == "center-crop-dhariwal"
        else:  # the evaluation script and the configs it names
            with open(script) as f:
                named = re.findall(r"experiments/\S+?\.yaml", f.read())
            assert named and all(os.path.isfile(p) for p in named), named
            for path in named:
                if "/train/" in path:
                    parse_config(["--config", path, "--data-dir", str(tmp_path)])
                else:
                    load_generate_config(["--config", path])
    finally:
        os.chdir(cwd)


def test_the_reference_option_table_names_known_keys_and_models(tmp_path):
    parse_config(["--model", "DFM-SiT-B/2", "--data-dir", str(tmp_path), "stages_count=2", "stage_weights=[0.9,0.1]",
                  "num_steps_per_scale=[40,10]", "stage_sampling_thresholds=[0.1]"])
    validate_config(load_generate_config(["--ckpt", "x.pt", "num_steps_per_scale=[40,10]",
                                          "stage_sampling_thresholds=[0.1]", "stages_count=2"]))
    for name in ("SiT-B/2", "SiT-XL/2", "DFM-SiT-B/2", "DFM-SiT-XL/2"):
        parse_config(["--model", name, "--data-dir", str(tmp_path)])


def test_a_missing_config_is_one_line_naming_the_closest_files(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert train_cli.main(["--config", "experiments/train/dfm_sit_b_512.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: config file experiments/train/dfm_sit_b_512.yaml does not exist; closest existing: "
                   "experiments/train/dfm_sit_b_2_512.yaml, experiments/train/dfm_sit_b_256.yaml, "
                   "experiments/train/dfm_sit_xl_2_512.yaml")
    assert generate_cli.main(["--config", "experiments/generation/dfm_sit_b_2_256.yaml", "--ckpt", "x.pt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("generate.py: error: config file experiments/generation/dfm_sit_b_2_256.yaml does not "
                          "exist; closest existing: experiments/generation/dfm_sit_b_256.yaml")
    assert "\n" not in err


def test_an_oversized_config_is_refused_before_parsing(tmp_path, capsys):
    big = tmp_path / "huge.yaml"
    big.write_text("lr: 1.0e-4\n" + "# padding\n" * 120_000)  # 1.2 MB
    assert train_cli.main(["--config", str(big)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: config file {big} is 1.1 MiB; a config file is at most 1 MiB (a few hundred lines of "
        "key: value): is it the right file?")


def test_include_layers_a_config_on_another(tmp_path):
    (tmp_path / "base.yaml").write_text("model: SiT-B/2\nlr: 0.5\npreview:\n  num_samples: 3\n  cfg_scale: 2.0\n")
    (tmp_path / "child.yaml").write_text("include: base.yaml\nlr: 0.25\npreview:\n  num_samples: 5\n")
    cfg = parse_config(["--config", str(tmp_path / "child.yaml"), "--data-dir", str(tmp_path)])
    assert (cfg.model, cfg.lr, cfg.preview.num_samples, cfg.preview.cfg_scale) == ("SiT-B/2", 0.25, 5, 2.0)
    (tmp_path / "loop.yaml").write_text("include: loop.yaml\n")
    with pytest.raises(Exception, match="goes round in a circle"):
        parse_config(["--config", str(tmp_path / "loop.yaml"), "--data-dir", str(tmp_path)])


@pytest.mark.parametrize("cli", [train_cli, generate_cli])
def test_help_names_every_model_family_and_prints_yaml_defaults(cli, capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    header = text.split("\n\n")[0]
    for family in ("SiT", "DFM-SiT", "ELIT-SiT", "DFM-ELIT-SiT"):
        assert family in header
    defaults = re.findall(r"^  [\w.]+ = (.*?)(?:   #|$)", text, flags=re.M)
    assert len(defaults) > 20
    assert not [d for d in defaults if d in ("None", "False", "True") or d.startswith("[") and "None" in d]
    assert "null" in defaults and "false" in defaults
    if cli is train_cli:
        assert "REPA" in header
        assert "  stages = null   #" in text and "  stage_sampling = per_batch   #" in text
