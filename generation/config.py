"""GenerateConfig: every option of generate.py, its checks, and the values derived from the checkpoint.

Order of precedence: these defaults <- `--config FILE.yaml` <- command-line overrides
(`key=value`, `--key value`), merged by `utils.config.load_config`. Keys left at `null`
are filled from the checkpoint (see `resolve_config`); the fully resolved config is saved as
`{sample_dir}/{run_name}/config.yaml` and can be passed back with `--config` to reproduce a run.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import DictConfig, ListConfig

from dfm.paths import PATHS
from dfm.predictions import PREDICTIONS
from samplers.methods import SAMPLER_METHODS
from utils.config import Alias, config_to_dict, literal, to_config
from utils.threads import cpu_threads_problem

from .labels import LABEL_MODES

PRECISIONS = ("fp32", "tf32", "bf16")
DEFAULT_VAE = "ft-ema"

# Keys that change the pixels of sample i; a run folder refuses to mix images made with
# different values of these (num_samples matters only for balanced labels, see below).
SAMPLE_KEYS = ("model", "stages", "num_classes", "seed", "labels", "method", "num_steps_per_scale",
               "thresholds", "cfg_scale", "guidance_low", "guidance_high", "path_type", "prediction", "vae",
               "resolution", "precision", "use_ema", "inference_budget", "unconditional_inference_budget",
               "autoguidance")


# Sample keys added later, with the value that folders written before them were made with.
_ADDED_KEYS = {"inference_budget": None, "unconditional_inference_budget": None, "autoguidance": False,
               "prediction": "velocity"}


class GenerationError(Exception):
    """A problem the user can fix (bad option, wrong checkpoint, ...); printed without a traceback."""


def _help(text: str, default: Any = None, factory=None, registry=None):
    from utils.config import option_help

    if factory is not None:
        return field(default_factory=factory, metadata=option_help(text, registry=registry))
    return field(default=default, metadata=option_help(text, registry=registry))


@dataclass
class GenerateConfig:
    ckpt: Optional[str] = _help("checkpoint to sample from (ours, REPA or official SiT); required")
    model: Optional[str] = _help("architecture name, e.g. SiT-XL/2; needed only for published "
                                 "checkpoints that store no architecture")
    stages: Optional[int] = _help("number of DFM stages (null: from the checkpoint)")
    num_samples: int = _help("number of images to generate", 50_000)
    per_proc_batch_size: int = _help("images per forward batch in each process", 64)
    seed: int = _help("global seed; sample i depends only on (seed, i)", 0)
    labels: str = _help("class labels: random (i.i.d. per sample) or balanced (N/num_classes each)",
                        "random")
    num_classes: Optional[int] = _help("number of classes (null: from the model)")
    method: Any = _help("sampler method: a name or {name: ..., parameter: value} (samplers/methods.py): euler, heun "
                        "(ODE), sde (Euler-Maruyama), ...", "euler", registry=SAMPLER_METHODS)
    num_steps_per_scale: Optional[List[int]] = _help(
        "steps of each stage's chunk, e.g. [40, 10]; SiT: [N] (null: [50] for SiT, [40, 10] for S=2, "
        "[40] + [10] * (S-1) beyond)")
    thresholds: Optional[List[float]] = _help(
        "DFM stage thresholds in t, decreasing, S-1 values (null: [] for SiT, [0.1] for S=2, "
        "0.1 / 2^i beyond)")
    num_steps: Optional[int] = _help(
        "steps of a one-stage (SiT) model when num_steps_per_scale is null (the reference's option; "
        "multistage models use num_steps_per_scale, as in the reference)")
    cfg_scale: float = _help("classifier-free guidance scale (1 = no guidance)", 1.0)
    guidance_low: float = _help("CFG is applied where guidance_low <= t <= guidance_high", 0.0)
    guidance_high: float = _help("upper end of the guidance interval (t, 1 = noise)", 1.0)
    inference_budget: Optional[float] = _help(
        "ELIT models: fraction in (0, 1] of the latents of every window the core blocks see, or a latent "
        "count > 1 (null: the model's one training budget; required for multi-budget models)")
    unconditional_inference_budget: Optional[float] = _help(
        "ELIT models with cfg_scale > 1: run the unconditional pass at this (low) budget, e.g. 0.0625 "
        "(cheap CFG); null: both passes at inference_budget (plain CFG)")
    autoguidance: bool = _help("ELIT: the low-budget guiding pass keeps the real label instead of the null "
                               "label (needs unconditional_inference_budget)", False)
    stage_scales: Any = _help(
        "stage calibration (SPEC §11) is read from the checkpoint: null or auto = the checkpoint's; a list "
        "(or none) is checked against it and a mismatch is an error")
    path_type: Any = _help("probability path (dfm/paths.py); null: the checkpoint's (stored with the model; "
                           "REPA / official SiT checkpoints: linear). A checkpoint of ours must match a value given; "
                           "for a foreign checkpoint it says how the weights were trained", registry=PATHS)
    prediction: Any = _help("what the model outputs (dfm/predictions.py); null: the checkpoint's (foreign "
                            "checkpoints: velocity); as path_type", registry=PREDICTIONS)
    vae: Optional[str] = _help("ft-ema | ft-mse | a local folder | none for pixel models "
                               "(null: from the checkpoint, else ft-ema)")
    resolution: Optional[int] = _help("image size in pixels (null: from the checkpoint / model)")
    precision: str = _help("fp32 | tf32 | bf16 (model forward; the VAE decodes in fp32)", "tf32")
    use_ema: bool = _help("sample with the EMA weights (false: the raw training weights)", True)
    compile: bool = _help("torch.compile the model's transformer blocks (models/compile.py): faster sampling "
                          "after a one-off compile (about a minute on a CPU)", False)
    cpu_threads: Optional[int] = _help("torch CPU threads per process; null = OMP_NUM_THREADS if set, else the "
                                       "usable CPUs / processes per machine (utils/threads.py)")
    trust_checkpoint: bool = _help(
        "allow full unpickling of a .pt that safe loading refuses. DANGEROUS: unpickling runs any code the "
        "file carries; use only for files you made or fully trust (or convert them to .safetensors)", False)
    sample_dir: str = _help("output folder", "results")
    run_name: Optional[str] = _help("sub-folder / .npz name (null: derived from ckpt + settings)")
    save_png: bool = _help("keep the PNG folder (false: delete it once the .npz is written)", True)
    save_npz: bool = _help("write {sample_dir}/{run_name}.npz for the ADM evaluation suite", True)


def _current_method(cfg) -> str | None:
    try:
        return SAMPLER_METHODS.split(cfg.method)[0]
    except ValueError:
        return None


def _mode(value, cfg) -> dict:
    """The reference's `mode: ode | sde`: sde selects the SDE; ode keeps an ODE method already chosen
    (heun, or one of our own) and turns only the SDE into euler."""
    if value == "sde":
        return {"method": "sde"}
    if value == "ode":
        return {"method": "euler"} if _current_method(cfg) == "sde" else {}
    raise GenerationError(f"config key 'mode' (reference name of 'method'): must be ode or sde, got {value!r}")


def _heun(value, cfg) -> dict:
    """The reference's `heun: true | false`: true selects heun; false turns heun back into euler and
    leaves any other method alone."""
    if value:
        return {} if _current_method(cfg) == "sde" else {"method": "heun"}
    return {"method": "euler"} if _current_method(cfg) == "heun" else {}


def _tf32(value, cfg) -> dict:
    if cfg.precision == "bf16":
        return {}
    return {"precision": "tf32" if value else "fp32"}


_FROM_CHECKPOINT = "the architecture is read from the checkpoint"
# Option names of the reference generate.py -> ours (docs/GENERATION.md, "Reference option names").
GENERATE_ALIASES = {
    "global_seed": Alias("seed"),
    "num_fid_samples": Alias("num_samples"),
    "stages_count": Alias("stages"),
    "stage_sampling_thresholds": Alias("thresholds"),
    "mode": Alias(convert=_mode, note="method: ode -> euler (heun with heun=true), sde -> sde"),
    "heun": Alias(convert=_heun, note="method=heun"),
    "tf32": Alias(convert=_tf32, note="precision: tf32 / fp32"),
    "exp_name": Alias(note="the output folder is {sample_dir}/{run_name}"),
    "legacy": Alias(note="published checkpoints are converted on load"),
    **{key: Alias(note=_FROM_CHECKPOINT) for key in (
        "encoder_depth", "fused_attn", "qk_norm", "enable_repa", "projector_embed_dims",
        "elit_max_mask_prob", "elit_min_mask_prob", "elit_group_size")},
}
# Keys generate.py takes from a training config given with --train-config (below --config).
_TRAIN_KEYS = {"model": "model", "stages": "stages", "stages_count": "stages", "num_classes": "num_classes",
               "path_type": "path_type", "vae": "vae", "resolution": "resolution", "stage_scales": "stage_scales"}


def train_config_layer(train_config: dict) -> dict:
    """The sampling-relevant keys of a training YAML (ours or the reference's), renamed to ours."""
    return {ours: train_config[theirs] for theirs, ours in _TRAIN_KEYS.items() if theirs in train_config}


def load_generate_config(argv) -> DictConfig:
    """defaults <- --train-config <- --config / --eval-config <- overrides (reference names accepted)."""
    from utils.config import load_config

    return load_config(GenerateConfig, argv, aliases=GENERATE_ALIASES, config_options=("config", "eval_config"),
                       file_layers={"train_config": train_config_layer})


# a typo's bound: 10**20 started a run that would never end (one sample folder, one .npz of them all)
MAX_SAMPLES = 100_000_000


def validate_config(cfg: DictConfig) -> None:
    """Checks that need no checkpoint; raise GenerationError naming the key."""
    def fail(key, msg):
        raise GenerationError(f"config key '{key}': {msg}")

    if not cfg.ckpt:
        fail("ckpt", "no checkpoint given; pass --ckpt PATH (or ckpt=PATH)")
    if not 1 <= cfg.num_samples <= MAX_SAMPLES:
        fail("num_samples", f"must be from 1 to {MAX_SAMPLES:,} (FID uses 50,000), got {cfg.num_samples}")
    if cfg.per_proc_batch_size < 1:
        fail("per_proc_batch_size", f"must be >= 1, got {cfg.per_proc_batch_size}")
    if cfg.labels not in LABEL_MODES:
        fail("labels", f"must be one of {LABEL_MODES}, got {cfg.labels!r}")
    try:
        cfg.method = SAMPLER_METHODS.compact(cfg.method)
    except ValueError as error:
        fail("method", str(error))
    if cfg.precision not in PRECISIONS:
        fail("precision", f"must be one of {PRECISIONS}, got {cfg.precision!r}")
    for key, registry in (("path_type", PATHS), ("prediction", PREDICTIONS)):
        if cfg[key] is not None:
            try:
                cfg[key] = registry.compact(cfg[key])
            except ValueError as error:
                fail(key, str(error))
    if cfg.stages is not None and cfg.stages < 1:
        fail("stages", f"must be >= 1, got {cfg.stages}")
    if cfg.num_classes is not None and cfg.num_classes < 1:
        fail("num_classes", f"must be >= 1, got {cfg.num_classes}")
    if not (math.isfinite(cfg.cfg_scale) and cfg.cfg_scale >= 0):
        fail("cfg_scale", f"must be a finite number >= 0, got {cfg.cfg_scale}")
    if not 0.0 <= cfg.guidance_low <= cfg.guidance_high <= 1.0:
        fail("guidance_low/guidance_high",
             f"need 0 <= guidance_low <= guidance_high <= 1, got {cfg.guidance_low}, {cfg.guidance_high}")
    if cfg.num_steps is not None and cfg.num_steps < 1:
        fail("num_steps", f"must be >= 1, got {cfg.num_steps}")
    if cfg.num_steps_per_scale is not None:
        steps = list(cfg.num_steps_per_scale)
        if not steps or any(n < 1 for n in steps):
            fail("num_steps_per_scale", f"needs one positive step count per stage, got {steps}")
    if cfg.thresholds is not None:
        tau = list(cfg.thresholds)
        if any(not 0.0 < x < 1.0 for x in tau) or any(a <= b for a, b in zip(tau, tau[1:])):
            fail("thresholds", f"must be strictly decreasing values in (0, 1), got {tau}")
    for key in ("inference_budget", "unconditional_inference_budget"):
        value = cfg[key]
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and 0 < value < math.inf):
            fail(key, f"must be a fraction in (0, 1] or a latent count > 1, got {value!r}")
    if cfg.autoguidance and cfg.unconditional_inference_budget is None:
        fail("autoguidance", "needs unconditional_inference_budget (the budget of the guiding pass, e.g. 0.0625)")
    if not cfg.save_png and not cfg.save_npz:
        fail("save_png/save_npz", "both are false, nothing would be kept")
    if cfg.run_name is not None and (not cfg.run_name or "/" in cfg.run_name or cfg.run_name in (".", "..")):
        fail("run_name", f"must be a plain folder name, got {cfg.run_name!r}")
    if cfg.resolution is not None and cfg.resolution < 1:
        fail("resolution", f"must be >= 1, got {cfg.resolution}")
    if problem := cpu_threads_problem(cfg.cpu_threads):
        fail("cpu_threads", problem)


