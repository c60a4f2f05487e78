"""Checkpoints: no code runs from a file unless trusted, .safetensors round trips, SHA-256 sidecars."""
import argparse
import hashlib
import os
import warnings

import numpy as np
import pytest
import torch

from conftest import Payload, crafted_checkpoint, randomize_, tiny_model
from models import load_pretrained, read_checkpoint
from models.weights_io import UntrustedCheckpointError, export_checkpoint, export_weights
from training.checkpoint import (atomic_torch_save, checkpoint_path, find_resume_checkpoint, load_checkpoint,
                                 prune_checkpoints, remove_stale_temporaries, select_resume_checkpoint)
from utils.checksum import ChecksumMismatchError, sidecar_path


def _same_outputs(a, b, model):
    """Both models give bit-identical outputs on the same random multi-stage input."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, *shape, generator=g) for shape in model.stage_shapes]
    t, y = torch.rand(2, model.num_stages, generator=g), torch.tensor([1, 3])
    with torch.no_grad():
        return all(torch.equal(p, q) for p, q in zip(a.eval()(xs, t, y), b.eval()(xs, t, y)))


@pytest.mark.parametrize("zip_format", [True, False])
def test_reduce_payload_does_not_run(tmp_path, zip_format):
    model = tiny_model("SiT-S/2")
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil.pt")
    torch.save({"ema": model.state_dict(), "extra": Payload(marker)}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UntrustedCheckpointError) as info:
        load_pretrained(path)
    message = str(info.value)
    assert "arbitrary code execution" in message and "--trust-checkpoint" in message and "open" in message.split("(")[1]
    with pytest.raises(ValueError, match="arbitrary code execution"):  # the training loader refuses too
        load_checkpoint(path)
    assert not marker.exists()
    # the payload is live: an explicit opt-in runs it (which is why it is opt-in)
    load_pretrained(path, trust_checkpoint=True, num_heads=4)  # no stored arch, a width of none of SiT's sizes
    assert marker.exists()


def test_repa_style_args_namespace_loads_without_trust(tmp_path):
    model = randomize_(tiny_model("SiT-S/2"))
    args = argparse.Namespace(model="SiT-XL/2", stage_weights=[0.9, 0.1], elit_min_mask_prob=None,
                              learning_rate=np.float64(1e-4), steps=np.int64(7))
    path = str(tmp_path / "repa.pt")
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "args": args, "steps": 7}, path)
    checkpoint = read_checkpoint(path)
    assert checkpoint["args"].stage_weights == [0.9, 0.1] and checkpoint["args"].learning_rate == 1e-4
    assert _same_outputs(load_pretrained(path, num_heads=4), model, model)  # heads cannot be inferred at width 64


def test_safetensors_round_trip_through_load_pretrained(tmp_path):
    model = randomize_(tiny_model("DFM-SiT-S/2"), seed=1)
    ema = randomize_(tiny_model("DFM-SiT-S/2"), seed=2)
    path = str(tmp_path / "weights.safetensors")
    export_weights(path, {"ema": ema.state_dict(), "model": model.state_dict()}, arch=ema.arch,
                   config={"lr": 1e-4, "stages": 2}, steps=123)
    checkpoint = read_checkpoint(path)
    assert set(checkpoint) == {"ema", "model", "arch", "config", "steps"}
    assert checkpoint["config"] == {"lr": 1e-4, "stages": 2} and checkpoint["steps"] == 123
    assert checkpoint["arch"]["name"] == "DFM-SiT-S/2"
    for key, value in ema.state_dict().items():
        assert torch.equal(checkpoint["ema"][key], value), key
    assert _same_outputs(load_pretrained(path), ema, ema)
    assert _same_outputs(load_pretrained(path, prefer_ema=False), model, model)
    assert not _same_outputs(model, ema, ema)
    # a foreign .safetensors (a plain state dict, no metadata) loads with the architecture inferred
    from safetensors.torch import save_file

    plain = str(tmp_path / "plain.safetensors")
    save_file({f"module.{k}": v.contiguous() for k, v in ema.state_dict().items()}, plain)
    assert _same_outputs(load_pretrained(plain, num_heads=4), ema, ema)


def test_generate_loader_reads_safetensors_and_refuses_payloads(tmp_path):
    from generation.config import GenerationError
    from generation.model_loading import load_sampling_model

    ema = randomize_(tiny_model("SiT-S/2"), seed=3)
    path = str(tmp_path / "w.safetensors")
    export_weights(path, {"ema": ema.state_dict()}, arch=ema.arch, config={"cfg_prob": 0.1})
    model, train_config = load_sampling_model(path, None, True, torch.device("cpu"))
    assert _same_outputs(model, ema, ema)
    assert train_config == {"cfg_prob": 0.1}
    marker = tmp_path / "pwned"
    evil = str(tmp_path / "evil.pt")
    torch.save({"ema": ema.state_dict(), "x": Payload(marker)}, evil)
    with pytest.raises(GenerationError, match="--trust-checkpoint"):
        load_sampling_model(evil, None, True, torch.device("cpu"))
    assert not marker.exists()



def _record_builds(monkeypatch):
    """The device of every model that loading builds: "cpu" (create_model) or "meta" (skeleton_model)."""
    from models import checkpoints

    devices, real, skeleton = [], checkpoints.create_model, checkpoints.skeleton_for_weights
    monkeypatch.setattr(checkpoints, "create_model",
                        lambda **arch: devices.append(torch.empty(0).device.type) or real(**arch))
    monkeypatch.setattr(checkpoints, "skeleton_for_weights",
                        lambda arch, state, **kw: devices.append("meta") or skeleton(arch, state, **kw))
    return devices


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_crafted_arch_depth_is_one_error_before_anything_is_built(tmp_path, monkeypatch, capsys, fmt):
    import generate

    path = crafted_checkpoint(tmp_path, fmt, depth=1000)  # inside depth's range (1..1024): stopped by the tensor count
    built = _record_builds(monkeypatch)
    message = ("the architecture stored in the checkpoint (DFM-SiT-S/2) does not match the checkpoint's tensors: "
               "it builds more tensors than twice the 42 the checkpoint holds; its arch metadata is damaged or was "
               "edited, so no model was built")
    with pytest.raises(ValueError) as info:
        load_pretrained(path)
    assert str(info.value) == message
    assert generate.main(["--ckpt", path, f"sample_dir={tmp_path / 'samples'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"generate.py: error: cannot load checkpoint {path} as the architecture its weights describe: {message}"
    # stopped on the meta device after a few blocks (of 1000), nothing allocated
    assert built == ["meta", "meta"] and not (tmp_path / "samples").exists()


def test_other_arch_mismatches_are_found_on_the_meta_device(tmp_path, monkeypatch):
    """A size that costs nothing to build on the meta device (a 10^6-row label table) is caught
    there, and a small mismatch by comparing keys and shapes: no real allocation happens."""
    built = _record_builds(monkeypatch)
    with pytest.raises(ValueError, match=r"stored in the checkpoint \(DFM-SiT-S/2\) does not match the checkpoint's "
                                         r"tensors: it builds a Embedding.weight of 64,000,064 values"):
        load_pretrained(crafted_checkpoint(tmp_path, "safetensors", num_classes=10 ** 6))
    assert built == ["meta"]
    with pytest.raises(ValueError, match=r"checkpoint does not match DFM-SiT-S/2; shape mismatches: "
                                         r"y_embedder.embedding_table.weight \(11, 64\) vs \(13, 64\)"):
        load_pretrained(crafted_checkpoint(tmp_path, "safetensors", num_classes=12))
    assert built == ["meta", "meta"]
    built.clear()
    load_pretrained(crafted_checkpoint(tmp_path, "pt"))  # the genuine arch: checked on meta, then built for real
    assert built == ["meta", "cpu"]


def test_export_checkpoint_converts_a_pt(tmp_path):
    model = randomize_(tiny_model("SiT-S/2"), seed=4)
    src = str(tmp_path / "0000010.pt")
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "steps": 10,
                "args": argparse.Namespace(model="SiT-S/2", cfg_prob=0.1)}, src)
    dest = export_checkpoint(src, str(tmp_path / "out.safetensors"))
    checkpoint = read_checkpoint(dest)
    assert set(checkpoint) == {"ema", "config", "steps"} and checkpoint["config"]["cfg_prob"] == 0.1
    with pytest.raises(ValueError, match="must end in .safetensors"):
        export_weights(str(tmp_path / "x.pt"), {"ema": model.state_dict()})


def _fake_ckpt(step):
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(4096, generator=g)}, "ema": {"w": torch.randn(4096, generator=g)},
            "opt": {}, "steps": step}


def _flip_bytes(path, count=64):
    data = bytearray(open(path, "rb").read())
    start = len(data) // 2  # inside the tensor payload: the zip and pickle stay readable
    for i in range(start, start + count):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_checksum_sidecar_matches_the_file(tmp_path):
    path = checkpoint_path(str(tmp_path), 3)
    atomic_torch_save(_fake_ckpt(3), path)
    text = open(sidecar_path(path)).read()
    assert text == f"{hashlib.sha256(open(path, 'rb').read()).hexdigest()}  0000003.pt\n"


def test_flipped_bytes_are_detected_and_skipped(tmp_path):
    exp = str(tmp_path)
    for step in (2, 4, 6):
        atomic_torch_save(_fake_ckpt(step), checkpoint_path(exp, step))
    newest = checkpoint_path(exp, 6)
    _flip_bytes(newest)
    silently = torch.load(newest, weights_only=True)  # the damage alone goes unnoticed by torch
    assert not all(torch.equal(silently[k]["w"], _fake_ckpt(6)[k]["w"]) for k in ("model", "ema"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path, state = find_resume_checkpoint(exp)
    assert path == checkpoint_path(exp, 4) and state["steps"] == 4
    assert torch.equal(state["ema"]["w"], _fake_ckpt(4)["ema"]["w"])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "0000006.pt" in messages[0] and "SHA-256" in messages[0]
    with pytest.raises(ValueError, match="damaged"):
        load_checkpoint(newest)
    with pytest.raises(ChecksumMismatchError):
        read_checkpoint(newest)
    assert os.path.exists(newest)  # kept for inspection


def test_no_usable_checkpoint_says_starting_from_step_0(tmp_path):
    exp = str(tmp_path)
    for step in (1, 2):
        atomic_torch_save(_fake_ckpt(step), checkpoint_path(exp, step))
        _flip_bytes(checkpoint_path(exp, step))
    choice = select_resume_checkpoint(exp)
    assert choice.starts_fresh and choice.path is None and len(choice.rejected) == 2
    assert "STARTING FROM STEP 0" in choice.messages()[-1]
    fresh = select_resume_checkpoint(str(tmp_path / "new"))
    assert fresh.starts_fresh and fresh.messages() == []  # a new run is not an alarm


def test_checkpoints_without_sidecar_still_load(tmp_path):
    exp = str(tmp_path)
    path = checkpoint_path(exp, 5)
    os.makedirs(os.path.dirname(path))
    torch.save(_fake_ckpt(5), path)  # an older run / a published file: no .sha256
    assert load_checkpoint(path)["steps"] == 5
    assert find_resume_checkpoint(exp)[0] == path


def test_prune_and_cleanup_handle_sidecars(tmp_path):
    exp = str(tmp_path)
    for step in (1, 2, 3):
        atomic_torch_save(_fake_ckpt(step), checkpoint_path(exp, step))
    prune_checkpoints(exp, 1)
    folder = os.path.dirname(checkpoint_path(exp, 3))
    assert sorted(os.listdir(folder)) == ["0000003.pt", "0000003.pt.sha256"]
    open(os.path.join(folder, "0000009.pt.sha256"), "w").write("0" * 64 + "  0000009.pt\n")  # crash before rename
    remove_stale_temporaries(exp)
    assert sorted(os.listdir(folder)) == ["0000003.pt", "0000003.pt.sha256"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")  # torch's note on the protocol-4 file we write
def test_a_legacy_pickle_checkpoint_is_refused_pointing_to_trust_checkpoint_only(tmp_path):
    """torch.save's legacy (non-zip) format with pickle protocol 4: the weights-only reader cannot
    parse it; the refusal is one line that names --trust-checkpoint, not torch's weights_only=False."""
    model = randomize_(tiny_model("SiT-S/2"))
    path = str(tmp_path / "legacy.pt")
    torch.save({"ema": model.state_dict()}, path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    with pytest.raises(UntrustedCheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and "weights_only" not in message
    assert "legacy (non-zip) pickle format" in message and "(Unsupported operand 149)" in message
    assert "--trust-checkpoint" in message
    with pytest.raises(ValueError, match="--trust-checkpoint"):  # the training loader says the same
        load_checkpoint(path)
    assert _same_outputs(load_pretrained(path, trust_checkpoint=True, num_heads=4), model, model)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 64)
    with pytest.raises(ValueError) as info:
        read_checkpoint(str(garbage))
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)


def test_raw_weights_asked_of_an_ema_only_file_are_one_line(tmp_path, capsys):
    """A post-hoc reconstruction (or any EMA-only export) has no raw weights: use_ema=false is refused
    instead of sampling the EMA under a '-noema' run name."""
    import generate
    from conftest import tiny_model
    from models import load_pretrained
    from models.weights_io import export_weights

    model = tiny_model("DFM-SiT-S/2", in_channels=3, num_classes=4)
    path = export_weights(tmp_path / "recon.safetensors", {"ema": model.state_dict()}, arch=model.arch,
                          config={"vae": "none"}, weights_info={"kind": "posthoc_ema", "std": 0.1})
    with pytest.raises(ValueError, match="holds only EMA weights .* sample it with use_ema=true"):
        load_pretrained(path, prefer_ema=False)
    assert generate.main(["--ckpt", path, "use_ema=false", f"sample_dir={tmp_path / 's'}", "num_samples=2"]) == 2
    assert "holds only EMA weights" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
