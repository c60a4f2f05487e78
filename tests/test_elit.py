"""ELIT-SiT / DFM-ELIT-SiT (SPEC §9): parameter counts, reference keys, the budget rule, the
latent interface at init, REPA / compile / bf16, loading, budget-aware sampling, FLOPs and the
budget sweep."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bench.flops import counted_forward_flops
from conftest import randomize_, tiny_model
from models import budget_levels, create_model, latents_per_window, load_pretrained
from models.elit import from_windows, keep_mask, mask_levels
import samplers

# head 1, core 2, tail 1 blocks; a 8x8 token grid of 2x2 windows (16 windows of 4 latents)
TINY = dict(depth=4, input_size=16, encoder_depth=1, elit_tail_depth=1, group_size=2)


def tiny_elit(name="ELIT-SiT-S/2", seed=0, **overrides):
    config = dict(TINY, elit_max_mask_prob=0.75)
    config.update(overrides)
    return randomize_(tiny_model(name, **config), seed=seed).eval()


def inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, *shape, generator=g) for shape in model.stage_shapes]
    t = torch.rand(batch, model.num_stages, generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    return xs, t, y


# ------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("name, input_size, group_size, expected", [
    ("ELIT-SiT-XL/2", 32, 4, 705_121_936),
    ("ELIT-SiT-XL/2", 64, 8, 706_172_560),
    ("ELIT-SiT-B/2", 32, 4, 144_903_952),
])
def test_parameter_counts_match_the_reference(name, input_size, group_size, expected):
    with torch.device("meta"):
        model = create_model(name, input_size=input_size)
    assert model.group_size == group_size  # the default: a 4x4 grid of windows
    assert sum(p.numel() for p in model.parameters()) == expected


def test_head_core_tail_defaults():
    with torch.device("meta"):
        xl, b = create_model("ELIT-SiT-XL/2"), create_model("ELIT-SiT-B/2")
    assert (xl.encoder_depth, len(xl.blocks) - 8 - xl.tail_depth, xl.tail_depth) == (8, 16, 4)
    assert (b.encoder_depth, len(b.blocks) - 8 - b.tail_depth, b.tail_depth) == (8, 2, 2)


def reference_elit_keys(D, g):
    """The §9 key list with its shapes, written out independently of models/elit.py."""
    g2 = g * g
    read, write = "input_token_editor.adapters.0.", "output_token_editor.adapters.0."
    shapes = {read + "learned_query_embed": (g2, D), read + "pos_embed": (g2, D),
              read + "latent_pos_embed": (4096, D), write + "pos_embed": (g2, D),
              read + "fit_layer.read_ff.0.fc1.weight": (D, D), read + "fit_layer.read_ff.0.fc2.weight": (D, D),
              read + "fit_layer.adaLN_modulation.1.weight": (7 * D, D),
              read + "fit_layer.adaLN_modulation.1.bias": (7 * D,),
              write + "write_ff.0.fc1.weight": (D, D), write + "write_ff.0.fc2.weight": (D, D)}
    for attn in (read + "fit_layer.latents_attend_to_patches.0.", write + "patches_attend_to_latents.0."):
        shapes.update({attn + "q_proj.weight": (D, D), attn + "q_proj.bias": (D,),
                       attn + "kv_proj.weight": (2 * D, D), attn + "kv_proj.bias": (2 * D,),
                       attn + "q_norm.scale": (D,), attn + "k_norm.scale": (D,),
                       attn + "proj.weight": (D, D), attn + "proj.bias": (D,)})
    return shapes


def test_state_dict_is_sit_plus_the_reference_elit_keys():
    elit = tiny_elit()
    sit = tiny_model("SiT-S/2", depth=4, input_size=16)
    expected = {k: tuple(v.shape) for k, v in sit.state_dict().items()}
    expected.update(reference_elit_keys(64, 2))
    assert {k: tuple(v.shape) for k, v in elit.state_dict().items()} == expected


def test_rebuild_from_arch_and_dfm_elit_names():
    model = tiny_elit("DFM-ELIT-SiT-S/2", stages=2)
    clone = create_model(**model.arch)
    assert clone.arch == model.arch and clone.num_stages == 2 and clone.group_size == 2
    assert model.arch["elit_max_mask_prob"] == 0.75 and "x_embedder.embedders.1.proj.weight" in model.state_dict()


# ------------------------------------------------------------------------- budget rule
def test_budget_levels_and_latents_per_window_for_every_level_and_count():
    for g in (1, 2, 3, 4, 8):
        g2, grid = g * g, 4 * g
        windows = (grid // g) ** 2
        assert mask_levels(g, 0, 1 - 1 / g2) == [j / g2 for j in range(g2)]
        for k in range(1, g2 + 1):
            assert latents_per_window(k / g2, g, grid * grid) == k  # a fraction
            assert latents_per_window(k * windows, g, grid * grid) == k  # a latent count
    model = tiny_elit(elit_min_mask_prob=0.25, elit_max_mask_prob=0.5)
    assert budget_levels(model) == [0.5, 0.75]
    assert budget_levels(tiny_elit(elit_max_mask_prob=0.0)) == [1.0]
    assert budget_levels(tiny_model("SiT-S/2")) == []
    assert latents_per_window(0.3, 4, 256) == 4  # between levels: rounds down (floor(16 * 0.3))


@pytest.mark.parametrize("grid, g", [(4, 2), (8, 2), (8, 4), (6, 3), (4, 1)])
def test_keep_mask_keeps_the_first_k_of_every_window(grid, g):
    for k in range(1, g * g + 1):
        expected = torch.tensor([(r % g) * g + (c % g) < k for r in range(grid) for c in range(grid)])
        assert torch.equal(keep_mask(grid, g, k), expected)


def test_core_blocks_see_the_first_k_latents_of_every_window():
    model = tiny_elit()
    grid, g = model.grid, model.group_size
    seen = {}
    model.input_token_editor.register_forward_hook(lambda m, a, out: seen.__setitem__("read", out[0]))
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("core", a[0]))
    xs, t, y = inputs(model)
    for k in range(1, 5):
        model(xs[0], t[:, 0], y, inference_budget=k / 4)
        latents = from_windows(seen["read"], grid, g)  # row-major grid order
        # window-major, row-major inside the window: the order the core receives them in
        positions = [(wr * g + j // g) * grid + wc * g + j % g
                     for wr in range(grid // g) for wc in range(grid // g) for j in range(k)]
        assert seen["core"].shape[1] == len(positions) == 16 * k
        torch.testing.assert_close(seen["core"], latents[:, positions])


# ---------------------------------------------------------------------- model behaviour
def test_output_does_not_depend_on_the_latents_at_init():
    """Write's proj and fc2 start at zero: the core blocks cannot change the output."""
    model = tiny_elit()
    write = model.output_token_editor.adapters[0]
    with torch.no_grad():
        write.patches_attend_to_latents[0].proj.weight.zero_()
        write.patches_attend_to_latents[0].proj.bias.zero_()
        write.write_ff[0].fc2.weight.zero_()
    xs, t, y = inputs(model)
    before = model(xs[0], t[:, 0], y, inference_budget=1.0)
    with torch.no_grad():
        for block in model.blocks[1:3]:  # the core
            for p in block.parameters():
                p.add_(torch.randn_like(p))
    torch.testing.assert_close(model(xs[0], t[:, 0], y, inference_budget=1.0), before, rtol=0, atol=0)
    torch.testing.assert_close(model(xs[0], t[:, 0], y, inference_budget=0.25), before, rtol=0, atol=0)
    with torch.no_grad():
        write.write_ff[0].fc2.weight.normal_()
    assert not torch.allclose(model(xs[0], t[:, 0], y, inference_budget=1.0), before)


