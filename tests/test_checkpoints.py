import pytest
import torch

from conftest import randomize_, tiny_model
from models import infer_arch, load_pretrained


def inputs(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, *shape, generator=g) for shape in model.stage_shapes]
    t = torch.rand(batch, model.num_stages, generator=g)
    return xs, t, torch.tensor([1, 2, 3][:batch])


def test_our_checkpoint_round_trip_prefers_ema(tmp_path):
    model = randomize_(tiny_model("DFM-SiT-S/4", stages=3, input_size=16, qk_norm=True))
    ema = randomize_(tiny_model("DFM-SiT-S/4", stages=3, input_size=16, qk_norm=True), seed=1)
    path = tmp_path / "0000100.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "arch": model.arch, "steps": 100}, path)
    loaded = load_pretrained(str(path))
    assert not loaded.training and loaded.arch == model.arch
    xs, t, y = inputs(model)
    for a, b in zip(loaded(xs, t, y), ema.eval()(xs, t, y)):
        assert torch.equal(a, b)
    raw = load_pretrained(str(path), prefer_ema=False)
    for a, b in zip(raw(xs, t, y), model.eval()(xs, t, y)):
        assert torch.equal(a, b)


def test_repa_style_plain_state_dict_with_prefixes(tmp_path):
    model = randomize_(tiny_model("SiT-S/2", z_dims=[8], encoder_depth=1)).eval()
    state = {"module._orig_mod." + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "repa.pt"
    torch.save(state, path)
    arch = infer_arch({k.split("module._orig_mod.")[1]: v for k, v in state.items()})
    assert arch["z_dims"] == [8] and arch["depth"] == 2 and arch["hidden_size"] == 64 and not arch["official_sit"]
    loaded = load_pretrained(str(path), num_heads=4, encoder_depth=1)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])
    assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_reference_dfm_checkpoint_inferred(tmp_path):
    model = randomize_(tiny_model("DFM-SiT-S/2", stages=3, input_size=16)).eval()
    path = tmp_path / "dfm.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "args": None}, path)
    loaded = load_pretrained(str(path), num_heads=4)
    assert loaded.num_stages == 3 and loaded.multistage
    xs, t, y = inputs(model)
    for a, b in zip(loaded(xs, t, y), model(xs, t, y)):
        assert torch.equal(a, b)


def test_official_sit_checkpoint_is_converted(tmp_path):
    """An official SiT state dict (8-channel head, t = 0 noise) gives -v(x, 1 - t)."""
    ours = randomize_(tiny_model("SiT-S/2")).eval()
    state = dict(ours.state_dict())
    p, C = 2, 4
    weight, bias = state["final_layer.linear.weight"], state["final_layer.linear.bias"]
    wide_w = torch.randn(p * p * 2 * C, weight.shape[1])
    wide_b = torch.randn(p * p * 2 * C)
    for k in range(p * p):
        wide_w[k * 2 * C:k * 2 * C + C] = weight[k * C:(k + 1) * C]
        wide_b[k * 2 * C:k * 2 * C + C] = bias[k * C:(k + 1) * C]
    state["final_layer.linear.weight"], state["final_layer.linear.bias"] = wide_w, wide_b
    path = tmp_path / "SiT-XL-2-256.pt"
    torch.save(state, path)
    official = load_pretrained(str(path), num_heads=4)
    assert official.arch["time_flip"]
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
    torch.testing.assert_close(official(x, t, y), -ours(x, 1 - t, y), rtol=1e-5, atol=1e-6)


def test_mismatched_checkpoint_names_keys_and_lookalike(tmp_path):
    model = tiny_model("DFM-SiT-S/2")
    path = tmp_path / "dfm.pt"
    torch.save({"ema": model.state_dict()}, path)
    with pytest.raises(ValueError) as info:
        load_pretrained(str(path), name="SiT-S/2", num_heads=4)
    message = str(info.value)
    assert "missing keys: final_layer.adaLN_modulation.1.bias" in message
    assert "unexpected keys: final_layer.projections.0.adaLN_modulation.1.bias" in message and "(20 in all)" in message
    assert "looks like DFM-SiT-S/2 with 2 stages" in message


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_pretrained(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_pretrained(str(bad))
