"""Random streams of a training run, each a pure function of its key.

Per micro-batch slot j (= accumulation index x processes + rank) of optimizer step s:
- stream "data": the generator that draws posterior samples, stages, times and noise;
- stream "labels": the global torch RNG, which the model's label dropout draws from.
Per (step, accumulation index), shared by every rank: stream "budget" (ELIT's budget level).
The streams are seeded from hashes of (stream, seed, step, slot), so no purpose reuses another
one's numbers, a resumed run repeats the uninterrupted one bit for bit, and P processes x A
accumulation steps compute the same thing for any split of the same P x A.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from utils.seeds import derive_seed

STREAMS = ("data", "labels", "budget")


def micro_batch_seed(seed: int, step: int, slot: int, stream: str = "data") -> int:
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; known: {STREAMS}")
    return derive_seed(seed, step, f"train-{stream}", slot)


def seed_micro_batch(seed: int, step: int, slot: int, generator: torch.Generator) -> None:
    """Seed the random draws of micro-batch `slot` of optimizer step `step` (see module doc).

    The "labels" stream seeds the global generators the step can draw from: the CPU's and, on a
    GPU, the one of the generator's device (what `torch.manual_seed` would seed for this process,
    without its per-call cost: about 0.2 ms on a CPU-only machine, every micro-batch)."""
    generator.manual_seed(micro_batch_seed(seed, step, slot, "data"))
    labels = micro_batch_seed(seed, step, slot, "labels")
    torch.default_generator.manual_seed(labels)
    if generator.device.type == "cuda":
        index = generator.device.index if generator.device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(labels)


def shared_generator(seed: int, step: int, micro_batch: int, stream: str = "budget") -> torch.Generator:
    """A CPU generator every rank builds identically for (step, accumulation index): draws that
    all ranks must agree on (ELIT's budget level) need no collective."""
    return torch.Generator().manual_seed(micro_batch_seed(seed, step, micro_batch, stream))


def seed_process(seed: int, rank: int, generator: torch.Generator) -> None:
    """Per-process streams for anything outside the micro-batches (data loader workers etc.)."""
    s = seed * 1000 + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    generator.manual_seed(s + 7919)


def rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    generator.set_state(state["generator"])


def restore_streams(ckpt: dict, generator: torch.Generator, rank: int, num_processes: int, log) -> None:
    """Restore this rank's random states from a checkpoint's `rng`. Not restoring them is harmless
    (every micro-batch re-seeds its streams from (seed, step, slot)), so another process count or
    states that do not read back (a damaged or edited file) are one log line, not an error."""
    states = ckpt.get("rng")
    if not isinstance(states, (list, tuple)):
        log.warning(f"WARNING: the checkpoint's random states are unreadable ({type(states).__name__}); the "
                    "per-process states start fresh (training stays exact: every micro-batch re-seeds from (seed, "
                    "step, slot))")
        return
    if len(states) != num_processes:
        log.info(f"the checkpoint holds random states of {len(states)} process(es), this run has {num_processes}; "
                 "the per-process states are not restored")
        return
    saved = rng_state(generator)
    try:
        set_rng_state(states[rank], generator)
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError, AttributeError) as e:
        set_rng_state(saved, generator)
        log.warning(f"WARNING: the checkpoint's random states do not read back ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:120]}); the per-process states start fresh (training stays exact: "
                    "every micro-batch re-seeds from (seed, step, slot))")