def test_fresh_model_has_the_zero_initialised_interface():
    model = tiny_model("ELIT-SiT-S/2", **TINY)
    read, write = model.input_token_editor.adapters[0], model.output_token_editor.adapters[0]
    for p in (read.fit_layer.adaLN_modulation[1].weight, write.patches_attend_to_latents[0].proj.weight,
              write.write_ff[0].fc2.weight):
        assert p.abs().max() == 0
    assert 0.01 < read.latent_pos_embed.std() < 0.03 and read.fit_layer.read_ff[0].fc1.weight.abs().max() > 0


def test_budget_none_uses_the_single_budget_and_multi_budget_needs_one():
    single = tiny_elit(elit_min_mask_prob=0.5, elit_max_mask_prob=0.5)
    xs, t, y = inputs(single)
    torch.testing.assert_close(single(xs[0], t[:, 0], y), single(xs[0], t[:, 0], y, inference_budget=0.5))
    assert not torch.allclose(single(xs[0], t[:, 0], y), single(xs[0], t[:, 0], y, inference_budget=1.0))
    multi = tiny_elit()
    for mode in (multi.eval, multi.train):
        mode()
        with pytest.raises(ValueError, match="trained with 4 budgets.*pass inference_budget"):
            multi(xs[0], t[:, 0], y)


