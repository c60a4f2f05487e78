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
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from models.registry import is_elit, parse_name
from utils.config import Alias, config_to_dict, load_config

# Architecture keys a config may override (tiny demo / test models). Shapes that follow from
# the data (input_size, in_channels, num_classes) and keys with their own config entry are not
# allowed here.
MODEL_OVERRIDE_KEYS = ("depth", "hidden_size", "num_heads", "mlp_ratio", "elit_tail_depth")
VAE_NONE = ("none", "", None)
LR_SCHEDULERS = ("constant", "constant_with_linear_warmup")
REFERENCE_GROUP_SIZE = 4  # the reference's elit_group_size default: accepted (and dropped) for non-ELIT models
# ImageNet classes shown in previews when num_classes == 1000 (REPA / DiT favourites):
# golden retriever, otter, red panda, geyser, macaw, valley, balloon, arctic fox.
IMAGENET_PREVIEW_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]


class ConfigError(ValueError):
    """A problem the user can fix in the config or the data; the message says what to change."""


def _resume_step(value, cfg) -> dict:
    """Reference `resume_step`: -1 = newest checkpoint, 0 = fresh start, N = checkpoint of step N.
    0 maps to `auto` (a fresh experiment folder has nothing to resume; we never overwrite one)."""
    step = int(value)
    return {"resume": "auto" if step <= 0 else str(step)}


def _adam_beta(index: int):
    def convert(value, cfg) -> dict:
        betas = list(cfg.betas)
        betas[index] = float(value)
        return {"betas": betas}
    return convert


class ReferenceAliases(dict):
    """The alias table, plus: any `s3*` / `aws*` key of the reference's remote data cache is
    ignored with a warning (we read local or mounted folders only)."""

    def get(self, key, default=None):
        if key in self:
            return self[key]
        if re.match(r"^(s3|aws)(_|$)|_s3(_|$)", str(key)):
            return Alias(note="remote (S3) data caches are not supported here; point data_dir at a local or "
                              "mounted copy")
        return default


# Option names of the reference code (its train.py / YAML files and the DFM README) -> ours
# (docs/TRAINING.md, "Reference option names").
TRAIN_ALIASES = ReferenceAliases({
    "stages_count": Alias("stages"),
    "learning_rate": Alias("lr"),
    "stage_sampling_thresholds": Alias("preview.thresholds"),
    "num_steps_per_scale": Alias("preview.num_steps_per_scale"),
    "adam_weight_decay": Alias("weight_decay"),
    "adam_epsilon": Alias("adam_eps"),
    "adam_beta1": Alias(convert=_adam_beta(0), note="betas[0]"),
    "adam_beta2": Alias(convert=_adam_beta(1), note="betas[1]"),
    "elit_group_size": Alias("group_size"),
    "resume_step": Alias(convert=_resume_step, note="resume (-1/0 -> auto, N -> step N)"),
    "epochs": Alias(note="training length is max_train_steps"),
    "logging_dir": Alias(note="logs go to <output_dir>/<exp_name>/log.txt"),
    "fused_attn": Alias(note="attention always runs torch's fused scaled_dot_product_attention"),
    "legacy": Alias(note="label dropout is always applied inside the model (cfg_prob)"),
})


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class SamplerSettings:
    """Solver and guidance keys shared by the preview and evaluation samplers (as in generate.py)."""
    method: str = field(default="euler", metadata=_help("euler | heun | sde"))
    cfg_scale: float = field(default=1.0, metadata=_help("classifier-free guidance scale (1 = off)"))
    guidance_low: float = field(default=0.0, metadata=_help("CFG only where t >= guidance_low"))
    guidance_high: float = field(default=1.0, metadata=_help("CFG only where t <= guidance_high"))


