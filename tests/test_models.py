import math

import numpy as np
import pytest
import torch

from conftest import randomize_, tiny_model
from models import MODEL_NAMES, create_model
from models.layers import TimestepEmbedder, sincos_pos_embed_2d, unpatchify

PARAM_COUNTS = {  # SPEC §3
    "SiT-S/2": 32_957_200, "SiT-B/2": 130_500_112, "SiT-L/2": 458_086_416, "SiT-XL/2": 675_111_184,
    "DFM-SiT-B/2": 132_476_180, "DFM-SiT-XL/2": 679_402_388,
}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts(name):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


def test_parameter_count_by_hand_for_sit_b2():
    """Count SiT-B/2 (D=768, 12 blocks, p=2, C=4, 256 tokens, 1001 labels) from the layer shapes."""
    D, p, C = 768, 2, 4
    block = (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D) + (6 * D * D + 6 * D)
    total = (256 * D + (C * p * p * D + D) + (256 * D + D + D * D + D) + 1001 * D + 12 * block
             + (2 * D * D + 2 * D) + (D * p * p * C + p * p * C))
    assert total == PARAM_COUNTS["SiT-B/2"]


def test_state_dict_keys_follow_the_published_names():
    sit = tiny_model("SiT-S/2", z_dims=[16], encoder_depth=1)
    keys = set(sit.state_dict())
    for key in ["pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight",
                "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight", "blocks.1.attn.qkv.weight",
                "blocks.1.attn.proj.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias",
                "blocks.0.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.weight",
                "final_layer.linear.weight", "projectors.0.0.weight", "projectors.0.2.weight",
                "projectors.0.4.bias"]:
        assert key in keys, key
    dfm = tiny_model("DFM-SiT-S/2")
    keys = set(dfm.state_dict())
    for key in ["x_embedder.embedders.1.proj.weight", "t_embedder.embedders.0.mlp.2.weight",
                "final_layer.projections.1.linear.weight", "final_layer.projections.0.adaLN_modulation.1.bias"]:
        assert key in keys, key
    assert not any(k.startswith("x_embedder.proj") for k in keys)


@pytest.mark.parametrize("name,stages", [("SiT-S/2", 1), ("DFM-SiT-S/2", 2), ("DFM-SiT-S/4", 3)])
def test_output_is_zero_at_init(name, stages):
    model = tiny_model(name, input_size=16, **({"stages": stages} if name.startswith("DFM") else {}))
    xs = [torch.randn(2, *shape) for shape in model.stage_shapes]
    out = model(xs, torch.rand(2, stages), torch.tensor([1, 2]))
    assert len(out) == stages
    for o, x in zip(out, xs):
        assert o.shape == x.shape and torch.count_nonzero(o) == 0


def test_unpatchify_order_is_p_q_c():
    p, C, grid = 2, 3, 2
    tokens = torch.zeros(1, grid * grid, p * p * C)
    for h in range(grid):
        for w in range(grid):
            for i in range(p):
                for j in range(p):
                    for c in range(C):
                        tokens[0, h * grid + w, (i * p + j) * C + c] = 1000 * c + 100 * (h * p + i) + (w * p + j)
    image = unpatchify(tokens, p, C, grid)
    expected = torch.tensor([[[1000 * c + 100 * r + col for col in range(4)] for r in range(4)] for c in range(C)],
                            dtype=torch.float32)
    assert torch.equal(image[0], expected)


def test_timestep_embedding_by_hand():
    t = torch.tensor([0.0, 0.25, 1.0])
    emb = TimestepEmbedder.sinusoid(t, 256)
    k = 7
    freq = math.exp(-math.log(10000) * k / 128)
    assert emb[1, k].item() == pytest.approx(math.cos(0.25 * freq), abs=1e-6)
    assert emb[1, 128 + k].item() == pytest.approx(math.sin(0.25 * freq), abs=1e-6)
    assert torch.equal(emb[0, :128], torch.ones(128))


def test_pos_embed_is_mae_sincos():
    emb = sincos_pos_embed_2d(16, 3)  # 9 tokens; each half: 4 frequencies, sin then cos
    omega = 1 / 10000 ** (np.arange(4) / 4)
    token = 1 * 3 + 2  # row 1, column 2
    np.testing.assert_allclose(emb[token, :4], np.sin(2 * omega))
    np.testing.assert_allclose(emb[token, 4:8], np.cos(2 * omega))
    np.testing.assert_allclose(emb[token, 8:12], np.sin(1 * omega))
    np.testing.assert_allclose(emb[token, 12:], np.cos(1 * omega))


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_three_stages_work_for_every_patch_size(patch):
    model = randomize_(tiny_model(f"DFM-SiT-S/{patch}", stages=3, input_size=32))
    xs = [torch.randn(2, 4, s, s) for s in (8, 16, 32)]
    out = model(xs, torch.rand(2, 3), torch.tensor([0, 1]))
    assert [o.shape for o in out] == [x.shape for x in xs]
    assert all(torch.isfinite(o).all() for o in out)