def test_dfm_elit_with_one_stage_equals_elit_sit():
    elit = tiny_elit("ELIT-SiT-S/2")
    dfm = tiny_model("DFM-ELIT-SiT-S/2", stages=1, **dict(TINY, elit_max_mask_prob=0.75)).eval()
    rename = {"x_embedder.embedders.0.": "x_embedder.", "t_embedder.embedders.0.": "t_embedder.",
              "final_layer.projections.0.": "final_layer."}
    state = {}
    for key in dfm.state_dict():
        source = key
        for a, b in rename.items():
            source = source.replace(a, b)
        state[key] = elit.state_dict()[source]
    dfm.load_state_dict(state)
    xs, t, y = inputs(elit)
    for budget in (0.25, 1.0):
        torch.testing.assert_close(dfm(xs, t, y, inference_budget=budget)[0],
                                   elit(xs[0], t[:, 0], y, inference_budget=budget))


def test_repa_features_read_the_head_output():
    model = tiny_elit(z_dims=[8, 5], encoder_depth=2, elit_tail_depth=1)
    seen = {}
    model.blocks[1].register_forward_hook(lambda m, a, out: seen.__setitem__("head", out))
    xs, t, y = inputs(model)
    _, zs = model(xs[0], t[:, 0], y, return_features=True, inference_budget=0.5)
    assert [z.shape for z in zs] == [(2, 64, 8), (2, 64, 5)]
    torch.testing.assert_close(zs[0], model.projectors[0](seen["head"]))


def test_qk_norm_bf16_and_compile():
    model = tiny_elit(qk_norm=True)
    assert "blocks.0.attn.q_norm.weight" in model.state_dict()
    xs, t, y = inputs(model)
    reference = model(xs[0], t[:, 0], y, inference_budget=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(xs[0], t[:, 0], y, inference_budget=0.5)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() < 0.1 * reference.abs().max()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # no graph break, any budget
    for budget in (0.5, 0.25, 32):  # the second float makes dynamo trace a symbolic budget
        torch.testing.assert_close(compiled(xs[0], t[:, 0], y, inference_budget=budget),
                                   model(xs[0], t[:, 0], y, inference_budget=budget))


# ------------------------------------------------------------------------------ bad input
def test_bad_inputs_name_the_key():
    with pytest.raises(ValueError, match=r"group_size must divide the 8x8 token grid.*allowed: \[1, 2, 4, 8\]"):
        tiny_model("ELIT-SiT-S/2", **dict(TINY, group_size=3))
    with pytest.raises(ValueError, match="no default group_size"):
        tiny_model("ELIT-SiT-S/2", depth=4, input_size=12, encoder_depth=1, elit_tail_depth=1)
    with pytest.raises(ValueError, match=r"elit_min_mask_prob \(0.5\) must be <= elit_max_mask_prob \(0.25\)"):
        tiny_model("ELIT-SiT-S/2", **dict(TINY, elit_min_mask_prob=0.5, elit_max_mask_prob=0.25))
    with pytest.raises(ValueError, match=r"elit_max_mask_prob' must be a finite number in \[0, 1\)"):
        tiny_model("ELIT-SiT-S/2", **dict(TINY, elit_max_mask_prob=1.0))
    with pytest.raises(ValueError, match="elit_tail_depth"):
        tiny_model("ELIT-SiT-S/2", **dict(TINY, encoder_depth=2, elit_tail_depth=2))
    with pytest.raises(ValueError, match="only for ELIT models"):
        tiny_model("SiT-S/2", group_size=2)
    model = tiny_elit()
    xs, t, y = inputs(model)
    for budget in (0, -0.5, 0.2, 7, 17, 80, 1.5, float("nan"), "half", True):
        with pytest.raises(ValueError, match="inference_budget"):
            model(xs[0], t[:, 0], y, inference_budget=budget)
    sit = tiny_model("SiT-S/2")
    with pytest.raises(ValueError, match="has no compute budget"):
        sit(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long), inference_budget=0.5)