def resolve_config(cfg: DictConfig, *, arch_name: str, num_stages: int, num_classes: int,
                   input_size: int, ckpt_config: dict | None, stage_scales=None,
                   path_type="linear", prediction="velocity") -> DictConfig:
    """Fill every null key from the model / checkpoint config and check it against the model.

    arch_name, num_stages, num_classes, input_size, stage_scales, path_type, prediction: of the
    loaded model (the last two as specs). ckpt_config: the training config stored in our
    checkpoints (None for published ones).
    """
    out = to_config(cfg)
    ckpt_config = ckpt_config or {}
    S = num_stages

    def fail(key, msg):
        raise GenerationError(f"config key '{key}': {msg}")

    out.model = out.model or arch_name
    if out.stages is not None and out.stages != S:
        fail("stages", f"{out.stages} given, but the checkpoint's model has {S} stage(s)")
    out.stages = S
    if out.num_classes is not None and out.num_classes != num_classes:
        fail("num_classes", f"{out.num_classes} given, but the checkpoint's model has {num_classes} classes")
    out.num_classes = num_classes
    out.stage_scales = _check_stage_scales(out.stage_scales, stage_scales)

    # Null sampler settings: the schedule the training previews use (SPEC section 5 for S <= 2).
    from samplers.schedules import default_schedule
    default_steps, default_thresholds = default_schedule(S)
    if out.num_steps_per_scale is None:
        out.num_steps_per_scale = [out.num_steps] if out.num_steps and S == 1 else default_steps
    if len(out.num_steps_per_scale) != S:
        fail("num_steps_per_scale", f"needs {S} value(s) (one per stage), got {list(out.num_steps_per_scale)}")
    if out.thresholds is None:
        out.thresholds = default_thresholds
    if len(out.thresholds) != S - 1:
        fail("thresholds", f"needs {S - 1} value(s) for a {S}-stage model, got {list(out.thresholds)}")
    from samplers.methods import check_sampler_settings

    try:  # the sampler of generate.py and the budget sweep, checked before any image or record is written
        out.method = check_sampler_settings(out.method, out.num_steps_per_scale, out.thresholds, S)
    except ValueError as error:  # the message starts with the key's name
        key = str(error).split()[0].rstrip(":")
        fail(key, str(error).removeprefix(f"{key}: "))

    for key, registry, stored in (("path_type", PATHS, path_type), ("prediction", PREDICTIONS, prediction)):
        if out[key] is not None and registry.canonical(out[key]) != registry.canonical(stored):
            fail(key, f"{out[key]!r} given, but the checkpoint's model was trained with {stored!r}; it comes with "
                      "the weights: drop the key")
        out[key] = registry.compact(stored)
    if out.vae is None:
        if "vae" in ckpt_config:  # training writes "none" (or an empty value) for pixel space
            stored = ckpt_config["vae"]
            out.vae = "none" if stored is None or str(stored).lower() in ("", "none") else literal(str(stored))
        else:
            out.vae = DEFAULT_VAE
    out.vae = "none" if str(out.vae).lower() == "none" else literal(str(out.vae))  # text from a file stays text
    pixel_space = out.vae == "none"
    expected = input_size if pixel_space else input_size * 8
    if out.resolution is not None and out.resolution != expected:
        fail("resolution", f"{out.resolution} given, but the model makes {expected}px images "
                           f"({'pixel space' if pixel_space else f'latent {input_size}x{input_size}, VAE x8'})")
    out.resolution = expected
    if out.run_name is None:
        out.run_name = default_run_name(out)
    return out


