"""Resuming checks what it resumes (training.resume_check): a checkpoint whose fields are damaged
(an EMA of the wrong shape, a missing model key, a config stored as a string, a skipped-step counter
'abc', a damaged arch, non-finite weights) is skipped by resume=auto, which falls back to the previous
checkpoint, and is one line naming the file and the field for an explicit resume=FILE."""
import logging
import os
import shutil

import pytest
import torch

from training.checkpoint import atomic_torch_save, checkpoint_path, select_resume_checkpoint
from training.errors import ConfigError
from training.loop import train
from training.resume_check import check_resume_state
from training.setup import resume_target

from train_helpers import load_ckpt, tiny_config


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """A tiny run's folder with its checkpoints of steps 2 and 4 (read only: copy it)."""
    out = str(tmp_path_factory.mktemp("resume_checks"))
    return train(tiny_config(tiny_data, out, exp_name="base")).exp_dir


def _damaged_copy(finished_run, tmp_path, edit):
    """A copy of the run whose step-4 checkpoint was rewritten (with a valid checksum) after `edit(ckpt)`."""
    exp = str(tmp_path / "run")
    shutil.copytree(finished_run, exp)
    ckpt = load_ckpt(checkpoint_path(exp, 4))
    edit(ckpt)
    atomic_torch_save(ckpt, checkpoint_path(exp, 4))
    return exp


def _set(part, key, value):
    return lambda ckpt: ckpt[part].__setitem__(key, value)


def _drop(*parts, key="final_layer.projections.1.linear.bias"):
    return lambda ckpt: [ckpt[part].pop(key) for part in parts]


def _nan_ema(ckpt):
    ckpt["ema"]["blocks.0.attn.qkv.weight"][1, 2] = float("nan")


DAMAGE = {  # name: (edit of the checkpoint, what the one line says)
    "ema-shape": (_set("ema", "blocks.0.mlp.fc1.weight", torch.zeros(3, 3)),
                  "its ema['blocks.0.mlp.fc1.weight'] has shape (3, 3), the model's (256, 64)"),
    "model-key-missing": (_drop("model"), "its model and EMA weights hold different tensors (only the EMA has "
                                          "final_layer.projections.1.linear.bias)"),
    "key-missing-from-both": (_drop("model", "ema"), "its arch (DFM-SiT-S/4) and weights do not go together: "
                                                     "checkpoint does not match DFM-SiT-S/4; missing keys: "
                                                     "final_layer.projections.1.linear.bias"),
    "config-string": (lambda c: c.__setitem__("config", "model: DFM-SiT-S/4"),
                      "its 'config' entry is a str, not a mapping of the run's settings"),
    "skipped-abc": (lambda c: c.__setitem__("nonfinite", {"skipped_steps": "abc", "skipped_in_a_row": 0}),
                    "its nonfinite.skipped_steps is 'abc', not a non-negative integer count of skipped steps"),
    "arch-depth-string": (_set("arch", "depth", "2"), "model option 'depth' must be an integer, got '2'"),
    "arch-no-name": (lambda c: c["arch"].pop("name"), "the architecture has no model 'name'"),
    "arch-heads-0": (_set("arch", "num_heads", 0), "model option 'num_heads' must be an integer in [1, 1048576]"),
    "nan-ema": (_nan_ema, "its EMA weights are not finite: 'blocks.0.attn.qkv.weight' holds NaN or inf values"),
    "opt-list": (lambda c: c.__setitem__("opt", []), "its 'opt' entry is not an optimizer state dict"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_and_an_explicit_one_is_one_line(finished_run, tmp_path, tiny_data,
                                                                                case):
    edit, message = DAMAGE[case]
    exp = _damaged_copy(finished_run, tmp_path, edit)
    newest = checkpoint_path(exp, 4)
    choice = select_resume_checkpoint(exp, check=check_resume_state)
    assert choice.path == checkpoint_path(exp, 2) and choice.state["steps"] == 2
    assert len(choice.rejected) == 1 and choice.rejected[0][0] == newest and message in choice.rejected[0][1]
    assert choice.messages() == [f"WARNING: skipping corrupt checkpoint {newest}: {choice.rejected[0][1]}"]
    cfg = tiny_config(tiny_data, str(tmp_path), exp_name="run", resume=newest)
    with pytest.raises(ConfigError) as info:
        resume_target(cfg, exp, logging.getLogger("test"))
    text = str(info.value)
    assert text.startswith(f"resume: checkpoint {newest} cannot be resumed from: ") and message in text, text
    assert "\n" not in text
    check_resume_state(load_ckpt(checkpoint_path(exp, 2)))  # the genuine one passes


def test_resume_auto_over_a_nan_ema_trains_on_from_the_previous_checkpoint(finished_run, tmp_path, tiny_data):
    """Before: the NaN EMA was resumed, trained on and written into every later checkpoint."""
    exp = _damaged_copy(finished_run, tmp_path, _nan_ema)
    result = train(tiny_config(tiny_data, str(tmp_path), exp_name="run", max_train_steps=6))
    log = open(os.path.join(exp, "log.txt")).read()
    assert f"skipping corrupt checkpoint {checkpoint_path(exp, 4)}: its EMA weights are not finite" in log
    assert f"resuming from {checkpoint_path(exp, 2)} at step 2" in log
    final = load_ckpt(result.last_checkpoint)
    assert final["steps"] == 6
    assert all(torch.isfinite(t).all() for part in ("model", "ema") for t in final[part].values())
    # the resumed run repeats the original steps 3 and 4 exactly (resume is exact), so its step-4
    # checkpoint is the original's (the damaged file was replaced by the good one)
    original = load_ckpt(os.path.join(finished_run, "checkpoints", "0000004.pt"))
    again = load_ckpt(checkpoint_path(exp, 4))
    assert all(torch.equal(again["ema"][k], original["ema"][k]) for k in original["ema"])


def test_an_explicit_damaged_counter_stops_train_py_with_one_line(finished_run, tmp_path, tiny_data, capsys):
    import train as train_cli

    from train_helpers import tiny_argv

    exp = _damaged_copy(finished_run, tmp_path, DAMAGE["skipped-abc"][0])
    newest = checkpoint_path(exp, 4)
    argv = tiny_argv(tiny_data, str(tmp_path), exp_name="run", resume=newest, max_train_steps=6,
                     on_nonfinite="skip")
    assert train_cli.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and "Traceback" not in errors[0], errors
    assert f"resume: checkpoint {newest} cannot be resumed from: its nonfinite.skipped_steps is 'abc'" in errors[0]
