"""No host synchronisation in the training step or the sampler step.

On a GPU, `.item()`, `.cpu()`, `.tolist()`, `bool()` / `float()` / `int()` of a device tensor or
a Python `if` on one makes the host wait for the device (and breaks CUDA-graph capture). On the
CPU the real step runs on the meta device instead: meta tensors have shapes but no data, so
every such read raises there, exactly where a GPU would wait (the last test proves it catches
each kind). Host-side values stay legal: the budget draw, the sampler's schedule and AdamW's step
counters are CPU tensors by design. Where a GPU exists, the same steps also run under
`torch.cuda.set_sync_debug_mode("error")`.
"""
from types import SimpleNamespace

import pytest
import torch

import dfm
import samplers
from models import create_model
from models.blocks import SiTBlock

TINY = dict(depth=3, hidden_size=32, num_heads=2, num_classes=4)
ELIT = dict(group_size=4, elit_max_mask_prob=0.9375, encoder_depth=1, elit_tail_depth=1)
MODELS = {  # name -> (model name, build options, stage sampling, REPA)
    "DFM-SiT": ("DFM-SiT-S/2", dict(input_size=8, stages=3), "per_sample", False),
    "DFM-ELIT+REPA": ("DFM-ELIT-SiT-S/2", dict(input_size=16, stages=2, **ELIT), "per_batch", True),
}
BATCH = 4


def training_parts(key, device, accumulation=2):
    """The loop's pieces for one model on `device`: batch preparer, budget sampler, TrainStep."""
    from accelerate import Accelerator

    from training.budget import BudgetSampler
    from training.ema import EMA, create_ema
    from training.loop import BatchPreparer, MetricWindow
    from training.repa import RepaFeatures
    from training.step import TrainStep

    name, options, stage_sampling, repa = MODELS[key]
    encoders = []
    if repa:
        from bench.benchmark import build_encoders

        encoders = [e.to(device) for e in build_encoders("dinov2-vit-s", options["input_size"] * 8, "cpu", tiny=True)]
        options = dict(options, z_dims=[e.z_dim for e in encoders])
    model = create_model(name, in_channels=4, **TINY, **options).to(device)
    ema_model = create_ema(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, s / 10))
    objective = dfm.FlowMatchingObjective(model.num_stages, stage_sampling=stage_sampling, time_distribution="lognormal",
                                          proj_coeff=0.5 if repa else 0.0)
    accelerator = Accelerator(cpu=device.type != "cuda", mixed_precision="no")
    metrics = MetricWindow(model.num_stages, device)
    step = TrainStep(accelerator, model, objective, optimizer, schedule, EMA(model, ema_model, 0.99), metrics,
                     accumulation=accumulation, max_grad_norm=1.0, logged_terms=("proj_loss",) if repa else ())
    prepare = BatchPreparer(False, device, RepaFeatures(encoders) if repa else None)
    return SimpleNamespace(model=model, ema_model=ema_model, step=step, prepare=prepare,
                           budgets=BudgetSampler(model, seed=0), repa=repa, accumulation=accumulation)


def loader_batch(parts):
    """What the DataLoader yields (CPU; pinned on a GPU machine, as the loop's loader does): latent
    moments, labels, and REPA's uint8 images."""
    g = torch.Generator().manual_seed(0)
    size = parts.model.input_size
    batch = [torch.randn(BATCH, 8, size, size, generator=g), torch.randint(0, 4, (BATCH,), generator=g)]
    if parts.repa:
        batch.insert(0, torch.randint(0, 256, (BATCH, 3, size * 8, size * 8), dtype=torch.uint8, generator=g))
    return [b.pin_memory() for b in batch] if torch.cuda.is_available() else batch


def train_steps(parts, steps=2, generator=None):
    batch = loader_batch(parts)
    for step in range(steps):
        for a in range(parts.accumulation):
            inputs = parts.prepare(batch, generator)
            inputs.model_kwargs.update(parts.budgets(step, a))
            parts.step.micro_batch(inputs, generator, step, a)
        parts.step.finish()


def sampler_inputs(model, device):
    g = torch.Generator().manual_seed(1)
    noise = [torch.randn(BATCH, *shape, generator=g).to(device) for shape in model.stage_shapes]
    y = torch.randint(0, 4, (BATCH,), generator=g).to(device)
    return noise, y