def _check_stage_scales(given, stored):
    """The model's stage scales (they come with the weights); a given value must agree."""
    if given is None or (isinstance(given, str) and given.lower() == "auto"):
        return stored
    if isinstance(given, str) and given.lower() == "none":
        given = None
    if given is not None and (isinstance(given, str) or not isinstance(given, (list, tuple, ListConfig))):
        raise GenerationError(f"config key 'stage_scales': must be null, auto, none or a list of numbers, "
                              f"got {given!r}")
    given_list = None if given is None else list(given)
    try:
        same = (given_list is None and stored is None) or (
            given_list is not None and stored is not None and len(given_list) == len(stored)
            and all(math.isclose(float(a), float(b), rel_tol=1e-6) for a, b in zip(given_list, stored)))
    except (TypeError, ValueError):
        same = False
    if not same:
        raise GenerationError(
            f"config key 'stage_scales': {given_list if given_list is not None else 'none'} given, but the "
            f"checkpoint's model was trained with {stored if stored is not None else 'none (no stage calibration)'}; "
            "stage scales come with the weights: drop the key (or set it to auto)")
    return stored


# folders of a run folder that hold weights (training checkpoints, exported weights, post-hoc EMA
# reconstructions): a file in one is named after the run, so two runs' files never share a name
RUN_SUBFOLDERS = ("checkpoints", "weights", "reconstructed", "posthoc_ema")


