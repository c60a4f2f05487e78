"""Post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
2024, section 3): choose the EMA length after training.

Training keeps power-function EMA profiles of the weights (``posthoc_ema.stds``, e.g. ``[0.05,
0.10]``: relative standard deviations of the averaging kernel) and stores a snapshot of every profile
every ``posthoc_ema.every`` steps (float16 weights, ``.safetensors``, in ``<run>/posthoc_ema/``),
thinning older ones (``posthoc_ema.keep``). Afterwards

    python -m training.posthoc_ema RUN --std 0.04 0.07 0.12 [--step N] [--out DIR]

reconstructs the EMA of any std (at the run's last snapshot, or step N) as the least-squares
combination of that run's snapshots, and writes weights that generate.py, the evaluator and the
budget sweep read like any checkpoint (``<run>/posthoc_ema/reconstructed/<step>-std<std>.safetensors``).

The pieces: ``kernels`` (the maths), ``profiles`` (training: the profiles, their keys and checkpoint
state), ``snapshot_file`` (one snapshot, read without trusting it), ``snapshots`` (a run's snapshots:
writing, thinning, choosing), ``reconstruct`` (the running sum and the command line).
"""
from training.posthoc_ema.kernels import (MAX_KERNEL_ERROR, MAX_STD, MIN_STD, exponent_to_std, kernel_dot,
                                          reachable_stds, solve_coefficients, std_to_exponent)
from training.posthoc_ema.profiles import PosthocEMAConfig, PowerEMA, check_posthoc_keys, start_profiles
from training.posthoc_ema.reconstruct import PosthocError, main, reconstruct
from training.posthoc_ema.snapshot_file import SnapshotError
from training.posthoc_ema.snapshots import FOLDER, keeps, kept_steps, snapshot_path

__all__ = ["MAX_KERNEL_ERROR", "MAX_STD", "MIN_STD", "exponent_to_std", "kernel_dot", "reachable_stds",
           "solve_coefficients", "std_to_exponent", "PosthocEMAConfig", "PowerEMA", "check_posthoc_keys",
           "start_profiles", "PosthocError", "main", "reconstruct", "SnapshotError", "FOLDER", "keeps", "kept_steps",
           "snapshot_path"]