@dataclass
class PreviewConfig(SamplerSettings):
    num_samples: int = field(default=16, metadata=_help("images in each preview grid (0 = no previews)"))
    num_steps_per_scale: Optional[List[int]] = field(default=None, metadata=_help(
        "sampler steps per stage; null = [50] for S=1, [40,10] for S=2, [40]+[10]*(S-1) for S>=3"))
    thresholds: Optional[List[float]] = field(default=None, metadata=_help(
        "stage hand-over times tau_0 > ... (length S-1); null = [0.1] for S=2, 0.1/2^i for S>=3"))
    labels: Optional[List[int]] = field(default=None, metadata=_help(
        "class labels of the preview samples (cycled); null = one class per grid row (8 fixed ImageNet "
        "classes for 1000 classes, else 0, 1, 2, ...)"))
    nrow: Optional[int] = field(default=None, metadata=_help("images per grid row; null = about sqrt(num_samples)"))
    show_stages: bool = field(default=False, metadata=_help(
        "also save the coarse-stage previews (end of each sampler chunk) beside the final images"))
    seed: int = field(default=0, metadata=_help("seed of the fixed preview noise"))
    upscale: int = field(default=1, metadata=_help("enlarge the saved grids by this factor (nearest), for tiny images"))
    budgets: Optional[List[float]] = field(default=None, metadata=_help(
        "ELIT: inference budgets of the preview, one grid each, side by side (lowest left); null = the "
        "training budget (single-budget) or the smallest, middle and largest level (multi-budget)"))


@dataclass
class EvalSamplerConfig(SamplerSettings):
    """The sampler of the evaluations during training (`eval_every`); the keys of generate.py."""
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