# -------------------------------------------------------------------------------- loading
def test_reference_format_state_dict_loads(tmp_path):
    """A plain reference-style ``{"ema": state}`` file: the ELIT keys built from the §9 list."""
    sit = randomize_(tiny_model("SiT-S/2", depth=4, input_size=16))
    g = torch.Generator().manual_seed(3)
    state = dict(sit.state_dict())
    state.update({k: torch.randn(shape, generator=g) for k, shape in reference_elit_keys(64, 2).items()})
    path = tmp_path / "elit_reference.pt"
    torch.save({"ema": state, "model": {k: v + 1 for k, v in state.items()}}, path)
    depths = dict(encoder_depth=1, elit_tail_depth=1, num_heads=4)  # a width of none of SiT's sizes: heads given
    inferred = load_pretrained(str(path), **depths)  # ELIT and the group size from the weights
    named = load_pretrained(str(path), "ELIT-SiT-S/2", **depths)
    for model in (inferred, named):
        assert model.arch["name"] == "ELIT-SiT-S/2" and model.group_size == 2 and not model.training
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key
    xs, t, y = inputs(inferred)
    torch.testing.assert_close(inferred(xs[0], t[:, 0], y), named(xs[0], t[:, 0], y))
    with pytest.raises(ValueError, match="holds ELIT weights.*allowed names: ELIT-SiT-S/2, ELIT-SiT-S/4"):
        load_pretrained(str(path), "SiT-S/2")
    # a 7x7 token grid (where g = 2 could not divide it either) is refused on the meta device
    with pytest.raises(ValueError, match=r"group_size must divide the 7x7 token grid"):
        load_pretrained(str(path), input_size=14, **depths)
    torch.save({"ema": sit.state_dict()}, tmp_path / "sit.pt")
    with pytest.raises(ValueError, match="no ELIT weights"):
        load_pretrained(str(tmp_path / "sit.pt"), "ELIT-SiT-S/2")


def test_our_elit_checkpoint_round_trips(tmp_path):
    model = tiny_elit("DFM-ELIT-SiT-S/2", stages=2, elit_min_mask_prob=0.25)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "arch": model.arch}, tmp_path / "c.pt")
    loaded = load_pretrained(str(tmp_path / "c.pt"))
    assert loaded.arch == model.arch and budget_levels(loaded) == [0.25, 0.5, 0.75]
    xs, t, y = inputs(model)
    torch.testing.assert_close(loaded(xs, t, y, inference_budget=0.5), model(xs, t, y, inference_budget=0.5))


# ------------------------------------------------------------------------------ sampling
def _sample(model, method="euler", **kw):
    noise = [torch.randn(2, *shape, generator=torch.Generator().manual_seed(1)) for shape in model.stage_shapes]
    steps = [3] * model.num_stages
    thresholds = [0.5] if model.num_stages == 2 else []
    gens = [torch.Generator().manual_seed(i) for i in range(2)] if method == "sde" else None
    return samplers.sample(model, noise, torch.tensor([1, 3]), num_steps_per_scale=steps, thresholds=thresholds,
                           method=method, generator=gens, **kw)


@pytest.mark.parametrize("method", ["euler", "heun", "sde"])
@pytest.mark.parametrize("name", ["ELIT-SiT-S/2", "DFM-ELIT-SiT-S/2"])
def test_cheap_cfg_at_the_conditional_budget_equals_plain_cfg(method, name):
    model = tiny_elit(name)
    plain = _sample(model, method, cfg_scale=3.0, inference_budget=0.5)
    cheap = _sample(model, method, cfg_scale=3.0, inference_budget=0.5, unconditional_inference_budget=0.5)
    for a, b in zip(plain, cheap):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    low = _sample(model, method, cfg_scale=3.0, inference_budget=0.5, unconditional_inference_budget=0.25)
    assert not torch.allclose(low[-1], plain[-1], atol=1e-4)


