"""Metrics during training (`eval_every`): EMA model -> generation's sampler -> images -> scores.

Built once at start (:func:`make_evaluator`, before any training step: missing or incompatible
reference statistics, missing Inception / DINOv2 weights and a VAE that cannot load are one
`ConfigError` there). Every `eval_every` steps and at the last step the loop calls it:

* sample `i` of `0 .. eval_num_samples-1` is generated exactly as generate.py would with
  `eval_sampler.seed`: its noise (`generation.noise.initial_noise`), SDE noise
  (`sde_generators`) and label (`generation.labels.class_labels`) depend on (seed, i) only,
  so every evaluation of a run (and every run) scores the same noise; process `r` of `P`
  generates the indices `r, r + P, ...`;
* `samplers.sample` integrates (the one sampler of the codebase), the pyramid is recomposed and
  decoded to uint8 (`data.vae.samples_to_uint8`; pixel-space runs need no VAE);
* `evaluation.online.OnlineEvaluator` streams each process's share through the metrics'
  accumulators, merged over the processes after each pass; the main process logs
  `{"images_seen", <metric>: value, ...}` through the run's tracker
  (so the values land in wandb / tensorboard and `metrics.jsonl` beside the training losses)
  and redraws `<run>/convergence.png` (`evaluation.compare.plot_convergence`).

All sampling runs inside `torch.random.fork_rng` with explicitly seeded generators: evaluation
never changes the training random streams (a run with and without `eval_every` has
bit-identical weights).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from samplers.methods import SAMPLER_METHODS
from training.errors import ConfigError
from training.previews import SamplerSettings, autocast_dtype, check_sampler_keys, cuda_autocast
from utils.config import option_help as _help


@dataclass
class EvalSamplerConfig(SamplerSettings):
    """The sampler of the evaluations during training (`eval_every`); the keys of generate.py."""
    method: Any = field(default=None, metadata=_help(
        "sampler method (a name or {name: ..., parameter: value}); null = the preview's", registry=SAMPLER_METHODS))
    num_steps_per_scale: Optional[List[int]] = field(default=None, metadata=_help(
        "sampler steps per stage; null = the preview's"))
    thresholds: Optional[List[float]] = field(default=None, metadata=_help(
        "stage hand-over times (length S-1); null = the preview's"))
    inference_budget: Optional[float] = field(default=None, metadata=_help(
        "ELIT models: budget of the conditional pass (fraction in (0, 1] or latent count); null = the model's"))
    labels: str = field(default="balanced", metadata=_help("balanced | random (generation/labels.py)"))
    seed: int = field(default=0, metadata=_help(
        "seed of the evaluation noise and labels (sample i depends on (seed, i) only)"))
    batch_size: int = field(default=64, metadata=_help("images per sampler call on each process"))


def check_eval_keys(cfg) -> None:
    """The evaluation keys (files and weights are checked when the evaluator is built, before training)."""
    from evaluation.scores import build_metrics

    if cfg.eval_every < 0:
        raise ConfigError(f"eval_every must be >= 0 (0 = no evaluation), got {cfg.eval_every}")
    metrics = list(cfg.eval_metrics or [])
    try:
        chosen = build_metrics(metrics, where="eval_metrics")
    except ValueError as exc:
        raise ConfigError(f"{exc} (got {metrics})") from None
    offline = [m for m in chosen if m.uses_reference and not m.stores]
    if offline:
        raise ConfigError(f"eval_metrics: {', '.join(m.name for m in offline)} cannot be computed during training: "
                          + "; ".join(m.not_storable for m in offline) + " (eval_ref_stats holds statistics only)")
    e = cfg.eval_sampler
    check_sampler_keys(e, cfg.preview.num_steps_per_scale, cfg.preview.thresholds, cfg.stages, "eval_sampler.",
                       method=cfg.preview.method)
    if e.labels not in ("balanced", "random"):
        raise ConfigError(f"eval_sampler.labels must be one of ['balanced', 'random'], got {e.labels!r}")
    if e.batch_size < 1:
        raise ConfigError(f"eval_sampler.batch_size must be >= 1, got {e.batch_size}")
    if cfg.eval_every == 0:
        return
    if not cfg.eval_ref_stats:
        raise ConfigError("eval_every is set but eval_ref_stats is not: pass the reference statistics file "
                          "(`python -m evaluation.ref_stats` output, e.g. eval_ref_stats=ref/imagenet256.npz)")
    if not os.path.isfile(str(cfg.eval_ref_stats)):
        raise ConfigError(f"eval_ref_stats: no such file {cfg.eval_ref_stats!r}")
    if cfg.eval_num_samples < 2:
        raise ConfigError(f"eval_num_samples must be >= 2, got {cfg.eval_num_samples}")


class TrainingEvaluator:
    """`evaluator.maybe_run(ema_model, step, tracker)` in the loop; `evaluator(model)` scores once."""

    def __init__(self, cfg, scorer, *, num_classes: int, device, rank: int, num_processes: int,
                 exp_dir: str, log=None, vae=None, autocast_dtype=None, gather=None):
        self.every, self.max_steps, self.batch_size = int(cfg.eval_every), int(cfg.max_train_steps), int(cfg.batch_size)
        self.log = log
        self.sampler = cfg.eval_sampler
        # the values plotted in convergence.png: each metric's headline keys
        self.metrics = [c.key for m in scorer.metrics for c in m.columns]
        self.num_samples = int(cfg.eval_num_samples)
        self.scorer, self.num_classes = scorer, num_classes
        self.device, self.rank, self.P = torch.device(device), rank, num_processes
        self.exp_dir, self.vae, self.autocast_dtype = exp_dir, vae, autocast_dtype
        self.gather = gather or (lambda obj: [obj])
        import warnings

        with warnings.catch_warnings():  # an uneven class split is fine for a metric
            warnings.simplefilter("ignore")
            from generation.labels import class_labels

            self.labels = class_labels(self.num_samples, num_classes, int(self.sampler.seed), self.sampler.labels)

    def _autocast(self):
        return cuda_autocast(self.device, self.autocast_dtype)

    @torch.no_grad()
    def generate(self, model, indices: List[int]) -> np.ndarray:
        """uint8 (len(indices), H, W, 3) images of the given sample indices (deterministic per index)."""
        import samplers
        from data.vae import samples_to_uint8
        from generation.noise import initial_noise, sde_generators

        from utils.progress import progress_bar

        e = self.sampler
        decomposition = model.decomposition
        extra = {} if e.inference_budget is None else {"inference_budget": e.inference_budget}
        out = []
        bar = progress_bar(total=len(indices), unit="img", desc="evaluation: sampling", leave=False,
                           disable=self.rank != 0)
        for lo in range(0, len(indices), int(e.batch_size)):
            batch = indices[lo:lo + int(e.batch_size)]
            noise = [n.to(self.device) for n in initial_noise(int(e.seed), batch, model.stage_shapes)]
            y = self.labels[batch].to(self.device)
            generator = sde_generators(int(e.seed), batch, device=self.device)
            with self._autocast():
                final = samplers.sample(
                    model, noise, y, num_steps_per_scale=list(e.num_steps_per_scale), thresholds=list(e.thresholds),
                    method=e.method, cfg_scale=float(e.cfg_scale), guidance_low=float(e.guidance_low),
                    guidance_high=float(e.guidance_high), generator=generator, **extra)
            out.append(samples_to_uint8(self.vae, decomposition.recompose([f.float() for f in final])))
            bar.update(len(batch))
        bar.close()
        if not out:
            size = model.input_size * (1 if self.vae is None else 8)
            return np.zeros((0, size, size, 3), np.uint8)
        return np.concatenate(out)

    def maybe_run(self, model, step: int, tracker) -> Optional[Dict[str, float]]:
        """At every `eval_every`-th step and the last: score `model` and (main process) record the values.

        Statistics that are not finite (features overflowed: no Fréchet distance exists) skip this
        evaluation with one warning line in log.txt and nothing in metrics.jsonl (a missing value
        means "not evaluated then" to every reader, a NaN or a text would break the plots and the
        trackers); the training goes on. Only the main process combines, so only it can raise this.
        """
        from evaluation.npz import NonFiniteStatistics

        if step % self.every and step != self.max_steps:
            return None
        try:
            values = self(model)
        except NonFiniteStatistics as error:
            self.log.warning(f"WARNING: evaluation at step {step} skipped: {error}; no metrics are recorded for it, "
                             "the training goes on")
            return None
        if values is not None:
            record_evaluation(tracker, self.exp_dir, values, self.metrics, step, step * self.batch_size, self.log)
        return values

    def __call__(self, model) -> Optional[Dict[str, float]]:
        """Score `model` (the EMA copy); returns the metrics on the main process, None elsewhere."""
        t0 = time.time()
        if self.log is not None:
            self.log.info(f"evaluation: sampling {self.num_samples} images on {self.P} process(es), then "
                          f"{', '.join(self.metrics)}")
        was_training = model.training
        model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        mine = list(range(self.rank, self.num_samples, self.P))
        with torch.random.fork_rng(devices=devices):
            images = self.generate(model, mine)
            values = self.scorer.score(images, self.gather, mine)
        model.train(was_training)
        if self.rank != 0:
            return None
        values["eval_seconds"] = time.time() - t0
        return values


def make_evaluator(cfg, *, exp_dir: str, device, rank: int, num_processes: int, log=None,
                   gather=None, vae=None) -> Optional[TrainingEvaluator]:
    """The evaluator of `eval_every` (None when it is 0); ConfigError on any input problem.
    `vae`: the run's decoder (`training.setup.load_decoder_vae`, loaded once for previews and
    evaluation; None in pixel space)."""
    if not cfg.eval_every:
        return None
    from evaluation.npz import EvaluationError
    from evaluation.online import OnlineEvaluator

    resolution = cfg.resolution
    try:
        scorer = OnlineEvaluator(cfg.eval_ref_stats, list(cfg.eval_metrics), (resolution, resolution), device=device,
                                 inception_weights=cfg.eval_inception_weights, dinov2_weights=cfg.eval_dinov2_weights)
    except (EvaluationError, ValueError, OSError) as e:
        raise ConfigError(f"eval_ref_stats / eval_metrics: {e}") from None
    return TrainingEvaluator(cfg, scorer, num_classes=cfg.num_classes, device=device,
                             rank=rank, num_processes=num_processes, exp_dir=exp_dir, log=log, vae=vae,
                             autocast_dtype=autocast_dtype(cfg.mixed_precision), gather=gather)


def record_evaluation(tracker, exp_dir: str, values: Dict[str, float], metrics: List[str], step: int,
                      images_seen: int, log) -> None:
    """Main process: the values to the tracker + metrics.jsonl, convergence.png redrawn, one log line."""
    from evaluation.compare import plot_convergence

    tracker.log_metrics({"images_seen": int(images_seen), **values}, step)
    log.info(f"eval step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in values.items()))
    try:
        plot_convergence(exp_dir, metrics=metrics)
    except Exception as e:  # a plot never stops training
        log.warning(f"WARNING: convergence.png not drawn ({type(e).__name__}: {e})")