def test_inactive_stage_input_and_time_do_not_matter():
    model = randomize_(tiny_model("DFM-SiT-S/2", stages=3, input_size=16)).eval()
    xs = [torch.randn(2, 4, s, s) for s in (4, 8, 16)]
    t = torch.rand(2, 3)
    y = torch.tensor([3, 4])
    active = torch.tensor([True, True, False])
    ref = model(xs, t, y, active)
    xs2 = [xs[0], xs[1], 100 * torch.randn(2, 4, 16, 16)]
    t2 = t.clone()
    t2[:, 2] = 0.3
    out = model(xs2, t2, y, active)
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the same stage active changes every output
    changed = model(xs2, t2, y, torch.tensor([True, True, True]))
    assert not torch.allclose(changed[0], ref[0])


def test_per_sample_active_mask_matches_per_batch_mask():
    model = randomize_(tiny_model("DFM-SiT-S/2", input_size=16)).eval()
    xs = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 16, 16)]
    t, y = torch.rand(2, 2), torch.tensor([1, 2])
    mixed = model(xs, t, y, torch.tensor([[True, False], [True, True]]))
    first = model([x[:1] for x in xs], t[:1], y[:1], torch.tensor([True, False]))
    second = model([x[1:] for x in xs], t[1:], y[1:], torch.tensor([True, True]))
    for s in range(2):
        torch.testing.assert_close(mixed[s][:1], first[s], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixed[s][1:], second[s], rtol=1e-5, atol=1e-6)


def test_repa_projector_reads_the_encoder_depth_block():
    model = randomize_(tiny_model("SiT-S/2", depth=3, z_dims=[12, 5], encoder_depth=2)).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    v, zs = model(x, t, y, return_features=True)
    assert torch.is_tensor(v) and [z.shape for z in zs] == [(2, 16, 12), (2, 16, 5)]
    tokens = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    for block in model.blocks[:2]:
        tokens = block(tokens, c)
    torch.testing.assert_close(zs[0], model.projectors[0](tokens))
    torch.testing.assert_close(zs[1], model.projectors[1](tokens))


def test_label_dropout_only_in_train_mode():
    model = randomize_(tiny_model("SiT-S/2", class_dropout_prob=1.0))
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    null = torch.full_like(y, 10)
    model.train()
    dropped = model(x, t, y)
    model.eval()
    torch.testing.assert_close(dropped, model(x, t, null))
    assert not torch.allclose(model(x, t, y), dropped)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_matches_explicit_softmax_attention(qk_norm):
    from models.blocks import Attention

    torch.manual_seed(0)
    attn = Attention(32, 4, qk_norm=qk_norm).double()
    if qk_norm:  # non-trivial affine parameters
        for p in list(attn.q_norm.parameters()) + list(attn.k_norm.parameters()):
            p.data.normal_()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    if qk_norm:  # LayerNorm over the head dimension, eps 1e-5 (timm's default, as in REPA)
        def norm(z, ln):
            z = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-5)
            return z * ln.weight + ln.bias
        q, k = norm(q, attn.q_norm), norm(k, attn.k_norm)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), expected)
    if qk_norm:
        assert "blocks.0.attn.q_norm.weight" in tiny_model("SiT-S/2", qk_norm=True).state_dict()


def test_rebuild_from_arch():
    model = tiny_model("DFM-SiT-S/4", stages=3, input_size=16)
    clone = create_model(**model.arch)
    assert clone.arch == model.arch and clone.num_stages == 3


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="unknown model name 'SiT-M/2'"):
        create_model("SiT-M/2")
    assert "DFM-SiT-XL/2" in MODEL_NAMES and "DFM-ELIT-SiT-XL/2" in MODEL_NAMES and len(MODEL_NAMES) == 48
    with pytest.raises(ValueError, match="a 3-stage pyramid needs the height divisible by 2\\^\\(stages-1\\) = 4"):
        create_model("DFM-SiT-S/2", stages=3, input_size=18, depth=1, hidden_size=64, num_heads=4)
    with pytest.raises(ValueError, match="SiT models have 1 stage"):
        create_model("SiT-B/2", stages=2)
    with pytest.raises(ValueError, match="unknown model option"):
        create_model("SiT-B/2", hidden=3)


def test_skeleton_model_has_the_real_shapes_on_meta_and_leaves_nn_init_alone():
    from models.registry import skeleton_model

    normal = torch.nn.init.normal_
    real = create_model("DFM-ELIT-SiT-S/4", input_size=16, depth=4, hidden_size=64, num_heads=4, encoder_depth=1,
                        group_size=2)
    skeleton = skeleton_model("DFM-ELIT-SiT-S/4", input_size=16, depth=4, hidden_size=64, num_heads=4,
                              encoder_depth=1, group_size=2)
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert all(p.is_meta for p in skeleton.parameters()) and skeleton.arch == real.arch
    assert torch.nn.init.normal_ is normal  # the initialisers are back
    x = torch.nn.init.normal_(torch.zeros(1000), std=1.0)
    assert x.std() > 0.5
