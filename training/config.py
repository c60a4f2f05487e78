"""Training configuration: the `TrainConfig` defaults and their validation.

Defaults are the REPA / DFM recipe of SPEC §6 (AdamW 1e-4, batch 256, EMA 0.9999, bf16,
400K steps, checkpoints every 50K). A run is `defaults <- --config YAML <- overrides`
(`utils.config.load_config`); `resolve_config` fills the model-dependent defaults (stages,
stage weights, preview schedule, experiment name) and checks every key once, before any data
or GPU work, raising `ConfigError` with a message that names the key.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from models.registry import ELIT_OVERRIDES, OVERRIDES, is_elit, parse_name
from training.budget import resolve_elit_keys
from training.calibration import check_stage_scales_key
from training.errors import ConfigError
from training.evaluator import EvalSamplerConfig, check_eval_keys
from training.nonfinite import check_nonfinite_keys
from training.posthoc_ema import PosthocEMAConfig, check_posthoc_keys
from training.objective import build_objective, check_objective_keys
from training.previews import PreviewConfig, check_preview_keys
from training.repa import check_repa_config
from dfm.decompositions import DECOMPOSITIONS
from dfm.paths import PATHS
from dfm.predictions import PREDICTIONS
from dfm.timesteps import TIME_DISTRIBUTIONS
from training.aliases import TRAIN_ALIASES
from training.run_name import RunNaming
from utils.config import config_to_dict, literal, load_config, to_config
from utils.config import option_help as _help
from utils.registry import SpecDefault
from utils.threads import cpu_threads_problem

# Architecture options a config sets through their own top-level key (or that follow from the
# data); every other option of the model constructors may go in `model_overrides`.
OWN_KEYS = {"input_size": "resolution", "in_channels": "vae", "num_classes": "num_classes", "qk_norm": "qk_norm",
            "stages": "stages", "class_dropout_prob": "cfg_prob", "encoder_depth": "encoder_depth",
            "z_dims": "enc_type", "stage_scales": "stage_scales", "decomposition": "decomposition",
            "group_size": "group_size", "elit_min_mask_prob": "elit_min_mask_prob",
            "elit_max_mask_prob": "elit_max_mask_prob", "path_type": "path_type", "prediction": "prediction",
            "time_flip": None}
MODEL_OVERRIDE_KEYS = tuple(sorted((OVERRIDES | ELIT_OVERRIDES) - set(OWN_KEYS)))
VAE_NONE = ("none", "", None)
LR_SCHEDULERS = ("constant", "constant_with_linear_warmup")


@dataclass
class TrainConfig:
    # --- model ---
    model: str = field(default="DFM-SiT-XL/2", metadata=_help(
        "[DFM-][ELIT-]SiT-{S,B,L,XL}/{2,4,8}: SiT, DFM-SiT, ELIT-SiT or DFM-ELIT-SiT"))
    stages: Optional[int] = field(default=None, metadata=_help(
        "pyramid stages S; null = 2 for DFM-SiT, 1 for SiT (SiT must be 1)", identity=True))
    qk_norm: bool = field(default=False, metadata=_help("RMS/LayerNorm on queries and keys", identity=True))
    encoder_depth: Optional[int] = field(default=None, metadata=_help(
        "block after which the REPA projector reads tokens; null = model default", identity=True))
    proj_coeff: float = field(default=0.0, metadata=_help(
        "REPA alignment loss weight (REPA: 0.5; needs enc_type); 0 = no alignment", identity=True))
    group_size: Optional[int] = field(default=None, metadata=_help(
        "ELIT: window side g in tokens (g x g tokens, g^2 latents per window); null = 4 at 256 px, 8 at 512 px", identity=True))
    elit_min_mask_prob: Optional[float] = field(default=None, metadata=_help(
        "ELIT: smallest dropped fraction of latents per window in training; null = elit_max_mask_prob"))
    elit_max_mask_prob: float = field(default=0.0, metadata=_help(
        "ELIT: largest dropped fraction (0 = single full budget; 1 - 1/g^2 = every budget)"))
    enc_type: str = field(default="none", metadata=_help(
        "REPA encoder(s), comma-separated, e.g. dinov2-vit-b; none = no alignment loss", identity=True))
    encoder_weights: Optional[str] = field(default=None, metadata=_help(
        "REPA encoder weight file(s), comma-separated like enc_type; null = the hub"))
    encoder_overrides: Dict[str, Any] = field(default_factory=dict, metadata=_help(
        "REPA encoder architecture overrides for tiny test encoders, keys depth, embed_dim, num_heads, mlp_ratio"))
    model_overrides: Dict[str, Any] = field(default_factory=dict, metadata=_help(
        f"other architecture options (small models, block parts), keys {list(MODEL_OVERRIDE_KEYS)}; mlp / "
        "norm / attention take a name or {name: ..., parameter: value} (models/blocks.py)", identity=True))
    decomposition: Any = field(default=None, metadata=_help(
        "DFM's multi-scale decomposition: a name or {name: ..., parameter: value} (dfm/decompositions.py); "
        "null = laplacian (the reference's pyramid). Stored with the model", registry=DECOMPOSITIONS, identity=True))
    # --- objective ---
    stage_weights: Optional[List[float]] = field(default=None, metadata=_help(
        "probability of training each stage (length S, sums to 1); null = [1] / [0.9,0.1] / "
        "[0.9, 0.1/(S-1), ...]", identity=True))
    stage_sampling: str = field(default="per_batch", metadata=_help("per_batch (reference) | per_sample", identity=True))
    earlier_stage_loc: float = field(default=-2.0, metadata=_help("earlier stages: t = sigmoid(N(loc, scale))", identity=True))
    earlier_stage_scale: float = field(default=1.0, metadata=_help("see earlier_stage_loc", identity=True))
    stage_scales: Any = field(default=None, metadata=_help(
        "stage calibration (SPEC §11): null = reference; [c_0, ..., c_{S-1}] trains and samples stage s on c_s * "
        "P_s; auto = every level to the coarsest level's RMS, measured on the training data at the start "
        "(training/calibration.py). Stored with the model", identity=True))
    stage_time_shift: Optional[List[float]] = field(default=None, metadata=_help(
        "per-stage logit shift of the trained stage's time: t = sigmoid(logit(t) + shift_s) (lognormal: "
        "logit-normal(shift_s, 1); > 0 = noisier); null = reference", identity=True))
    time_distribution: Any = field(default="lognormal", metadata=_help(
        "time distribution of the trained stage: a name or {name: ..., parameter: value} (dfm/timesteps.py), e.g. "
        "lognormal, uniform, {name: logit_normal, loc: 0.0, scale: 1.0}; `weighting` is the same key",
        registry=TIME_DISTRIBUTIONS, identity=True))
    path_type: Any = field(default="linear", metadata=_help(
        "probability path x_t = alpha(t) x + sigma(t) eps: a name or {name: ..., parameter: value} (dfm/paths.py; "
        "linear is SiT's and REPA's); stored with the model", registry=PATHS, identity=True))
    prediction: Any = field(default="velocity", metadata=_help(
        "what the model outputs: a name or {name: ..., loss: velocity} for a loss in velocity space "
        "(dfm/predictions.py; velocity, alias v, is SiT's and REPA's); stored with the model", registry=PREDICTIONS,
        identity=True))
    cfg_prob: float = field(default=0.1, metadata=_help("label dropout probability (for CFG)", identity=True))
    # --- data ---
    data_dir: Optional[str] = field(default=None, metadata=_help(
        "dataset folder or ZIP (dataset_tools.py convert/encode output)"))
    images_dir: Optional[str] = field(default=None, metadata=_help(
        "REPA: the images (convert output) encoded into the latents of data_dir; null = data_dir/images"))
    vae: str = field(default="ft-ema", metadata=_help(
        "VAE for latent runs (ft-ema, ft-mse, hub name or local folder); none = pixel space"))
    resolution: int = field(default=256, metadata=_help("image resolution in pixels"))
    num_classes: int = field(default=1000, metadata=_help("number of classes (null label = num_classes)", identity=True))
    make_demo_data: bool = field(default=False, metadata=_help(
        "write the synthetic demo dataset into data_dir first if it holds none"))
    demo_images_per_class: int = field(default=200, metadata=_help("size of the demo dataset per class"))
    batch_size: int = field(default=256, metadata=_help(
        "global batch (all processes x gradient_accumulation_steps)", identity=True))
    num_workers: int = field(default=4, metadata=_help("data loader workers per process"))
    bad_samples: str = field(default="error", metadata=_help(
        "a corrupt data file: error (stop, naming the file) | skip (train on a fixed stand-in, list it in "
        "<exp>/bad_samples.json)"))
    # --- optimisation ---
    mixed_precision: str = field(default="bf16", metadata=_help("bf16 | fp16 | no"))
    allow_tf32: bool = field(default=True, metadata=_help("TF32 matmuls on Ampere+ GPUs"))
    lr: float = field(default=1e-4, metadata=_help("AdamW learning rate", identity=True))
    lr_scheduler: str = field(default="constant", metadata=_help(
        "constant | constant_with_linear_warmup (0 -> lr over warmup_steps, then constant)", identity=True))
    warmup_steps: int = field(default=0, metadata=_help("linear warm-up steps of constant_with_linear_warmup", identity=True))
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999], metadata=_help("AdamW betas", identity=True))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay", identity=True))
    adam_eps: float = field(default=1e-8, metadata=_help("AdamW epsilon", identity=True))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm (0 = off)", identity=True))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    cpu_threads: Optional[int] = field(default=None, metadata=_help(
        "torch CPU threads per process, also under accelerate's multi-CPU launch; null = OMP_NUM_THREADS if "
        "set, else the usable CPUs / processes per machine (utils/threads.py; the CPU demo uses 1: spinning "
        "OpenMP threads are very slow on a busy machine)"))
    compile: bool = field(default=False, metadata=_help(
        "torch.compile the transformer blocks for training, previews and evaluation (models/compile.py)"))
    ema_decay: float = field(default=0.9999, metadata=_help("EMA decay, updated every optimizer step", identity=True))
    posthoc_ema: PosthocEMAConfig = field(default_factory=PosthocEMAConfig)
    on_nonfinite: str = field(default="stop", metadata=_help(
        "a step whose gradients are NaN/inf: stop (the run stops at the next log step) | skip (the step changes "
        "nothing, decided on the device; counted as skipped_steps) (training/nonfinite.py)"))
    max_skipped_steps: int = field(default=100, metadata=_help(
        "on_nonfinite=skip: stop after this many skipped steps in a row"))
    seed: int = field(default=0, metadata=_help("global seed (model init, data order, noise)", identity=True))
    # --- schedule ---
    max_train_steps: int = field(default=400_000, metadata=_help("optimizer steps"))
    checkpointing_steps: int = field(default=50_000, metadata=_help("save a checkpoint every N steps (and at the end)"))
    save_format: str = field(default="pt", metadata=_help(
        "pt (training checkpoints only) | safetensors (also export the EMA and raw weights with their arch "
        "and config as <exp>/weights/<step>.safetensors at each checkpoint)"))
    checkpoints_total_limit: Optional[int] = field(default=None, metadata=_help(
        "keep only the newest K checkpoints; null = keep all"))
    sampling_steps: int = field(default=10_000, metadata=_help("preview grid every N steps (and at start/end); 0 = start/end only"))
    log_every: int = field(default=100, metadata=_help("log averaged metrics every N steps (host sync only then)"))
    # --- output / logging ---
    output_dir: str = field(default="exps", metadata=_help("parent folder of experiment folders"))
    exp_name: Optional[str] = field(default=None, metadata=_help(
        "experiment folder name; null = derived from model, resolution and weighting"))
    report_to: str = field(default="none", metadata=_help("none | wandb | tensorboard"))
    wandb_project: str = field(default="dfm-sit", metadata=_help("wandb project"))
    wandb_mode: Optional[str] = field(default=None, metadata=_help(
        "online | offline | disabled; null = $WANDB_MODE or online"))
    resume: Optional[str] = field(default="auto", metadata=_help(
        "auto (newest complete checkpoint in the experiment, if any) | none | STEP (that step's checkpoint "
        "in this experiment) | path to a checkpoint"))
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    # --- evaluation during training (training/evaluator.py) ---
    eval_every: int = field(default=0, metadata=_help(
        "score the EMA model every N steps (and at the end) into metrics.jsonl + convergence.png; 0 = off"))
    eval_num_samples: int = field(default=10_000, metadata=_help("images per evaluation, split over the processes"))
    eval_metrics: List[str] = field(default_factory=lambda: ["fdd"], metadata=_help(
        "metrics registered in evaluation/scores.py that a statistics file can score (see evaluate --help)"))
    eval_ref_stats: Optional[str] = field(default=None, metadata=_help(
        "reference statistics (.npz of `python -m evaluation.ref_stats`, or the study's heldout_swd.npz)"))
    eval_inception_weights: Optional[str] = field(default=None, metadata=_help(
        "Inception weights file for fid/sfid; null = the torch.hub cache"))
    eval_dinov2_weights: Optional[str] = field(default=None, metadata=_help(
        "DINOv2 ViT-L/14 weights file for fdd; null = the Hugging Face cache"))
    eval_sampler: EvalSamplerConfig = field(default_factory=EvalSamplerConfig)


NAMING = RunNaming(TrainConfig)  # default experiment names (training/run_name.py)


def config_docs() -> str:
    from utils.config import config_help

    return config_help(TrainConfig, TRAIN_ALIASES, registries=REGISTRY_KEYS)


def _registries() -> dict:
    """The registries of the architecture options set through `model_overrides` (those of the config's
    own keys are declared with the key): every model-constructor argument that takes a registry spec."""
    from models.registry import ELIT_OPTIONS, SIT_OPTIONS

    return {f"model_overrides.{key}": default.registry for key, default in {**SIT_OPTIONS, **ELIT_OPTIONS}.items()
            if isinstance(default, SpecDefault) and key in MODEL_OVERRIDE_KEYS}


REGISTRY_KEYS = _registries


def parse_config(argv) -> "OmegaConf":
    """argv -> resolved, validated DictConfig (ConfigError on any problem)."""
    try:
        cfg = load_config(TrainConfig, argv, aliases=TRAIN_ALIASES)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return resolve_config(cfg)


def is_pixel_space(cfg) -> bool:
    return str(cfg.vae).lower() in ("none", "")


MAX_WORKERS = 256
MAX_SEED = 2 ** 40


def resolve_config(cfg) -> "OmegaConf":
    """Fill model-dependent defaults and validate; returns a new DictConfig.

    Raises ConfigError naming the offending key. Each piece checks its own keys (stage scales:
    training.calibration, ELIT: training.budget, REPA: training.repa, previews and evaluation:
    training.previews / training.evaluator); the architecture and the objective are checked by
    building them (on the meta device), so a registry entry's signature is its validation.
    """
    cfg = to_config(cfg)  # plain (untyped) copy we may edit freely
    identity = NAMING.identity_hash(cfg)
    try:
        is_dfm, _size, patch = parse_name(cfg.model)
    except ValueError:
        raise ConfigError(f"model: unknown name {cfg.model!r}; expected [DFM-][ELIT-]SiT-{{S,B,L,XL}}/{{2,4,8}}: "
                          "SiT-XL/2, DFM-SiT-XL/2, ELIT-SiT-XL/2, DFM-ELIT-SiT-XL/2, ...") from None
    if cfg.stages is None:
        cfg.stages = 2 if is_dfm else 1
    if not is_dfm and cfg.stages != 1:
        raise ConfigError(f"stages: {cfg.model} is a plain SiT{' with ELIT' if is_elit(cfg.model) else ''} "
                          f"(1 stage), got stages={cfg.stages}; "
                          "use a DFM-* model (DFM-SiT-*, DFM-ELIT-SiT-*) for a multi-stage pyramid")
    if cfg.stages < 1:
        raise ConfigError(f"stages must be >= 1, got {cfg.stages}")
    S = cfg.stages
    check_stage_scales_key(cfg)
    if str(cfg.mixed_precision) in ("False", "false"):  # YAML reads a bare `no` as false
        cfg.mixed_precision = "no"
    for key, allowed in (("mixed_precision", ("bf16", "fp16", "no")),
                         ("report_to", ("none", "wandb", "tensorboard")), ("lr_scheduler", LR_SCHEDULERS),
                         ("bad_samples", ("error", "skip")), ("save_format", ("pt", "safetensors"))):
        _choice(cfg, key, allowed)
    if cfg.wandb_mode is not None:
        _choice(cfg, "wandb_mode", ("online", "offline", "disabled"))
    if cfg.warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if not 0.0 <= cfg.cfg_prob < 1.0:
        raise ConfigError(f"cfg_prob must be in [0, 1), got {cfg.cfg_prob}")
    for key in cfg.model_overrides:
        if key not in MODEL_OVERRIDE_KEYS:
            hint = OWN_KEYS.get(key)
            raise ConfigError(f"model_overrides.{key} is not allowed"
                              + (f"; set the top-level key '{hint}' instead" if hint else "")
                              + f". Allowed: {list(MODEL_OVERRIDE_KEYS)}")
    if "elit_tail_depth" in cfg.model_overrides and not is_elit(cfg.model):
        raise ConfigError(f"model_overrides.elit_tail_depth is an ELIT key, but {cfg.model} is not an ELIT model")

    # --- shapes ---
    pixel = is_pixel_space(cfg)
    if pixel:
        cfg.vae = "none"
    if cfg.resolution <= 0:
        raise ConfigError(f"resolution must be positive, got {cfg.resolution}")
    if not pixel and cfg.resolution % 8:
        raise ConfigError(f"resolution {cfg.resolution} must be a multiple of 8 for a latent run (VAE x8)")
    size = cfg.resolution if pixel else cfg.resolution // 8
    if size % patch:
        raise ConfigError(f"model {cfg.model}: patch size {patch} does not divide the "
                          f"{'image' if pixel else 'latent'} size {size} (resolution {cfg.resolution})")
    if cfg.num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {cfg.num_classes}")
    resolve_elit_keys(cfg, size // patch)
    check_repa_config(cfg, pixel=pixel, size=size, patch=patch)
    _check_model_and_objective(cfg, pixel, size)

    # --- optimisation / schedule ---
    for key in ("batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps",
                "log_every", "demo_images_per_class"):
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {cfg[key]}")
    # typo bounds: 10**20 workers started processes until killed; a seed past 2**40 overflows the
    # loader's seed (seed * 1,000,003) and torch.manual_seed as tracebacks
    if cfg.num_workers > MAX_WORKERS:
        raise ConfigError(f"num_workers must be at most {MAX_WORKERS} (loader processes per training process), "
                          f"got {cfg.num_workers}")
    if abs(cfg.seed) > MAX_SEED:
        raise ConfigError(f"seed must be between -2**40 and 2**40 ({MAX_SEED:,}), got {cfg.seed}")
    for key in ("num_workers", "sampling_steps"):
        if cfg[key] < 0:
            raise ConfigError(f"{key} must be >= 0, got {cfg[key]}")
    if problem := cpu_threads_problem(cfg.cpu_threads):
        raise ConfigError(f"cpu_threads {problem}")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        raise ConfigError(f"checkpoints_total_limit must be >= 1 or null, got {cfg.checkpoints_total_limit}")
    if cfg.batch_size % cfg.gradient_accumulation_steps:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by gradient_accumulation_steps "
                          f"{cfg.gradient_accumulation_steps}")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise ConfigError(f"betas must be two numbers in [0, 1), got {list(cfg.betas)}")
    if cfg.lr <= 0 or not math.isfinite(cfg.lr):
        raise ConfigError(f"lr must be a positive number, got {cfg.lr}")
    if cfg.weight_decay < 0 or cfg.adam_eps <= 0 or cfg.max_grad_norm < 0:
        raise ConfigError("weight_decay and max_grad_norm must be >= 0 and adam_eps > 0")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ConfigError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    check_nonfinite_keys(cfg)
    check_posthoc_keys(cfg)

    from samplers.schedules import default_schedule

    check_preview_keys(cfg, *default_schedule(S))
    check_eval_keys(cfg)

    # --- output ---
    if cfg.exp_name is None or cfg.exp_name == "":
        cfg.exp_name = NAMING.default_exp_name(cfg, identity, pixel)
    if os.sep in cfg.exp_name or cfg.exp_name in (".", ".."):
        raise ConfigError(f"exp_name must be a plain folder name, got {cfg.exp_name!r}")
    _resolve_resume(cfg)
    if cfg.data_dir is None or str(cfg.data_dir) == "":
        raise ConfigError("data_dir is not set: pass --data-dir DIR (a folder or ZIP written by "
                          "dataset_tools.py convert/encode)")
    return cfg


def _check_model_and_objective(cfg, pixel: bool, size: int) -> None:
    """Build the architecture on the meta device and the objective once: every option, registry
    spec and parameter is checked by the code that uses it (one ConfigError naming the key)."""
    from models.registry import skeleton_model

    try:
        model = skeleton_model(cfg.model, **model_kwargs(cfg, 3 if pixel else 4, size))
    except ValueError as e:
        raise ConfigError(f"model {cfg.model} with stages={cfg.stages} (model_overrides, decomposition, path_type, "
                          f"prediction): {e}") from None
    for key in ("decomposition", "path_type", "prediction"):  # stored compactly, as in the model's arch
        if cfg[key] is not None:
            cfg[key] = model.arch.get(key)
    cfg.model_overrides = {k: model.arch.get(k, v) for k, v in cfg.model_overrides.items()}
    check_objective_keys(cfg)


def _resolve_resume(cfg) -> None:
    """`resume`: none | auto | a step of this experiment | a checkpoint file (ConfigError otherwise)."""
    resume = "none" if cfg.resume is None else str(cfg.resume)
    if resume.lower() in ("none", "null", "false", "no", ""):
        cfg.resume = "none"
    elif resume.lower() == "auto":
        cfg.resume = "auto"
    elif resume.isdigit():  # a step number of this experiment (the reference's resume_step)
        from training.checkpoint import checkpoint_path

        from utils.regular_files import describe_non_regular

        path = checkpoint_path(os.path.join(cfg.output_dir, cfg.exp_name), int(resume))
        if describe_non_regular(path):  # a link, FIFO or folder in the run's own folder is never followed
            raise ConfigError(f"resume: {path} is {describe_non_regular(path)}, not a checkpoint file of this run")
        if not os.path.isfile(path):
            raise ConfigError(f"resume: step {int(resume)} has no checkpoint {path!r} "
                              "(use resume=auto, resume=none, a step with a checkpoint or a file path)")
        cfg.resume = literal(path)  # the folder's name is text, whatever it holds
    elif not os.path.isfile(resume):
        raise ConfigError(f"resume: checkpoint file {resume!r} does not exist "
                          "(use resume=auto, resume=none, a step number or an existing .pt file)")


def _choice(node, key, allowed, prefix=""):
    value = node[key]
    if value not in allowed:
        raise ConfigError(f"{prefix}{key} must be one of {list(allowed)}, got {value!r}")


def recipe_objective(num_stages: int, **keys):
    """The objective train.py builds from the recipe's defaults for a model of `num_stages` stages,
    with the objective `keys` given changed (benchmarks and tests)."""
    cfg = to_config(OmegaConf.structured(TrainConfig))
    cfg.stages = num_stages
    for key, value in keys.items():
        cfg[key] = value
    check_objective_keys(cfg)
    return build_objective(cfg)


def model_kwargs(cfg, in_channels: int, input_size: int) -> dict:
    """Keyword arguments for `models.create_model(cfg.model, **kwargs)`."""
    kwargs = dict(input_size=input_size, in_channels=in_channels, num_classes=cfg.num_classes,
                  class_dropout_prob=cfg.cfg_prob, qk_norm=cfg.qk_norm, decomposition=cfg.decomposition,
                  path_type=cfg.path_type, prediction=cfg.prediction)
    if cfg.model.startswith("DFM-"):
        kwargs["stages"] = cfg.stages
    if cfg.encoder_depth is not None:
        kwargs["encoder_depth"] = cfg.encoder_depth
    if isinstance(cfg.stage_scales, (list, tuple)) or type(cfg.stage_scales).__name__ == "ListConfig":
        kwargs["stage_scales"] = list(cfg.stage_scales)
    if is_elit(cfg.model):
        kwargs.update(group_size=cfg.group_size, elit_min_mask_prob=cfg.elit_min_mask_prob,
                      elit_max_mask_prob=cfg.elit_max_mask_prob)
    kwargs.update(config_to_dict(cfg.model_overrides) if not isinstance(cfg.model_overrides, dict)
                  else cfg.model_overrides)
    return kwargs