def test_cheap_cfg_and_autoguidance_match_a_hand_euler_step():
    model = tiny_elit()
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    y, w = torch.tensor([1, 3]), 2.5
    null = torch.full_like(y, model.num_classes)
    t = torch.ones(2)
    for autoguidance, y_low in ((False, null), (True, y)):
        out = samplers.sample(model, [noise], y, num_steps_per_scale=[1], cfg_scale=w, inference_budget=1.0,
                              unconditional_inference_budget=0.25, autoguidance=autoguidance)[0]
        with torch.no_grad():
            v_c = model(noise, t, y, inference_budget=1.0).double()
            v_u = model(noise, t, y_low, inference_budget=0.25).double()
        expected = (noise.double() - (v_u + w * (v_c - v_u))).float()  # t: 1 -> 0 in one step
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_sampler_budget_errors():
    model = tiny_elit()
    with pytest.raises(ValueError, match="pass inference_budget"):
        _sample(model)
    with pytest.raises(ValueError, match="unconditional_inference_budget: inference_budget 0.1"):
        _sample(model, cfg_scale=2.0, inference_budget=1.0, unconditional_inference_budget=0.1)
    with pytest.raises(ValueError, match="autoguidance needs unconditional_inference_budget"):
        _sample(model, cfg_scale=2.0, inference_budget=1.0, autoguidance=True)
    with pytest.raises(ValueError, match="inference_budget=0.5 given, but the model has no compute budget"):
        _sample(tiny_model("SiT-S/2"), inference_budget=0.5)


# --------------------------------------------------------------------------------- FLOPs
def test_flops_fall_monotonically_with_the_budget():
    model = tiny_elit(elit_max_mask_prob=0.75)
    flops = [counted_forward_flops(model, b) for b in budget_levels(model)]
    assert all(a < b for a, b in zip(flops, flops[1:]))
    # the core's linear layers by hand: 4 latents fewer per window = 16 * 3 tokens fewer per core block
    D, mlp = 64, 256
    linear_per_token = 2 * (4 * D * D + 2 * D * mlp)
    drop = 2 * 16 * 3 * linear_per_token  # 2 core blocks
    assert flops[-1] - flops[0] > drop
    with torch.device("meta"):
        xl = create_model("ELIT-SiT-XL/2", elit_max_mask_prob=15 / 16)
    # reference (SPEC §9, batch 2): 253 GFLOP at 1/8, 353 at 1/2
    assert round(counted_forward_flops(xl, 1 / 8, batch_size=2) / 1e9) == 253
    assert round(counted_forward_flops(xl, 1 / 2, batch_size=2) / 1e9) == 353


