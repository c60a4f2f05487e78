"""torch.compile as train.py, generate.py and the budget sweep use it (models/compile.py).

For SiT, DFM-SiT (S = 2, 3), a 16-level ELIT-SiT (g = 4, the ImageNet configs' levels), a
multi-budget DFM-ELIT-SiT and a REPA DFM-SiT: a few training steps (`training.step.TrainStep`,
the loop's step) and sampling calls (`samplers.sample`) of a compiled copy and an eager copy of
the same model. Dynamo's counters must show no graph break, no new graph after the first step
other than at most one per ELIT budget level (and none on a second pass over every level, DFM
stage draw, step and sampling call), and dynamo must never fall back to eager for hitting its
recompile limit (`fail_on_recompile_limit_hit`). The graphs are counted with the cheap
`aot_eager` backend (dynamo and AOTAutograd exactly as with inductor, no code generation); one
case also runs inductor, train.py's backend, for the numerics.

Tolerance (fp32): losses and final samples of the compiled copy equal the eager ones within
rtol 1e-4 / atol 1e-5 (aot_eager and inductor both reorder float operations; after a few AdamW
steps the differences measured here are about 1e-6).
"""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

import dfm
import samplers
from models import budget_levels, create_model
from models.compile import compile_model, compiled_regions, graphs_per_block

RTOL, ATOL = 1e-4, 1e-5
TINY = dict(depth=3, hidden_size=32, num_heads=2, num_classes=4, in_channels=4)
ELIT16 = dict(input_size=16, group_size=4, elit_max_mask_prob=0.9375, encoder_depth=1, elit_tail_depth=1)
CASES = {  # name -> (model name, build options, stage sampling, REPA)
    "SiT": ("SiT-S/2", dict(input_size=8), "per_batch", False),
    "DFM-SiT-S2": ("DFM-SiT-S/2", dict(input_size=8, stages=2), "per_batch", False),
    "DFM-SiT-S3": ("DFM-SiT-S/2", dict(input_size=16, stages=3), "per_sample", False),
    "ELIT-16-levels": ("ELIT-SiT-S/2", ELIT16, "per_batch", False),
    "DFM-ELIT": ("DFM-ELIT-SiT-S/2", dict(ELIT16, stages=2), "per_sample", False),
    "REPA": ("DFM-SiT-S/2", dict(input_size=8, stages=2, encoder_depth=1), "per_sample", True),
}
BATCH = 4


@pytest.fixture
def fresh_dynamo():
    """Empty dynamo caches and counters; hitting the recompile limit raises instead of running eagerly;
    dynamo's limits are restored afterwards (compile_model raises them)."""
    torch._dynamo.reset()
    counters.clear()
    config = torch._dynamo.config
    with config.patch(fail_on_recompile_limit_hit=True, recompile_limit=config.recompile_limit,
                      accumulated_recompile_limit=config.accumulated_recompile_limit):
        yield
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def build(case):
    name, options, stage_sampling, repa = CASES[case]
    encoders = []
    if repa:
        from bench.benchmark import build_encoders

        torch.manual_seed(1)
        encoders = build_encoders("dinov2-vit-s", options["input_size"] * 8, "cpu", tiny=True)
        options = dict(options, z_dims=[e.z_dim for e in encoders])
    torch.manual_seed(0)
    model = create_model(name, **TINY, **options)
    with torch.no_grad():  # zero-initialised adaLN / heads: make every path count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, stage_sampling, encoders