def sampler_calls(model, noise, y):
    """Every solver (the SDE with generate.py's per-sample CPU generators), CFG inside a window,
    ELIT's cheap CFG and autoguidance."""
    from generation.noise import sde_generators

    S = model.num_stages
    common = dict(num_steps_per_scale=[2] * S, thresholds=[0.5 / 2 ** i for i in range(S - 1)], cfg_scale=2.0,
                  guidance_low=0.2, guidance_high=0.8)
    elit = hasattr(model, "kept_latents")
    with torch.no_grad():
        for method in ("euler", "heun", "sde"):
            generator = sde_generators(0, range(BATCH)) if method == "sde" else None
            samplers.sample(model, noise, y, method=method, generator=generator,
                            inference_budget=0.5 if elit else None, return_previews=True, **common)
        if elit:
            samplers.sample(model, noise, y, inference_budget=1.0, unconditional_inference_budget=0.0625, **common)
            samplers.sample(model, noise, y, inference_budget=1.0, unconditional_inference_budget=0.0625,
                            autoguidance=True, **common)


@pytest.mark.parametrize("key", list(MODELS))
def test_training_step_reads_nothing_from_the_device(key):
    """Data to device, budget, objective, backward (2 micro-batches), clipping, AdamW, LR, EMA, metrics."""
    parts = training_parts(key, torch.device("meta"))
    train_steps(parts)
    assert parts.step.metrics.loss.device.type == "meta"  # it really ran on the meta device


@pytest.mark.parametrize("key", list(MODELS))
def test_sampler_step_reads_nothing_from_the_device(key):
    parts = training_parts(key, torch.device("meta"))
    sampler_calls(parts.ema_model, *sampler_inputs(parts.ema_model, torch.device("meta")))


@pytest.mark.parametrize("read", ["item", "tolist", "cpu", "bool", "float", "if"])
def test_the_meta_check_catches_every_kind_of_host_read(read, monkeypatch):
    """An `.item()` (or the like) injected into the blocks fails both checks above."""
    reads = {"item": lambda t: t.sum().item(), "tolist": lambda t: t.tolist(), "cpu": lambda t: t.cpu(),
             "bool": lambda t: bool(t.sum() > 0), "float": lambda t: float(t.sum()),
             "if": lambda t: 1 if t.abs().max() > 10 else 0}
    forward = SiTBlock.forward

    def reading_forward(self, x, c, positions=None):
        reads[read](x)
        return forward(self, x, c, positions)

    monkeypatch.setattr(SiTBlock, "forward", reading_forward)
    parts = training_parts("DFM-SiT", torch.device("meta"))
    with pytest.raises((RuntimeError, NotImplementedError)):
        train_steps(parts, steps=1)
    with pytest.raises((RuntimeError, NotImplementedError)):
        sampler_calls(parts.ema_model, *sampler_inputs(parts.ema_model, torch.device("meta")))
    monkeypatch.undo()
    parts = training_parts("DFM-SiT", torch.device("cpu"))  # the same code on real tensors is fine
    train_steps(parts, steps=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("key", list(MODELS))
def test_no_cuda_synchronisation_in_the_steps(key):
    device = torch.device("cuda")
    parts = training_parts(key, device)
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = sampler_inputs(parts.ema_model, device)
    train_steps(parts, steps=1, generator=generator)  # first use: lazy optimizer state, one-off uploads
    sampler_calls(parts.ema_model, *inputs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_steps(parts, steps=2, generator=generator)
        sampler_calls(parts.ema_model, *inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_micro_batch_seeding_draws_what_torch_manual_seed_draws():
    """seed_micro_batch seeds the global generator directly (cheaper than torch.manual_seed, the
    host work of every micro-batch): the label-dropout stream is unchanged, so runs and resumes
    repeat those of earlier versions."""
    from training.rng import micro_batch_seed, seed_micro_batch

    seed_micro_batch(3, 7, 1, torch.Generator())
    got = torch.rand(6)
    torch.manual_seed(micro_batch_seed(3, 7, 1, "labels"))
    assert torch.equal(got, torch.rand(6))
