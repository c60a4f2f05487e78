"""Post-hoc EMA snapshots that know their run: what the reconstruction reads and refuses, float16 and
old float32 snapshots, thinning, and the profiles a resume restores."""
import math
import os

import numpy as np
import pytest
import torch

from conftest import tiny_model
from models.weights_io import export_weights, read_weights_file
from training.errors import ConfigError
from training.posthoc_ema import (PowerEMA, keeps, kept_steps, main, reconstruct, solve_coefficients,
                                  std_to_exponent)
from training.posthoc_ema.snapshot_file import SnapshotError, open_snapshot
from training.posthoc_ema.snapshots import TAIL, SnapshotStore, snapshot_path

STDS = [0.05, 0.1]
RUN = "20260101T000000Z-0000000a"


def write_run(exp_dir, steps, run=RUN, dtype="float32", seed=0, legacy=False, keep=0, every=None, legacy_upto=None):
    """Snapshots of random profile weights at `steps` (t = step), as the store writes them (or, with
    `legacy`, as the version before run identities wrote them: float32, no run). {step: [state dicts]}."""
    model = tiny_model(depth=1)
    g = torch.Generator().manual_seed(seed)
    store = SnapshotStore(str(exp_dir), run, legacy_upto, every or steps[0], keep, dtype)
    written = {}
    for step in steps:
        profiles = [{k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                     for k, v in model.state_dict().items()} for _ in STDS]
        if legacy:
            export_weights(snapshot_path(str(exp_dir), step), {f"p{i}": p for i, p in enumerate(profiles)},
                           arch=dict(model.arch), config={"seed": 0}, steps=step,
                           weights_info={"kind": "posthoc_ema_snapshot", "stds": STDS, "t": step})
        else:
            store.write(step, profiles, STDS, step, dict(model.arch), {"seed": 0})
        written[step] = profiles
    return written


def expected(written, std, cast=torch.float32):
    """The reconstruction by hand: the coefficients of the kernels, applied in float64 to the stored weights."""
    steps = sorted(written)
    times = [s for s in steps for _ in STDS]
    x, _ = solve_coefficients(times, [std_to_exponent(s) for _ in steps for s in STDS], steps[-1],
                              std_to_exponent(std))
    stored = [p for s in steps for p in written[s]]
    return {k: sum(float(c) * p[k].to(cast).double() for c, p in zip(x, stored)) for k in stored[0]}


def rewrite(path, info=None, steps=None, tensors=None):
    """Rewrite a snapshot with header fields or tensors changed (an edited or foreign file)."""
    ck = read_weights_file(path)
    groups = {g: ck[g] for g in ck if g.startswith("p")}
    for name, value in (tensors or {}).items():
        group, _, key = name.partition(".")
        groups[group][key] = value
    export_weights(path, groups, arch=ck["arch"], config=ck.get("config"),
                   steps=ck["steps"] if steps is None else steps, weights_info={**ck["weights_info"], **(info or {})})


def one_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("posthoc_ema: error: "), err
    return err


def test_old_float32_snapshots_still_reconstruct(tmp_path):
    written = write_run(tmp_path, [100, 200, 300, 400, 500, 600], legacy=True)
    [record] = reconstruct(str(tmp_path), [0.07])
    assert record["run"] == "" and record["snapshots"] == 6 and record["step"] == 600
    got = read_weights_file(record["path"])["ema"]
    for key, want in expected(written, 0.07).items():
        torch.testing.assert_close(got[key].double(), want, rtol=1e-5, atol=1e-6)


def test_float16_snapshots_reconstruct_what_they_store(tmp_path):
    written = write_run(tmp_path, [100, 200, 300, 400], dtype="float16")
    stored = read_weights_file(snapshot_path(str(tmp_path), 400))
    key = next(k for k, v in written[400][0].items() if v.is_floating_point())
    assert stored["p0"][key].dtype == torch.float16 and torch.equal(stored["p0"][key], written[400][0][key].half())
    [record] = reconstruct(str(tmp_path), [0.07])
    got = read_weights_file(record["path"])["ema"]
    for key, want in expected(written, 0.07, torch.float16).items():
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key].double(), want, rtol=1e-5, atol=1e-6)