class Trainer:
    """The loop's step (TrainStep) on a fixed batch; `step(i, budget)` returns the loss."""

    def __init__(self, model, stage_sampling, encoders):
        from accelerate import Accelerator

        from training.ema import EMA, create_ema
        from training.metrics import MetricWindow
        from training.step import TrainStep

        self.model = model.train()
        self.ema_model = create_ema(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        objective = dfm.FlowMatchingObjective(model.num_stages, stage_sampling=stage_sampling, time_distribution="lognormal",
                                              proj_coeff=0.5 if encoders else 0.0)
        self.train_step = TrainStep(Accelerator(cpu=True, mixed_precision="no"), model, objective, optimizer,
                                    schedule, EMA(model, self.ema_model, 0.9), MetricWindow(model.num_stages, "cpu"),
                                    accumulation=1, max_grad_norm=1.0,
                                    logged_terms=("proj_loss",) if encoders else ())
        g = torch.Generator().manual_seed(2)
        size = model.input_size
        self.x = torch.randn(BATCH, model.in_channels, size, size, generator=g)
        self.y = torch.randint(0, model.num_classes, (BATCH,), generator=g)
        self.features = None
        if encoders:
            from models.encoders import encoder_features

            images = torch.randint(0, 256, (BATCH, 3, size * 8, size * 8), dtype=torch.uint8, generator=g)
            self.features = encoder_features(encoders, images)
        self.generator = torch.Generator()

    def step(self, i: int, budget=None) -> float:
        self.generator.manual_seed(100 + i)  # a new stage draw, times and noise every step
        torch.manual_seed(100 + i)  # label dropout
        inputs = SimpleNamespace(x=self.x, y=self.y, encoder_features=self.features,
                                 model_kwargs={} if budget is None else {"inference_budget": budget})
        out = self.train_step.micro_batch(inputs, self.generator, i, 0)
        self.train_step.finish()
        return float(out["loss"].detach())


def sample(model, budget=None, cfg_scale=1.0):
    g = torch.Generator().manual_seed(3)
    S = model.num_stages
    noise = [torch.randn(BATCH, *shape, generator=g) for shape in model.stage_shapes]
    y = torch.randint(0, model.num_classes, (BATCH,), generator=g)
    return samplers.sample(model, noise, y, num_steps_per_scale=[2] * S, thresholds=[0.5 / 2 ** i for i in range(S - 1)],
                           cfg_scale=cfg_scale, guidance_low=0.0, guidance_high=0.6, inference_budget=budget)


def run_case(case, backend="aot_eager", train_steps=3, cfg=False):
    """Eager and compiled copies side by side; returns the new dynamo graphs of each phase."""
    model, stage_sampling, encoders = build(case)
    eager = Trainer(copy.deepcopy(model), stage_sampling, encoders)
    compiled = Trainer(model, stage_sampling, encoders)
    compile_model(compiled.model, backend=backend)
    compile_model(compiled.ema_model, backend=backend)
    levels = budget_levels(model) or [None]
    report, start, breaks = {}, graphs(), graph_breaks()

    def both(fn, *args):
        out, ref = fn(compiled, *args), fn(eager, *args)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)

    def train(trainer, i, budget):
        return [torch.tensor(trainer.step(i, budget))]

    def sampled(trainer, budget, cfg_scale):
        with torch.no_grad():
            return sample(trainer.ema_model, budget, cfg_scale)

    # first step (compiles), then more steps: new stage draws, masks, noise, steps -> nothing new
    both(train, 0, levels[-1])
    report["first_step"] = graphs() - start
    before = graphs()
    for i in range(1, train_steps):
        both(train, i, levels[-1])
    report["more_steps"] = graphs() - before
    # every other ELIT budget level once, then all of them again
    before = graphs()
    for j, budget in enumerate(levels[:-1]):
        both(train, train_steps + j, budget)
    report["other_levels"] = graphs() - before
    before = graphs()
    for j, budget in enumerate(levels):
        both(train, 100 + j, budget)
    report["second_pass"] = graphs() - before
    # sampling with the (compiled) EMA copies at every level; CFG doubles the batch inside its window
    before = graphs()
    scales = (1.0, 2.0) if cfg else (1.0,)
    for cfg_scale in scales:
        for budget in levels:
            both(sampled, budget, cfg_scale)
    report["sampling"] = graphs() - before
    before = graphs()
    for cfg_scale in scales:
        for budget in levels:
            sampled(compiled, budget, cfg_scale)
    report["sampling_again"] = graphs() - before
    report["graph_breaks"] = graph_breaks() - breaks
    report["levels"] = len(budget_levels(model))
    report["region_kinds"] = len({type(m) for m in compiled_regions(model)})
    return report


@pytest.mark.slow
def test_compiled_training_and_sampling_match_eager_without_recompiles(fresh_dynamo):
    """Every case in one process, as a run that trains, previews and evaluates: graphs compiled
    for one model serve the next (the blocks share their code), so each case counts what it adds."""
    for case in CASES:
        r = run_case(case, cfg=case in ("SiT", "DFM-ELIT"))
        assert r["graph_breaks"] == 0, (case, r)
        assert r["first_step"] <= r["region_kinds"], (case, r)  # one graph per kind of region
        assert r["more_steps"] == 0 and r["second_pass"] == 0 and r["sampling_again"] == 0, (case, r)
        # a budget level adds at most one graph (dynamic k: one for all of them); nothing else does
        assert r["other_levels"] <= max(0, r["levels"] - 1), (case, r)
        assert r["sampling"] <= max(1, r["levels"]) + 2, (case, r)


def test_recompile_limit_covers_every_budget_level():
    """One graph per level would still compile all 16 levels of the ImageNet ELIT configs, for
    training and for sampling: the limit is raised from the model, not left at dynamo's 8."""
    model = create_model("ELIT-SiT-S/2", **TINY, **ELIT16)
    assert len(budget_levels(model)) == 16
    assert graphs_per_block(model) >= 2 * 16
    with torch._dynamo.config.patch(recompile_limit=8):
        compile_model(model, backend="aot_eager")
        assert torch._dynamo.config.recompile_limit == graphs_per_block(model)
    regions = compiled_regions(model)
    assert len(regions) == 3 + 2  # the blocks, Read and Write
    assert all(r._compiled_call_impl is not None for r in regions)
    assert list(model.state_dict()) == list(create_model("ELIT-SiT-S/2", **TINY, **ELIT16).state_dict())


@pytest.mark.slow
def test_inductor_matches_eager(fresh_dynamo):
    """train.py's backend: the compiled DFM-SiT's losses and samples equal eager ones within the tolerance."""
    r = run_case("DFM-SiT-S2", backend="inductor", train_steps=2)
    assert r["graph_breaks"] == 0 and r["more_steps"] == 0 and r["sampling_again"] == 0, r
