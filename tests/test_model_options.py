"""Model options are checked by their signature: every constructor argument of SiT / ELITSiT has an
annotated type and range (utils.registry's Annotated vocabulary), checked in one place
(models.registry._model_config) for the command line, YAML, a stored arch in a .pt checkpoint and a
.safetensors header alike; a model's size is bounded before anything is allocated."""
import typing
from typing import Annotated, List, Optional

import pytest
import torch
import yaml

import models.registry as registry
from conftest import crafted_checkpoint
from models import create_model, load_pretrained
from utils.registry import Above, AtLeast, Between, RegistryError, check_arguments

TINY = dict(depth=2, hidden_size=64, num_heads=4, input_size=8, in_channels=4, num_classes=10)

# (option, value, what the one line says); every one trains a broken model or crashed with a traceback before
BAD_OPTIONS = [
    ("depth", 0, "model option 'depth' must be an integer in [1, 1024], got 0"),
    ("depth", -3, "model option 'depth' must be an integer in [1, 1024], got -3"),
    ("depth", True, "model option 'depth' must be an integer, got True"),
    ("depth", "2", "model option 'depth' must be an integer, got '2'"),
    ("depth", 2.5, "model option 'depth' must be an integer, got 2.5"),
    ("depth", 100000, "model option 'depth' must be an integer in [1, 1024], got 100000"),
    ("mlp_ratio", 1e-9, "mlp_ratio 1e-09 gives the MLP int(hidden_size * mlp_ratio) = 0 units; it needs at least 1"),
    ("mlp_ratio", -1.0, "model option 'mlp_ratio' must be a finite number in (0, 1024], got -1.0"),
    ("num_heads", 0, "model option 'num_heads' must be an integer in [1, 1048576], got 0"),
    ("num_heads", 5, "num_heads (5) must divide hidden_size (64)"),
    ("input_size", -16, "model option 'input_size' must be an integer in [1, 1048576], got -16"),
    ("stages", 10**6, "model option 'stages' must be an integer in [1, 16], got 1000000"),
    ("class_dropout_prob", 2.0, "model option 'class_dropout_prob' must be a finite number in [0, 1], got 2.0"),
    ("z_dims", [768, 0], "model option 'z_dims' must be an integer in [1, 1048576], got 0"),
    ("stage_scales", [1.0, float("nan")], "model option 'stage_scales' must be a finite number, got nan"),
    ("mlp_ratio", 1e30, "model option 'mlp_ratio' must be a finite number in (0, 1024], got 1e+30"),
    ("hidden_size", 10**400, "model option 'hidden_size' must be an integer in [1, 1048576], got an integer of "
                             "about 400 digits"),
]


@pytest.mark.parametrize("option, value, message", BAD_OPTIONS, ids=[f"{o}={str(v)[:12]}" for o, v, _ in BAD_OPTIONS])
def test_a_bad_option_is_one_line_naming_it(option, value, message):
    with pytest.raises(ValueError) as info:
        create_model("DFM-SiT-S/2", **{**TINY, option: value})
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text and len(text) < 200, text


def test_elit_options_have_their_ranges_too():
    elit = dict(TINY, depth=3, encoder_depth=1, elit_tail_depth=1, group_size=2)
    create_model("ELIT-SiT-S/2", **elit)
    for option, value, message in [
            ("elit_max_mask_prob", 1.0, "model option 'elit_max_mask_prob' must be a finite number in [0, 1), got 1.0"),
            ("elit_tail_depth", -1, "model option 'elit_tail_depth' must be an integer in [0, 1024], got -1"),
            ("group_size", 0, "model option 'group_size' must be an integer in [1, 1048576], got 0")]:
        with pytest.raises(ValueError) as info:
            create_model("ELIT-SiT-S/2", **{**elit, option: value})
        assert str(info.value) == message


def test_the_range_vocabulary_coerces_and_bounds_any_signature():
    def entry(count: Annotated[int, AtLeast(1)] = 1, rate: Annotated[float, Above(0)] = 1.0,
              share: Optional[Annotated[float, Between(0, 1, high_open=True)]] = None,
              sizes: List[Annotated[int, AtLeast(2)]] = ()):
        return count, rate, share, sizes

    assert check_arguments(entry, {"count": 3.0, "rate": 2, "share": None, "sizes": (2, 5)}, "x") == \
        {"count": 3, "rate": 2.0, "share": None, "sizes": [2, 5]}
    assert isinstance(check_arguments(entry, {"rate": 2}, "x")["rate"], float)
    for given, message in [({"count": 0}, "x 'count' must be an integer >= 1, got 0"),
                           ({"rate": 0.0}, "x 'rate' must be a finite number > 0, got 0.0"),
                           ({"share": 1.0}, "x 'share' must be a finite number in [0, 1), got 1.0"),
                           ({"sizes": [2, 1]}, "x 'sizes' must be an integer >= 2, got 1"),
                           ({"rate": 10**400}, "x 'rate' must be a finite number, got an integer of about 400 digits")]:
        with pytest.raises(RegistryError) as info:
            check_arguments(entry, given, "x")
        assert str(info.value) == message
    assert typing.get_type_hints(entry, include_extras=True)["count"].__metadata__ == (AtLeast(1),)


def test_help_shows_the_ranges_of_registered_parts():
    from models.blocks import ATTENTIONS, MLPS

    @MLPS.register("test_ranged", replace=True)
    def ranged(dim: int, hidden: int, width: Annotated[float, Above(0)] = 0.5):
        return torch.nn.Linear(dim, dim)

    try:
        assert MLPS.signature_text("test_ranged") == "width: float > 0 = 0.5"
        with pytest.raises(ValueError, match=r"^MLP 'test_ranged': parameter 'width' must be a finite number > 0, "
                                             r"got -1"):
            MLPS.split({"name": "test_ranged", "width": -1})
        assert ATTENTIONS.signature_text("rope") == "base: float = 100.0"  # unannotated ranges stay as they were
    finally:
        MLPS.unregister("test_ranged")