@dataclass
class TrainConfig:
    # --- model ---
    model: str = field(default="DFM-SiT-XL/2", metadata=_help(
        "[DFM-][ELIT-]SiT-{S,B,L,XL}/{2,4,8}: SiT, DFM-SiT, ELIT-SiT or DFM-ELIT-SiT"))
    stages: Optional[int] = field(default=None, metadata=_help(
        "pyramid stages S; null = 2 for DFM-SiT, 1 for SiT (SiT must be 1)"))
    qk_norm: bool = field(default=False, metadata=_help("RMS/LayerNorm on queries and keys"))
    encoder_depth: Optional[int] = field(default=None, metadata=_help(
        "block after which the REPA projector reads tokens; null = model default"))
    proj_coeff: float = field(default=0.0, metadata=_help(
        "REPA alignment loss weight (REPA: 0.5; needs enc_type); 0 = no alignment"))
    group_size: Optional[int] = field(default=None, metadata=_help(
        "ELIT: window side g in tokens (g x g tokens, g^2 latents per window); null = 4 at 256 px, 8 at 512 px"))
    elit_min_mask_prob: Optional[float] = field(default=None, metadata=_help(
        "ELIT: smallest dropped fraction of latents per window in training; null = elit_max_mask_prob"))
    elit_max_mask_prob: float = field(default=0.0, metadata=_help(
        "ELIT: largest dropped fraction (0 = single full budget; 1 - 1/g^2 = every budget)"))
    enc_type: str = field(default="none", metadata=_help(
        "REPA encoder(s), comma-separated, e.g. dinov2-vit-b; none = no alignment loss"))
    encoder_weights: Optional[str] = field(default=None, metadata=_help(
        "REPA encoder weight file(s), comma-separated like enc_type; null = the hub"))
    encoder_overrides: Dict[str, Any] = field(default_factory=dict, metadata=_help(
        "REPA encoder architecture overrides for tiny test encoders, keys depth, embed_dim, num_heads, mlp_ratio"))
    model_overrides: Dict[str, Any] = field(default_factory=dict, metadata=_help(
        f"architecture overrides for small models, keys {list(MODEL_OVERRIDE_KEYS)}"))
    # --- objective ---
    stage_weights: Optional[List[float]] = field(default=None, metadata=_help(
        "probability of training each stage (length S, sums to 1); null = [1] / [0.9,0.1] / "
        "[0.9, 0.1/(S-1), ...]"))
    stage_sampling: str = field(default="per_batch", metadata=_help("per_batch (reference) | per_sample"))
    earlier_stage_loc: float = field(default=-2.0, metadata=_help("earlier stages: t = sigmoid(N(loc, scale))"))
    earlier_stage_scale: float = field(default=1.0, metadata=_help("see earlier_stage_loc"))
    stage_scales: Any = field(default=None, metadata=_help(
        "stage calibration (SPEC §11): null = reference; [c_0, ..., c_{S-1}] trains and samples stage s on c_s * "
        "P_s; auto = every level to the coarsest level's RMS, measured on the training data at the start "
        "(training/calibration.py). Stored with the model"))
    stage_time_shift: Optional[List[float]] = field(default=None, metadata=_help(
        "per-stage logit shift of the trained stage's time: t = sigmoid(logit(t) + shift_s) (lognormal: "
        "logit-normal(shift_s, 1); > 0 = noisier); null = reference"))
    weighting: str = field(default="lognormal", metadata=_help("timestep distribution: uniform | lognormal"))
    path_type: str = field(default="linear", metadata=_help("linear | cosine"))
    prediction: str = field(default="v", metadata=_help("model output; only v (velocity)"))
    cfg_prob: float = field(default=0.1, metadata=_help("label dropout probability (for CFG)"))
    # --- data ---
    data_dir: Optional[str] = field(default=None, metadata=_help(
        "dataset folder or ZIP (dataset_tools.py convert/encode output)"))
    images_dir: Optional[str] = field(default=None, metadata=_help(
        "REPA: the images (convert output) encoded into the latents of data_dir; null = data_dir/images"))
    vae: str = field(default="ft-ema", metadata=_help(
        "VAE for latent runs (ft-ema, ft-mse, hub name or local folder); none = pixel space"))
    resolution: int = field(default=256, metadata=_help("image resolution in pixels"))
    num_classes: int = field(default=1000, metadata=_help("number of classes (null label = num_classes)"))
    make_demo_data: bool = field(default=False, metadata=_help(
        "write the synthetic demo dataset into data_dir first if it holds none"))
    demo_images_per_class: int = field(default=200, metadata=_help("size of the demo dataset per class"))
    batch_size: int = field(default=256, metadata=_help(
        "global batch (all processes x gradient_accumulation_steps)"))
    num_workers: int = field(default=4, metadata=_help("data loader workers per process"))
    bad_samples: str = field(default="error", metadata=_help(
        "a corrupt data file: error (stop, naming the file) | skip (train on a fixed stand-in, list it in "
        "<exp>/bad_samples.json)"))
    # --- optimisation ---
    mixed_precision: str = field(default="bf16", metadata=_help("bf16 | fp16 | no"))
    allow_tf32: bool = field(default=True, metadata=_help("TF32 matmuls on Ampere+ GPUs"))
    lr: float = field(default=1e-4, metadata=_help("AdamW learning rate"))
    lr_scheduler: str = field(default="constant", metadata=_help(
        "constant | constant_with_linear_warmup (0 -> lr over warmup_steps, then constant)"))
    warmup_steps: int = field(default=0, metadata=_help("linear warm-up steps of constant_with_linear_warmup"))
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999], metadata=_help("AdamW betas"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    adam_eps: float = field(default=1e-8, metadata=_help("AdamW epsilon"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm (0 = off)"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    cpu_threads: Optional[int] = field(default=None, metadata=_help(
        "torch CPU threads per process, also under accelerate's multi-CPU launch; null = OMP_NUM_THREADS if "
        "set, else the usable CPUs / processes per machine (utils/threads.py; the CPU demo uses 1: spinning "
        "OpenMP threads are very slow on a busy machine)"))
    compile: bool = field(default=False, metadata=_help(
        "torch.compile the transformer blocks for training, previews and evaluation (models/compile.py)"))
    ema_decay: float = field(default=0.9999, metadata=_help("EMA decay, updated every optimizer step"))
    seed: int = field(default=0, metadata=_help("global seed (model init, data order, noise)"))
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
        "any of fid, sfid, fdd, swd"))
    eval_ref_stats: Optional[str] = field(default=None, metadata=_help(
        "reference statistics (.npz of `python -m evaluation.ref_stats`, or the study's heldout_swd.npz)"))
    eval_inception_weights: Optional[str] = field(default=None, metadata=_help(
        "Inception weights file for fid/sfid; null = the torch.hub cache"))
    eval_dinov2_weights: Optional[str] = field(default=None, metadata=_help(
        "DINOv2 ViT-L/14 weights file for fdd; null = the Hugging Face cache"))
    eval_sampler: EvalSamplerConfig = field(default_factory=EvalSamplerConfig)


def config_docs() -> str:
    from utils.config import config_help

    return config_help(TrainConfig, TRAIN_ALIASES)


def parse_config(argv) -> "OmegaConf":
    """argv -> resolved, validated DictConfig (ConfigError on any problem)."""
    try:
        cfg = load_config(TrainConfig, argv, aliases=TRAIN_ALIASES)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return resolve_config(cfg)


def default_preview_schedule(num_stages: int) -> tuple[list, list]:
    if num_stages == 1:
        return [50], []
    if num_stages == 2:
        return [40, 10], [0.1]
    return [40] + [10] * (num_stages - 1), [0.1 / 2**i for i in range(num_stages - 1)]