# ---------------------------------------------------------------------------- budget sweep
def test_budget_sweep_end_to_end(tmp_path, capsys):
    from generation import budget_sweep

    model = tiny_elit(in_channels=3, num_classes=4)
    ckpt = tmp_path / "elit.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "arch": model.arch,
                "config": {"model": model.arch["name"], "vae": "none", "path_type": "linear"}}, ckpt)
    out = tmp_path / "sweep"
    assert budget_sweep.main(["--ckpt", str(ckpt), "--class-label", "2", "--out", str(out), "--num-seeds", "2",
                              "--steps", "2", "--precision", "fp32"]) == 0
    record = json.loads((out / "budget_sweep.json").read_text())
    assert [r["budget"] for r in record["budgets"]] == [0.25, 0.5, 0.75, 1.0]
    assert [r["latents"] for r in record["budgets"]] == [16, 32, 48, 64]
    flops = [r["gflops_per_forward"] for r in record["budgets"]]
    assert all(a < b for a, b in zip(flops, flops[1:]))
    grid = np.asarray(Image.open(out / "grid.png"))
    # 2 seeds x 4 budgets of 16 px, upscaled 16x (nearest) to 256 px columns, 32 px padding, a label band on top
    cell, pad = 16 * 16 + 32, 32
    band = grid.shape[0] - (2 * cell + pad)
    assert grid.shape[1:] == (4 * cell + pad, 3) and 40 < band < 120
    # the column at budget 1.0, row 1 = sample 1 of the sampler at that budget
    from generation.noise import initial_noise
    noise = initial_noise(0, [0, 1], [(3, 16, 16)])
    final = samplers.sample(model, noise, torch.tensor([2, 2]), num_steps_per_scale=[2], inference_budget=1.0)[0]
    expected = torch.clamp(127.5 * final + 128, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    y, x = band + pad + cell, pad + 3 * cell
    assert np.array_equal(grid[y:y + 256, x:x + 256], expected[1].repeat(16, axis=0).repeat(16, axis=1))
    for c in range(4):  # every column has its label: dark text on the white band above it
        assert (grid[:band, pad + c * cell:(c + 1) * cell].min(axis=-1) < 100).sum() > 50
    assert (grid[:band, :pad] == 255).all()
    assert Image.open(out / "flops.png").size[0] > 100
    assert "budget 0.25: 16 latents" in capsys.readouterr().out
    sit = tiny_model("SiT-S/2", in_channels=3, num_classes=4)
    torch.save({"ema": sit.state_dict(), "arch": sit.arch, "config": {"vae": "none"}}, tmp_path / "sit.pt")
    assert budget_sweep.main(["--ckpt", str(tmp_path / "sit.pt"), "--class-label", "1", "--out", str(out)]) == 2
    assert "no compute budget" in capsys.readouterr().err


def test_budget_sweep_folder_is_named_after_the_run(tmp_path, monkeypatch):
    """Two runs' checkpoints of the same step no longer share results/budget_sweep/<step>/."""
    from generation import budget_sweep

    from generation.config import checkpoint_tag

    model = tiny_elit(in_channels=3, num_classes=4)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "exps" / "run-a" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "arch": model.arch,
                "config": {"model": model.arch["name"], "vae": "none", "path_type": "linear"}}, folder / "0001200.pt")
    assert budget_sweep.main(["--ckpt", "exps/run-a/checkpoints/0001200.pt", "--class-label", "1", "--num-seeds", "1",
                              "--steps", "1", "--budgets", "1", "--precision", "fp32"]) == 0
    assert os.listdir(tmp_path / "results" / "budget_sweep") == ["run-a-0001200"]
    assert (tmp_path / "results" / "budget_sweep" / "run-a-0001200" / "grid.png").exists()
    assert checkpoint_tag("exps/run-b/checkpoints/0001200.pt") == "run-b-0001200"  # another run: another folder


def test_budget_sweep_speaks_generates_option_language():
    """The sweep's keys are generate.py's (the same names and values); its earlier flags mean the same."""
    from generation.budget_sweep import load_sweep_config
    from generation.config import load_generate_config

    new = load_sweep_config(["--ckpt", "c.pt", "class_label=3", "num_steps_per_scale=[40,10]", "use_ema=false",
                             "num_seeds=2", "budgets=[0.25,1]", "sample_dir=out", "run_name=sweep"])
    old = load_sweep_config(["--ckpt", "c.pt", "--class-label", "3", "--steps", "40,10", "--no-ema", "--num-seeds",
                             "2", "--budgets", "0.25,1", "--out", "out/sweep"])
    assert dict(new) == dict(old)
    assert (list(new.num_steps_per_scale), new.use_ema, list(new.budgets), new.sample_dir, new.run_name) == \
        ([40, 10], False, [0.25, 1.0], "out", "sweep")
    generate = load_generate_config(["--ckpt", "c.pt", "num_steps_per_scale=40,10", "use_ema=false"])
    assert (list(generate.num_steps_per_scale), generate.use_ema) == ([40, 10], False)  # commas there too


@pytest.mark.parametrize("count", ["0", "1025", "100000000000000000000"])
def test_budget_sweep_refuses_a_seed_count_out_of_range(count, capsys):
    """One line before any checkpoint is read (10**20 was an OverflowError traceback)."""
    from generation import budget_sweep

    assert budget_sweep.main(["--ckpt", "no-such.pt", "--class-label", "1", "--num-seeds", count]) == 2
    assert capsys.readouterr().err.strip() == (
        f"budget_sweep: error: config key 'num_seeds': must be from 1 to 1024 (one grid row each), got {count}")