def test_command_line_yaml_and_top_level_keys_pass_the_same_check(tiny_data, tmp_path):
    from training.config import ConfigError, parse_config

    from train_helpers import tiny_argv

    def fails(argv, message):
        with pytest.raises(ConfigError) as info:
            parse_config(argv)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)

    base = tiny_argv(tiny_data, str(tmp_path))
    fails(base + ["model_overrides={depth: 0, hidden_size: 64, num_heads: 4}"],
          "model option 'depth' must be an integer in [1, 1024], got 0")
    fails(base + ["model_overrides={depth: true, hidden_size: 64, num_heads: 4}"],
          "model option 'depth' must be an integer, got True")
    fails(base + ["model_overrides={depth: 2, hidden_size: 64, num_heads: 4, mlp_ratio: 1e-9}"],
          "mlp_ratio 1e-09 gives the MLP int(hidden_size * mlp_ratio) = 0 units")
    fails(base + ["encoder_depth=-1"], "model option 'encoder_depth' must be an integer in [0, 1024], got -1")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model_overrides": {"depth": 2, "hidden_size": 64, "num_heads": 0}}))
    without = [a for a in base if not a.startswith("model_overrides=")]  # the command line would win over the file
    fails(without + [f"--config={config}"], "model option 'num_heads' must be an integer in [1, 1048576], got 0")
    parse_config(base)  # the unchanged tiny run is fine


STORED = [  # (edit of the stored arch, what the one line names)
    (lambda a: a.update(depth="2"), "model option 'depth' must be an integer, got '2'"),
    (lambda a: a.update(depth=2.5), "model option 'depth' must be an integer, got 2.5"),
    (lambda a: a.pop("name"), "the architecture has no model 'name'"),
    (lambda a: a.update(num_heads=0), "model option 'num_heads' must be an integer in [1, 1048576], got 0"),
    (lambda a: a.update(input_size=-16), "model option 'input_size' must be an integer in [1, 1048576], got -16"),
    (lambda a: a.update(stages=10**6), "model option 'stages' must be an integer in [1, 16], got 1000000"),
]


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("case", range(len(STORED)), ids=["depth-str", "depth-float", "no-name", "heads-0",
                                                          "input-negative", "stages-1e6"])
def test_a_damaged_stored_arch_is_one_line_naming_the_field(tmp_path, capsys, fmt, case):
    import generate

    edit, message = STORED[case]
    path = crafted_checkpoint(tmp_path, fmt, edit)
    with pytest.raises(ValueError) as info:
        load_pretrained(path)
    assert message in str(info.value) and str(info.value).startswith("the architecture stored in the checkpoint")
    assert generate.main(["--ckpt", path, f"sample_dir={tmp_path / 'samples'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"generate.py: error: cannot load checkpoint {path}") and message in err and "\n" not in err
    assert not (tmp_path / "samples").exists()


def test_size_is_bounded_before_anything_is_allocated(monkeypatch):
    built = create_model("SiT-S/2", **TINY)
    count = sum(t.numel() for t in list(built.parameters()) + list(built.buffers()))
    monkeypatch.setattr(registry, "MAX_PARAMETERS", count)  # the limit itself is allowed
    create_model("SiT-S/2", **TINY)
    monkeypatch.setattr(registry, "MAX_PARAMETERS", count - 1)
    allocated = []
    real_empty = torch.empty

    def watch(*args, **kwargs):  # every tensor nn modules allocate starts as torch.empty
        out = real_empty(*args, **kwargs)
        if out.device.type != "meta" and out.numel() > 1:
            allocated.append(out.shape)
        return out

    monkeypatch.setattr(torch, "empty", watch)
    with pytest.raises(ValueError, match=rf"^SiT-S/2 with these options has more than {count - 1:,} parameters "
                                         r"\(the limit, models.registry.MAX_PARAMETERS; exceeded at "):
        create_model("SiT-S/2", **TINY)
    assert allocated == []  # sized on the meta device: nothing real was allocated
    monkeypatch.setattr(registry, "MAX_PARAMETERS", 4 * 10**9)
    with pytest.raises(ValueError, match="more than 4,000,000,000 parameters .* at Linear.weight of "
                                         "1,000,000,000,000 values"):
        create_model("SiT-S/2", hidden_size=10**6, num_heads=1)  # 4 TB of weights: one line at once
    assert allocated == []
    monkeypatch.setattr(registry, "_machine_memory", lambda: 4 * count - 1)  # float32: 4 bytes a value
    with pytest.raises(ValueError, match=r"GiB of weights, more than this machine's .* GiB of memory"):
        create_model("SiT-S/2", **TINY)
    assert allocated == []


def test_stored_archs_of_every_frozen_fixture_still_pass():
    """The check changes no valid arch: the frozen fixtures' stored archs (written by main @402bfaf)
    and every model name with its defaults build the same canonical arch as before."""
    import os

    from models.checkpoints import read_checkpoint, stored_arch
    from models.registry import MODEL_NAMES, canonical_arch, skeleton_model

    frozen = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "frozen")
    for run in ("dfm", "calibrated", "sit", "elit"):
        for fmt in ("pt", "safetensors"):
            arch = stored_arch(read_checkpoint(os.path.join(frozen, f"{run}.{fmt}")))
            assert canonical_arch(arch) == canonical_arch(skeleton_model(**arch).arch)
    for name in MODEL_NAMES:
        assert skeleton_model(name).arch["name"] == name