def test_a_tensor_beyond_float16_stays_float32(tmp_path):
    store = SnapshotStore(str(tmp_path), RUN, None, 10, 0, "float16")
    big, small = torch.full((3,), 1e6), torch.full((3,), 0.5)
    store.write(10, [{"a": big, "b": small}], [0.05], 10, {"name": "x"}, {})
    ck = read_weights_file(snapshot_path(str(tmp_path), 10))
    assert ck["p0"]["a"].dtype == torch.float32 and torch.equal(ck["p0"]["a"], big)
    assert ck["p0"]["b"].dtype == torch.float16


def test_the_thinning_rule_keeps_its_promises():
    every, keep = 3, 4
    previous = set()
    for now in range(every, 3000 + 1, every):
        kept = kept_steps(now, every, keep)
        assert set(kept) <= previous | {now}  # a dropped snapshot never comes back: kill and resume agree
        assert {now - i * every for i in range(min(TAIL, now // every))} <= set(kept)  # the newest, `every` apart
        gaps = np.diff([0] + kept)
        assert gaps.max() <= max(every, now / keep)  # the whole run covered at T/keep or finer
        bound = 2 * keep + (TAIL + 1) * (math.log2(max(now / (keep * every), 1)) + 1) + 1
        assert len(kept) <= bound, (now, len(kept), bound)
        previous = set(kept)
    assert kept_steps(3000, every, 0) == list(range(every, 3001, every))  # keep = 0: everything
    assert keeps(1000, 1000, 500, 2) and keeps(1001, 5000, 500, 2)  # the newest; off the grid


def test_thinning_deletes_only_this_runs_checked_snapshots(tmp_path):
    write_run(tmp_path, [1, 2, 3, 4, 5, 6], run="20250101T000000Z-0000000b")  # another run, same grid
    folder = tmp_path / "posthoc_ema"
    os.rename(folder / "0000003.safetensors", folder / "0000013.safetensors")  # damaged: its header says step 3
    os.mkfifo(folder / "0000014.safetensors")
    (folder / "0000015.safetensors").mkdir()
    others = sorted(os.listdir(folder))
    write_run(tmp_path, list(range(16, 41)), keep=2, every=1)
    mine = sorted(n for n in os.listdir(folder) if n not in others)
    assert mine == [f"{s:07d}.safetensors" for s in kept_steps(40, 1, 2) if s >= 16]
    assert set(others) <= set(os.listdir(folder))


def test_snapshots_of_another_run_are_left_out(tmp_path, capsys):
    old = write_run(tmp_path, [100, 200, 300, 400, 500, 600], run="20250101T000000Z-0000000b", seed=1)
    new = write_run(tmp_path, [100, 200, 300, 400], seed=2)  # started later over the old run's folder
    assert main([str(tmp_path), "--std", "0.07"]) == 0
    out, err = capsys.readouterr()
    assert "at step 400" in out and "4 snapshots" in out
    assert err.strip() == (f"posthoc_ema: note: left out 2 snapshot(s) of other runs in {tmp_path}/posthoc_ema "
                           "(20250101T000000Z-0000000b; --run chooses the run)")
    got = read_weights_file(str(tmp_path / "posthoc_ema/reconstructed/0000400-std0.07.safetensors"))["ema"]
    for key, want in expected(new, 0.07).items():
        torch.testing.assert_close(got[key].double(), want, rtol=1e-5, atol=1e-6)
    [record] = reconstruct(str(tmp_path), [0.05], run_id="20250101T000000Z-0000000b")  # the old run's last two
    assert record["step"] == 600 and record["snapshots"] == 2  # std 0.05 is its stored profile p0
    torch.testing.assert_close(read_weights_file(record["path"])["ema"]["pos_embed"], old[600][0]["pos_embed"])


def test_swapped_files_are_refused(tmp_path, capsys):
    write_run(tmp_path, [4, 8, 12, 16])
    a, b = snapshot_path(str(tmp_path), 4), snapshot_path(str(tmp_path), 16)
    os.rename(a, a + ".x")
    os.rename(b, a)
    os.rename(a + ".x", b)
    err = one_error(capsys, [str(tmp_path), "--std", "0.07"])
    assert err == (f"posthoc_ema: error: post-hoc EMA snapshot {a} is damaged (its header says step 16, its name step "
                   "4; t=16 is not an integer in [1, 4]); delete it (the others still reconstruct) or copy it again")
    assert not os.path.exists(tmp_path / "posthoc_ema" / "reconstructed")


@pytest.mark.parametrize("info, steps, why", [
    ({"t": 1e30}, None, "t=1e+30 is not an integer in [1, 16]"),
    ({"t": 0}, None, "t=0 is not an integer in [1, 16]"),
    ({"t": -5}, None, "t=-5 is not an integer in [1, 16]"),
    ({"t": 17}, None, "t=17 is not an integer in [1, 16]"),
    ({"stds": [0.05, 0.9]}, None, "stds [0.05, 0.9] are not distinct relative stds of power-function EMAs"),
    ({"stds": [0.05, 1e-300]}, None, "are not distinct relative stds"),
    ({"stds": [0.05]}, None, "its tensor groups ['p0', 'p1'] are not one per std (p0 to p0)"),
    ({"run": "../../etc"}, None, "run '../../etc' is no run identity"),
    ({"kind": "posthoc_ema"}, None, "its header does not describe a post-hoc EMA snapshot"),
    ({}, 12, "its header says step 12, its name step 16"),
])
def test_headers_that_lie_are_refused(tmp_path, capsys, info, steps, why):
    write_run(tmp_path, [4, 8, 12, 16])
    path = snapshot_path(str(tmp_path), 16)
    rewrite(path, info, steps)
    err = one_error(capsys, [str(tmp_path), "--std", "0.07"])
    assert err.startswith(f"posthoc_ema: error: post-hoc EMA snapshot {path} is damaged (") and why in err, err


def test_snapshots_that_disagree_are_refused(tmp_path, capsys):
    write_run(tmp_path, [4, 8, 12, 16])
    path = snapshot_path(str(tmp_path), 8)
    rewrite(path, {"t": 3})
    err = one_error(capsys, [str(tmp_path), "--std", "0.07"])
    assert err == (f"posthoc_ema: error: post-hoc EMA snapshot {path} does not fit the run's others (t=3, not above "
                   "step 4's t=4); it was edited or comes from another run: move it away")
    write_run(tmp_path, [4, 8, 12, 16])
    rewrite(path, tensors={"p0.pos_embed": torch.zeros(1, 1, 1), "p1.pos_embed": torch.zeros(1, 1, 1)})
    err = one_error(capsys, [str(tmp_path), "--std", "0.07"])
    assert err.endswith("does not fit the run's others (other tensors than step 16's (first difference: "
                        "p0.pos_embed)); it was edited or comes from another run: move it away")  # no broadcasting


def test_non_finite_weights_are_refused(tmp_path, capsys):
    written = write_run(tmp_path, [4, 8])
    path = snapshot_path(str(tmp_path), 4)
    key = next(k for k, v in written[4][1].items() if v.is_floating_point() and k != "pos_embed")
    rewrite(path, tensors={f"p1.{key}": torch.full_like(written[4][1][key], float("nan"))})
    err = one_error(capsys, [str(tmp_path), "--std", "0.07"])
    assert err == (f"posthoc_ema: error: post-hoc EMA snapshot {path} holds non-finite weights (p1.{key}); delete it "
                   "(the others still reconstruct) or copy it again")


def test_fifos_and_links_are_never_opened(tmp_path, capsys):
    write_run(tmp_path, [4, 8, 12])
    folder = tmp_path / "posthoc_ema"
    os.mkfifo(folder / "0000016.safetensors")
    os.symlink(folder / "0000012.safetensors", folder / "0000020.safetensors")
    assert main([str(tmp_path), "--std", "0.07"]) == 0  # returns: the fifo is not opened
    out, err = capsys.readouterr()
    assert "at step 12" in out and err.strip() == ("posthoc_ema: note: left alone (not regular files): "
                                                   "0000016.safetensors, 0000020.safetensors")
    for name in ("0000016.safetensors", "0000020.safetensors"):  # and a file swapped in after the listing
        with pytest.raises(SnapshotError, match="is (a FIFO|a symbolic link).*not a snapshot file"):
            open_snapshot(str(folder / name))


def test_stds_on_the_command_line(tmp_path, capsys):
    write_run(tmp_path, [4, 8, 12, 16])
    for std in ("1e-300", "nan", "inf", "0.5"):
        err = one_error(capsys, [str(tmp_path), "--std", std])
        assert err == f"posthoc_ema: error: --std {float(std)}: a power-function EMA has a relative std in [0.001, 0.28]"
    assert main([str(tmp_path), "--std", "0.05", "0.050001", "0.05"]) == 0
    names = sorted(os.listdir(tmp_path / "posthoc_ema" / "reconstructed"))
    assert names == ["0000016-std0.05.safetensors", "0000016-std0.050001.safetensors"]


# ------------------------------------------------------------------ resume
def _profiles(steps=3):
    model = tiny_model(depth=1)
    profiles = PowerEMA(model, STDS, 2, keep=0, dtype="float16")
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        profiles.update()
    return model, profiles


@pytest.mark.parametrize("edit, why", [
    (lambda s: s.update(profiles=[]), "are 0 for 2 stds"),
    (lambda s: s.update(profiles=s["profiles"][::-1]), "are out of order or altered: profile 0 is not the std 0.05"),
    (lambda s: s.update(t=-5), "have averaged t=-5 steps, but the checkpoint is at step 3"),
    (lambda s: s.update(t="abc"), "have averaged t=abc steps"),
    (lambda s: s["profiles"][1]["pos_embed"].fill_(float("nan")), "hold non-finite weights (std 0.1)"),
    (lambda s: s["profiles"][0].pop("pos_embed"), "do not fit this model"),
    (lambda s: s.update(run="a b"), "name no valid run identity"),
    (lambda s: s.update(norms=[1.0]), "hold norms [1.0], not one number per std"),
])
def test_resumed_profiles_are_checked(edit, why):
    model, profiles = _profiles()
    state = profiles.state_dict()
    edit(state)
    fresh = PowerEMA(model, STDS, 2, keep=0, dtype="float16")
    with pytest.raises(ConfigError) as error:
        fresh.load_state_dict(state, "ck.pt", 3)
    assert str(error.value).startswith("resume: checkpoint ck.pt: its post-hoc EMA profiles ") and why in str(error.value)
    assert str(error.value).endswith("; the file is damaged or was edited")


def test_a_resume_keeps_the_identity_and_adopts_older_snapshots():
    model, profiles = _profiles()
    state = profiles.state_dict()
    fresh = PowerEMA(model, STDS, 2, keep=0, dtype="float16")
    fresh.load_state_dict(state, "ck.pt", 3)
    assert fresh.run == profiles.run and fresh.legacy_upto is None and fresh.t == 3
    legacy = {k: v for k, v in state.items() if k in ("stds", "t", "profiles")}  # a checkpoint of an earlier version
    fresh = PowerEMA(model, STDS, 2, keep=0, dtype="float16")
    fresh.load_state_dict(legacy, "ck.pt", 3)
    assert fresh.run != profiles.run and fresh.legacy_upto == 3


def test_a_run_resumed_from_an_older_version_reconstructs_from_both(tmp_path):
    old = write_run(tmp_path, [2, 4, 6], legacy=True)  # written before identities, up to the resume step
    old.update(write_run(tmp_path, [6, 8, 10], legacy_upto=6, seed=5))  # then with one (6 rewritten)
    write_run(tmp_path, [12], legacy=True, seed=9)  # without identity but after the resume: not this run's
    [record] = reconstruct(str(tmp_path), [0.07])
    assert record["step"] == 10 and record["snapshots"] == 5
    got = read_weights_file(record["path"])["ema"]
    for key, want in expected(old, 0.07).items():
        torch.testing.assert_close(got[key].double(), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ in training runs
PH = {"posthoc_ema.stds": "[0.05, 0.1]", "posthoc_ema.every": 2}


def test_a_fresh_run_over_old_snapshots_warns_and_cleans_their_temporaries(tiny_data, tmp_path, capsys):
    import shutil

    from training.loop import train
    from train_helpers import tiny_config

    first = train(tiny_config(tiny_data, str(tmp_path), exp_name="r", max_train_steps=6, **PH))
    shutil.rmtree(os.path.join(first.exp_dir, "checkpoints"))  # the next run starts fresh in the same folder
    folder = os.path.join(first.exp_dir, "posthoc_ema")
    leaked = os.path.join(folder, ".tmp-0123abcd-0000008.safetensors")  # a snapshot write killed with -9
    open(leaked, "wb").write(b"\0" * 64)
    second = train(tiny_config(tiny_data, str(tmp_path), exp_name="r", max_train_steps=5, **PH))
    assert not os.path.exists(leaked)
    assert sorted(os.listdir(folder)) == ["0000002.safetensors", "0000004.safetensors", "0000005.safetensors",
                                          "0000006.safetensors"]  # 5: the last step; 6: the first run's
    run = load_ckpt_run(second.last_checkpoint)
    warnings = [line for line in open(os.path.join(first.exp_dir, "log.txt")) if "WARNING" in line]
    assert len(warnings) == 1 and warnings[0].rstrip().endswith(
        f"WARNING: {folder} holds 3 post-hoc EMA snapshot(s) of other runs (steps 2 to 6): never read as this run's "
        f"(run {run}) and left alone, except that this run's snapshots replace those at the same steps")
    capsys.readouterr()
    assert main([first.exp_dir, "--std", "0.07"]) == 0
    out, err = capsys.readouterr()
    assert "at step 5" in out and "(kernel error" in out and "3 snapshots" in out
    assert "left out 1 snapshot(s) of other runs" in err


def load_ckpt_run(path):
    return torch.load(path, map_location="cpu", weights_only=True)["posthoc_ema"]["run"]


def test_thinning_in_a_run_survives_kill_and_resume(tiny_data, tmp_path):
    from training.loop import train
    from train_helpers import tiny_config

    keys = dict(max_train_steps=12, checkpointing_steps=4, **{**PH, "posthoc_ema.every": 1, "posthoc_ema.keep": 2})
    straight = train(tiny_config(tiny_data, str(tmp_path), exp_name="straight", **keys))
    train(tiny_config(tiny_data, str(tmp_path), exp_name="cut", **keys), stop_after_step=10)
    resumed = train(tiny_config(tiny_data, str(tmp_path), exp_name="cut", **keys))  # from step 8
    names = [f"{s:07d}.safetensors" for s in kept_steps(12, 1, 2)]
    assert len(names) < 12
    for run in (straight, resumed):
        assert sorted(os.listdir(os.path.join(run.exp_dir, "posthoc_ema"))) == names
    for name in names:
        x, y = (read_weights_file(os.path.join(r.exp_dir, "posthoc_ema", name)) for r in (straight, resumed))
        assert all(x[g][k].dtype == torch.float16 and torch.equal(x[g][k], y[g][k]) for g in ("p0", "p1")
                   for k in x[g] if x[g][k].is_floating_point()), name


def test_a_resume_with_edited_profiles_is_one_line(tiny_data, tmp_path):
    from training.checkpoint import atomic_torch_save
    from training.loop import train
    from train_helpers import tiny_config

    run = train(tiny_config(tiny_data, str(tmp_path), exp_name="e", max_train_steps=2, **PH))
    state = torch.load(run.last_checkpoint, map_location="cpu", weights_only=True)
    state["posthoc_ema"]["profiles"] = []  # restarted as copies of the model while t stayed, before
    atomic_torch_save(state, run.last_checkpoint)
    with pytest.raises(ConfigError) as error:
        train(tiny_config(tiny_data, str(tmp_path), exp_name="e", max_train_steps=4, **PH))
    assert str(error.value) == (f"resume: checkpoint {run.last_checkpoint}: its post-hoc EMA profiles are 0 for 2 stds; "
                                "the file is damaged or was edited")
