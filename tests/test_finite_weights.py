"""Weights are finite where they are used (models.finite): loading for sampling (load_pretrained,
generate.py) refuses non-finite weights with one line naming the file and the first bad tensor; the
check itself agrees with an element-wise reference on every dtype. (Resuming: test_resume_checks.py.)"""
import numpy as np
import pytest
import torch

from conftest import randomize_, tiny_model
from models import load_pretrained
from models.finite import NonFiniteWeightsError, check_finite, first_nonfinite


def _reference(state):
    """The first floating-point entry with a non-finite value, element by element in float64 (numpy)."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not np.isfinite(tensor.double().numpy()).all():
            return name
    return None


@pytest.mark.parametrize("seed", range(6))
def test_first_nonfinite_agrees_with_an_elementwise_reference(seed):
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    state = {}
    for i in range(12):
        shape = [(7,), (3, 5), (2, 3, 4), (1000,)][int(torch.randint(4, (1,), generator=g))]
        state[f"t{i}"] = torch.randn(shape, generator=g).to(dtypes[i % 4])
    state["steps"] = torch.tensor([3, 4])  # integer tensors are never non-finite
    state["empty"] = torch.zeros(0)
    assert first_nonfinite(state) is None is _reference(state)
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = {k: v.clone() for k, v in state.items()}
        for name in ("t9", "t5"):  # t5 comes first in the dict: it must be the one named
            flat = poisoned[name].view(-1)
            flat[int(torch.randint(flat.numel(), (1,), generator=g))] = bad
        assert first_nonfinite(poisoned) == _reference(poisoned) == "t5"
    huge = {"a": torch.full((4,), 3e38), "b": torch.full((3,), 6e4, dtype=torch.float16)}  # large but finite
    assert first_nonfinite(huge) is None is _reference(huge)
    with pytest.raises(NonFiniteWeightsError, match=r"^the weights of x are not finite: 't5' holds NaN or inf "
                                                    r"values; try y$"):
        check_finite(poisoned, "the weights of x", "try y")


def _checkpoint(tmp_path, nan_in=("ema",)):
    """A tiny pixel-space DFM-SiT checkpoint of ours (2 classes, 8 px); NaN planted in `nan_in`."""
    model = randomize_(tiny_model("DFM-SiT-S/2", in_channels=3, num_classes=2))
    state = {part: {k: v.clone() for k, v in model.state_dict().items()} for part in ("model", "ema")}
    for part in nan_in:
        state[part]["blocks.1.mlp.fc2.weight"][0, 3] = float("nan")
    path = tmp_path / "0000010.pt"
    torch.save({**state, "arch": model.arch, "steps": 10, "config": {"vae": "none", "path_type": "linear"}}, path)
    return str(path)


def test_load_pretrained_refuses_a_nan_ema_and_takes_the_finite_raw_weights(tmp_path):
    path = _checkpoint(tmp_path)
    with pytest.raises(NonFiniteWeightsError) as info:
        load_pretrained(path)
    assert str(info.value) == ("the EMA weights are not finite: 'blocks.1.mlp.fc2.weight' holds NaN or inf values; "
                               "use an earlier checkpoint (or the raw weights: use_ema=false)")
    model = load_pretrained(path, prefer_ema=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(NonFiniteWeightsError, match=r"^the weights are not finite: 'blocks.1.mlp.fc2.weight'"):
        load_pretrained(_checkpoint(tmp_path, nan_in=("model", "ema")), prefer_ema=False)


def test_generate_refuses_nan_weights_with_one_line_and_writes_nothing(tmp_path, capsys):
    """Before: all-zero (black) images and exit 0."""
    import generate

    path = _checkpoint(tmp_path)
    samples = tmp_path / "samples"
    argv = ["--ckpt", path, "num_samples=2", "num_steps_per_scale=[2,2]", f"sample_dir={samples}", "cpu_threads=1"]
    assert generate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"generate.py: error: checkpoint {path}: the EMA weights are not finite: 'blocks.1.mlp.fc2.weight' "
                   "holds NaN or inf values; use an earlier checkpoint (or the raw weights: use_ema=false)")
    assert not samples.exists()
    assert generate.main(argv + ["use_ema=false", "run_name=raw"]) == 0  # the raw weights are finite: they sample
    images = np.load(samples / "raw.npz")["arr_0"]
    assert images.shape == (2, 8, 8, 3) and images.std() > 0