def checkpoint_tag(ckpt: str) -> str:
    """exps/sit-b-2-256px/checkpoints/0400000.pt -> sit-b-2-256px-0400000; the same for
    exps/RUN/weights/STEP.safetensors and exps/RUN/posthoc_ema/reconstructed/STEP-stdS.safetensors."""
    path = os.path.normpath(os.path.expanduser(ckpt))
    stem = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.dirname(path)
    if os.path.basename(folder) in RUN_SUBFOLDERS:
        while os.path.basename(folder) in RUN_SUBFOLDERS:
            folder = os.path.dirname(folder)
        stem = f"{os.path.basename(folder)}-{stem}"
    return _file_name_part(stem)


def _file_name_part(text: str) -> str:
    """`text` with every run of characters unsafe in a folder name replaced by one underscore."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "ckpt"


def _num(x: float) -> str:
    return f"{float(x):g}"


def default_run_name(cfg: DictConfig, legacy: bool = False) -> str:
    """Folder name from the checkpoint and every setting that changes the images; the precision only
    when it is not the default tf32 (which is fp32 on a machine without CUDA). ``legacy``: the name
    the version before 2026-12-07 gave (tf32 named, post-hoc reconstructions and exported weights
    without their run's name), which a rerun of an older run keeps using."""
    steps = "+".join(str(n) for n in cfg.num_steps_per_scale)
    tag = checkpoint_tag(cfg.ckpt)
    if legacy:
        path = os.path.normpath(os.path.expanduser(cfg.ckpt))
        stem = os.path.splitext(os.path.basename(path))[0]
        tag = tag if os.path.basename(os.path.dirname(path)) == "checkpoints" else _file_name_part(stem)
    parts = [tag, f"{SAMPLER_METHODS.tag(cfg.method)}{steps}"]
    if cfg.thresholds:
        parts.append("th" + "+".join(_num(x) for x in cfg.thresholds))
    parts.append(f"cfg{_num(cfg.cfg_scale)}")
    if cfg.get("inference_budget") is not None:
        parts.append(f"b{_num(cfg.inference_budget)}")
    if cfg.get("unconditional_inference_budget") is not None:
        parts.append(f"{'ag' if cfg.autoguidance else 'ub'}{_num(cfg.unconditional_inference_budget)}")
    if cfg.cfg_scale != 1.0 and (cfg.guidance_low, cfg.guidance_high) != (0.0, 1.0):
        parts.append(f"g{_num(cfg.guidance_low)}-{_num(cfg.guidance_high)}")
    if cfg.path_type not in ("linear", None):
        parts.append(PATHS.tag(cfg.path_type))
    if cfg.get("prediction") not in ("velocity", None):
        parts.append(PREDICTIONS.tag(cfg.prediction))
    if cfg.vae != "none":
        short = cfg.vae.replace("stabilityai/sd-vae-", "")
        vae = short if short in ("ft-ema", "ft-mse", "ema", "mse") else "vae-" + checkpoint_tag(cfg.vae)
        parts.append(vae)
    parts += [cfg.labels, f"seed{cfg.seed}", f"n{cfg.num_samples}"]
    if legacy or cfg.precision != "tf32":
        parts.append(cfg.precision)
    if not cfg.use_ema:
        parts.append("noema")
    return "-".join(parts)


def mismatched_keys(saved: dict, current: DictConfig) -> list[str]:
    """Image-affecting keys on which a run folder's saved config.yaml and this run disagree."""
    keys = list(SAMPLE_KEYS) + (["num_samples"] if current.labels == "balanced" else [])
    cur = config_to_dict(current)
    diff = [f"{k}: {saved.get(k, _ADDED_KEYS.get(k))!r} (folder) vs {cur.get(k)!r} (now)"
            for k in keys if saved.get(k, _ADDED_KEYS.get(k)) != cur.get(k)]
    old_ckpt, new_ckpt = str(saved.get("ckpt")), str(cur.get("ckpt"))
    if old_ckpt != new_ckpt and os.path.realpath(old_ckpt) != os.path.realpath(new_ckpt):
        diff.insert(0, f"ckpt: {old_ckpt!r} (folder) vs {new_ckpt!r} (now)")
    return diff
