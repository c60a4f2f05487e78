"""2-D axial RoPE attention with RMSNorm: attention that depends on grid offsets only, the positions
every kind of model hands its blocks (ELIT's core: the positions its latents stand for), and SiT,
DFM-SiT and ELIT-SiT (two budgets) with them trained, resumed and sampled."""
import pytest
import torch

from models.blocks import ATTENTIONS, NORMS
from models.layers import grid_positions

from train_helpers import check_whole_pipeline


def test_rope_attention_depends_on_position_offsets_only():
    torch.manual_seed(0)
    attention = ATTENTIONS.build("rope", dim=32, num_heads=2, qk_norm=True).double()
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    positions = grid_positions(4).double()
    out = attention(x, positions=positions)
    shifted = attention(x, positions=positions + torch.tensor([3.0, -5.0], dtype=torch.float64))
    torch.testing.assert_close(shifted, out, rtol=1e-10, atol=1e-10)  # a translation changes nothing
    swapped = attention(x, positions=positions.flip(0))  # other offsets between the same tokens: other output
    assert (swapped - out).abs().max() > 1e-3
    # scores q_i . k_j after the rotation are a function of p_i - p_j: check one pair by hand
    angles = lambda p: torch.cat([p[:1] * attention.base ** (-torch.arange(4.0) / 4),  # noqa: E731
                                  p[1:] * attention.base ** (-torch.arange(4.0) / 4)]).double()
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)

    def turned(v, p):
        a = angles(torch.tensor(p, dtype=torch.float64))
        pairs = v.view(8, 2)
        return torch.stack([pairs[:, 0] * a.cos() - pairs[:, 1] * a.sin(),
                            pairs[:, 0] * a.sin() + pairs[:, 1] * a.cos()], dim=1).flatten()

    from models.blocks import axial_rope_angles, rotate

    for p_q, p_k in (((1.0, 2.0), (3.0, 0.0)), ((11.0, 12.0), (13.0, 10.0))):
        mine = rotate(q.view(1, 1, 1, 16), axial_rope_angles(torch.tensor([p_q]), 16, attention.base)).flatten()
        torch.testing.assert_close(mine, turned(q, p_q), rtol=1e-6, atol=1e-6)
    score = lambda p_q, p_k: float(turned(q, p_q) @ turned(k, p_k))  # noqa: E731
    assert score((1.0, 2.0), (3.0, 0.0)) == pytest.approx(score((11.0, 12.0), (13.0, 10.0)), rel=1e-9)


def test_rmsnorm_normalises_the_root_mean_square():
    norm = NORMS.build("rmsnorm", dim=8)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(norm(x), x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6))


def test_elit_core_blocks_see_the_positions_their_latents_stand_for():
    """Latent j of window w stands for grid position (row of w) * g + j // g, (column of w) * g + j % g;
    and at the full budget a RoPE block gives the core's window-major tokens exactly the result it
    gives the same tokens in row-major order (the positions travel with the tokens)."""
    from conftest import randomize_
    from models import create_model
    from models.elit import from_windows, to_windows

    model = randomize_(create_model("ELIT-SiT-S/2", input_size=16, in_channels=4, num_classes=4, depth=4,
                                    hidden_size=32, num_heads=2, encoder_depth=1, elit_tail_depth=1, group_size=2,
                                    elit_max_mask_prob=0.75, attention="rope", norm="rmsnorm",
                                    position_embedding="none")).double()
    g, n = 2, 4
    for k in (1, 4):
        expected = [(w // n * g + j // g, w % n * g + j % g) for w in range(n * n) for j in range(k)]
        assert model.latent_positions(k).tolist() == [list(map(float, p)) for p in expected]
    block = model.blocks[1]  # a core block
    tokens, c = torch.randn(2, 64, 32, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64)
    row_major = block(tokens, c, model.token_positions.double())
    window_major = block(to_windows(tokens, 8, 2), c, model.latent_positions(4).double())
    torch.testing.assert_close(from_windows(window_major, 8, 2), row_major, rtol=1e-10, atol=1e-10)


ROPE = "attention: rope, norm: rmsnorm, position_embedding: none"


@pytest.mark.parametrize("model", ["SiT", "DFM-SiT", "ELIT-SiT"])
def test_rope_models_train_resume_and_sample(model, tiny_data, tmp_path):
    keys = {"model": f"{model}-S/4", "model_overrides": f"{{depth: 3, hidden_size: 64, num_heads: 4, {ROPE}}}"}
    generate_args = ((),)
    if model == "SiT" or model == "ELIT-SiT":
        keys.update({"preview.num_steps_per_scale": "[4]", "preview.thresholds": "[]"})
    if model == "ELIT-SiT":  # a 4x4 token grid in 2x2 windows, every budget trained; sampled at two
        keys.update(group_size=2, elit_max_mask_prob=0.75, encoder_depth=1,
                    model_overrides=f"{{depth: 3, hidden_size: 64, num_heads: 4, elit_tail_depth: 1, {ROPE}}}",
                    **{"preview.budgets": "[0.5]", "eval_sampler.inference_budget": 0.5})
        generate_args = (("inference_budget=1.0",), ("inference_budget=0.25",))
    result = check_whole_pipeline(tiny_data, tmp_path, keys, generate_args=generate_args)
    arch = result["ckpt"]["arch"]
    assert (arch["attention"], arch["norm"], arch["position_embedding"]) == ("rope", "rmsnorm", "none")
    assert "pos_embed" not in result["ckpt"]["ema"]