def default_exp_name(cfg) -> str:
    name = cfg.model.replace("/", "-").lower()
    space = "px" if is_pixel_space(cfg) else ""
    budgets = ""
    if is_elit(cfg.model) and cfg.elit_max_mask_prob > 0:  # runs with other budgets get other folders
        lo, hi = cfg.elit_min_mask_prob, cfg.elit_max_mask_prob
        budgets = f"-mask{lo:g}" + (f"-{hi:g}" if hi != lo else "")
    return f"{name}-{cfg.resolution}{space}-{cfg.weighting}{budgets}"


def is_pixel_space(cfg) -> bool:
    return str(cfg.vae).lower() in ("none", "")


def resolve_config(cfg) -> "OmegaConf":
    """Fill model-dependent defaults and validate; returns a new DictConfig.

    Raises ConfigError naming the offending key.
    """
    cfg = OmegaConf.create(config_to_dict(cfg))  # plain (untyped) copy we may edit freely
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

    import dfm

    if cfg.stage_weights is None:
        cfg.stage_weights = dfm.default_stage_weights(S)
    try:
        cfg.stage_weights = dfm.validate_stage_weights(list(cfg.stage_weights), S)
    except ValueError as e:
        raise ConfigError(f"stage_weights: {e}") from None
    from training.calibration import check_stage_scales_key

    check_stage_scales_key(cfg)
    _choice(cfg, "stage_sampling", dfm.STAGE_SAMPLING)
    _choice(cfg, "weighting", dfm.WEIGHTINGS)
    _choice(cfg, "path_type", dfm.PATH_TYPES)
    _choice(cfg, "prediction", ("v",))
    if str(cfg.mixed_precision) in ("False", "false"):  # YAML reads a bare `no` as false
        cfg.mixed_precision = "no"
    _choice(cfg, "mixed_precision", ("bf16", "fp16", "no"))
    _choice(cfg, "report_to", ("none", "wandb", "tensorboard"))
    if cfg.wandb_mode is not None:
        _choice(cfg, "wandb_mode", ("online", "offline", "disabled"))
    _choice(cfg, "lr_scheduler", LR_SCHEDULERS)
    _choice(cfg, "bad_samples", ("error", "skip"))
    _choice(cfg, "save_format", ("pt", "safetensors"))
    if cfg.warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.earlier_stage_scale <= 0:
        raise ConfigError(f"earlier_stage_scale must be > 0, got {cfg.earlier_stage_scale}")
    if not 0.0 <= cfg.cfg_prob < 1.0:
        raise ConfigError(f"cfg_prob must be in [0, 1), got {cfg.cfg_prob}")
    for key in cfg.model_overrides:
        if key not in MODEL_OVERRIDE_KEYS:
            hint = {"input_size": "resolution", "in_channels": "vae", "num_classes": "num_classes",
                    "qk_norm": "qk_norm", "stages": "stages", "class_dropout_prob": "cfg_prob",
                    "encoder_depth": "encoder_depth"}.get(key)
            raise ConfigError(
                f"model_overrides.{key} is not allowed"
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
    coarsest = size // 2 ** (S - 1)
    if size % 2 ** (S - 1) or coarsest < 1:
        raise ConfigError(f"stages={S} needs the {'image' if pixel else 'latent'} size {size} to be "
                          f"divisible by 2^(S-1) = {2 ** (S - 1)}")
    if size % patch:
        raise ConfigError(f"model {cfg.model}: patch size {patch} does not divide the "
                          f"{'image' if pixel else 'latent'} size {size} (resolution {cfg.resolution})")
    if cfg.num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {cfg.num_classes}")
    _resolve_elit(cfg, size // patch)
    from training.repa import check_repa_config

    check_repa_config(cfg, pixel=pixel, size=size, patch=patch)

    # --- optimisation / schedule ---
    for key in ("batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps",
                "log_every", "demo_images_per_class"):
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {cfg[key]}")
    for key in ("num_workers", "sampling_steps"):
        if cfg[key] < 0:
            raise ConfigError(f"{key} must be >= 0, got {cfg[key]}")
    if cfg.cpu_threads is not None and cfg.cpu_threads < 1:
        raise ConfigError(f"cpu_threads must be >= 1 or null, got {cfg.cpu_threads}")
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

    # --- preview ---
    p = cfg.preview
    if p.num_samples < 0:
        raise ConfigError(f"preview.num_samples must be >= 0, got {p.num_samples}")
    _check_schedule(p, *default_preview_schedule(S), S, "preview.")
    if p.labels is not None:
        bad = [label for label in p.labels if not 0 <= label <= cfg.num_classes]
        if bad or not len(p.labels):
            raise ConfigError(f"preview.labels must be non-empty class indices in [0, {cfg.num_classes}] "
                              f"({cfg.num_classes} = unconditional), got {list(p.labels)}")
    if p.upscale < 1:
        raise ConfigError(f"preview.upscale must be >= 1, got {p.upscale}")
    if p.nrow is not None and p.nrow < 1:
        raise ConfigError(f"preview.nrow must be >= 1, got {p.nrow}")
    _resolve_preview_budgets(cfg, size // patch)

    _check_eval(cfg, S)

    # --- output ---
    if cfg.exp_name is None or cfg.exp_name == "":
        cfg.exp_name = default_exp_name(cfg)
    if os.sep in cfg.exp_name or cfg.exp_name in (".", ".."):
        raise ConfigError(f"exp_name must be a plain folder name, got {cfg.exp_name!r}")
    resume = "none" if cfg.resume is None else str(cfg.resume)
    if resume.lower() in ("none", "null", "false", "no", ""):
        cfg.resume = "none"
    elif resume.lower() == "auto":
        cfg.resume = "auto"
    elif resume.isdigit():  # a step number of this experiment (the reference's resume_step)
        from training.checkpoint import checkpoint_path

        path = checkpoint_path(os.path.join(cfg.output_dir, cfg.exp_name), int(resume))
        if not os.path.isfile(path):
            raise ConfigError(f"resume: step {int(resume)} has no checkpoint {path!r} "
                              "(use resume=auto, resume=none, a step with a checkpoint or a file path)")
        cfg.resume = path
    elif not os.path.isfile(resume):
        raise ConfigError(f"resume: checkpoint file {resume!r} does not exist "
                          "(use resume=auto, resume=none, a step number or an existing .pt file)")
    if cfg.data_dir is None or str(cfg.data_dir) == "":
        raise ConfigError("data_dir is not set: pass --data-dir DIR (a folder or ZIP written by "
                          "dataset_tools.py convert/encode)")
    return cfg


def _resolve_elit(cfg, grid: int) -> None:
    """ELIT keys: defaults filled in (group_size = grid / 4, elit_min_mask_prob = the max) and
    checked; other models must leave them at their defaults."""
    from models.elit import mask_levels
    from models.registry import ELIT_WINDOWS_PER_SIDE

    if not is_elit(cfg.model):
        if cfg.group_size == REFERENCE_GROUP_SIZE:  # the reference's YAML files carry it for every model
            cfg.group_size = None
        for key, default in (("group_size", None), ("elit_min_mask_prob", None), ("elit_max_mask_prob", 0.0)):
            if cfg[key] != default:
                raise ConfigError(f"{key}={cfg[key]} is an ELIT key, but {cfg.model} is not an ELIT model; "
                                  f"remove it, or train {cfg.model.replace('SiT-', 'ELIT-SiT-', 1)}")
        return
    divisors = [d for d in range(1, grid + 1) if grid % d == 0]
    if cfg.group_size is None:
        if grid % ELIT_WINDOWS_PER_SIDE:
            raise ConfigError(f"group_size: no default for the {grid}x{grid} token grid of {cfg.model} at "
                              f"resolution {cfg.resolution}; set group_size to one of {divisors}")
        cfg.group_size = grid // ELIT_WINDOWS_PER_SIDE
    if isinstance(cfg.group_size, bool) or not isinstance(cfg.group_size, int) or grid % cfg.group_size:
        raise ConfigError(f"group_size={cfg.group_size} must divide the {grid}x{grid} token grid of {cfg.model} at "
                          f"resolution {cfg.resolution}; allowed: {divisors}")
    if cfg.elit_min_mask_prob is None:
        cfg.elit_min_mask_prob = cfg.elit_max_mask_prob
    cfg.elit_min_mask_prob = float(cfg.elit_min_mask_prob)
    cfg.elit_max_mask_prob = float(cfg.elit_max_mask_prob)
    try:
        mask_levels(cfg.group_size, cfg.elit_min_mask_prob, cfg.elit_max_mask_prob)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _resolve_preview_budgets(cfg, grid: int) -> None:
    """preview.budgets: null -> the defaults of training.budget; given -> checked by the budget rule."""
    p = cfg.preview
    if not is_elit(cfg.model):
        if p.budgets is not None:
            raise ConfigError(f"preview.budgets is for ELIT models only ({cfg.model} has no compute budget); "
                              "remove it")
        return
    from models.elit import latents_per_window, level_budgets
    from training.budget import default_preview_budgets

    if p.budgets is None:
        p.budgets = default_preview_budgets(
            level_budgets(cfg.group_size, cfg.elit_min_mask_prob, cfg.elit_max_mask_prob))
    if not len(p.budgets):
        raise ConfigError("preview.budgets must name at least one budget (or be null for the defaults)")
    for b in p.budgets:
        try:
            latents_per_window(b, cfg.group_size, grid * grid)
        except ValueError as e:
            raise ConfigError(f"preview.budgets: {e}") from None


def _check_schedule(node, steps, thresholds, S: int, prefix: str) -> None:
    """Fill a sampler group's null `num_steps_per_scale` / `thresholds` with the given defaults
    and check them and `method` (ConfigError naming `prefix` + key)."""
    if node.num_steps_per_scale is None:
        node.num_steps_per_scale = list(steps)
        if node.thresholds is None:
            node.thresholds = list(thresholds)
    if node.thresholds is None:
        node.thresholds = list(thresholds)
    node.num_steps_per_scale = [int(n) for n in node.num_steps_per_scale]
    node.thresholds = [float(x) for x in node.thresholds]
    if len(node.num_steps_per_scale) != S or any(n < 1 for n in node.num_steps_per_scale):
        raise ConfigError(f"{prefix}num_steps_per_scale needs {S} positive entries (one per stage), "
                          f"got {list(node.num_steps_per_scale)}")
    if len(node.thresholds) != S - 1:
        raise ConfigError(f"{prefix}thresholds needs {S - 1} entries for {S} stages, got {list(node.thresholds)}")
    if any(not 0 < x < 1 for x in node.thresholds) or any(
            a <= b for a, b in zip(node.thresholds, node.thresholds[1:])):
        raise ConfigError(f"{prefix}thresholds must be strictly decreasing inside (0, 1), got {list(node.thresholds)}")
    _choice(node, "method", ("euler", "heun", "sde"), prefix=prefix)


def _check_eval(cfg, S: int) -> None:
    """The evaluation keys (files and weights are checked when the evaluator is built, before training)."""
    from evaluation.stats_file import METRICS

    if cfg.eval_every < 0:
        raise ConfigError(f"eval_every must be >= 0 (0 = no evaluation), got {cfg.eval_every}")
    metrics = list(cfg.eval_metrics or [])
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics or len(set(metrics)) < len(metrics):
        raise ConfigError(f"eval_metrics must be a non-empty list of distinct names from {list(METRICS)}, "
                          f"got {metrics}")
    e = cfg.eval_sampler
    _check_schedule(e, cfg.preview.num_steps_per_scale, cfg.preview.thresholds, S, "eval_sampler.")
    _choice(e, "labels", ("balanced", "random"), prefix="eval_sampler.")
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


def _choice(node, key, allowed, prefix=""):
    value = node[key]
    if value not in allowed:
        raise ConfigError(f"{prefix}{key} must be one of {list(allowed)}, got {value!r}")


def model_kwargs(cfg, in_channels: int, input_size: int) -> dict:
    """Keyword arguments for `models.create_model(cfg.model, **kwargs)`."""
    kwargs = dict(input_size=input_size, in_channels=in_channels, num_classes=cfg.num_classes,
                  class_dropout_prob=cfg.cfg_prob, qk_norm=cfg.qk_norm)
    if cfg.model.startswith("DFM-"):
        kwargs["stages"] = cfg.stages
    if cfg.encoder_depth is not None:
        kwargs["encoder_depth"] = cfg.encoder_depth
    if is_elit(cfg.model):
        kwargs.update(group_size=cfg.group_size, elit_min_mask_prob=cfg.elit_min_mask_prob,
                      elit_max_mask_prob=cfg.elit_max_mask_prob)
    kwargs.update(dict(cfg.model_overrides))
    return kwargs
