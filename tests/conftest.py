"""Shared test settings: offline, no wandb, few threads, tiny models."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# 2-core CI: OpenBLAS threads compete with torch threads (eigh/sqrtm 3-4x slower under load)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


class Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for any code an attacker could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def save_payload(path, marker, **tensors) -> str:
    """A .pt/.pth/.bin at `path` holding `tensors` and a live Payload that would create `marker`."""
    torch.save({**tensors, "extra": Payload(marker)}, str(path))
    return str(path)


def tiny_model(name="DFM-SiT-S/2", **overrides):
    """A small randomly initialised model for tests (16 tokens of width 64)."""
    from models import create_model
    config = dict(depth=2, hidden_size=64, num_heads=4, input_size=8, in_channels=4, num_classes=10)
    config.update(overrides)
    return create_model(name, **config)


def randomize_(model, std=0.05, seed=0):
    """Give every zero-initialised weight random values so outputs are not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g))
    return model


def crafted_checkpoint(folder, fmt, edit=None, **arch_changes) -> str:
    """A tiny DFM-SiT-S/2 (depth 2, EMA weights) saved as `crafted.{fmt}` (`pt` or `safetensors`) with
    an edited stored `arch`: `arch_changes` set, then `edit(arch)` applied; returns the path."""
    from models.weights_io import export_weights

    model = randomize_(tiny_model("DFM-SiT-S/2"))
    arch = {**model.arch, **arch_changes}
    if edit is not None:
        edit(arch)
    path = os.path.join(str(folder), f"crafted.{fmt}")
    if fmt == "safetensors":
        export_weights(path, {"ema": model.state_dict()}, arch=arch)
    else:
        torch.save({"ema": model.state_dict(), "arch": arch}, path)
    return path


def tiny_vae(seed=0):
    """A randomly initialised AutoencoderKL that downsamples 8x (4 latent channels, ~1M params)."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
        sample_size=32,
    ).eval()


def save_tiny_vae(folder, seed=0):
    """Write a tiny VAE with ``save_pretrained`` so it loads like a downloaded one; returns the folder."""
    tiny_vae(seed).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    """A tiny VAE folder written with `save_pretrained`, loaded like a downloaded one (read only)."""
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: on 2 busy cores, OpenMP threads spinning against each
    other make VAE convolutions many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The training tests' dataset: the demo's coloured shapes, 16 px, 2 classes x 10 images (read only)."""
    from training.demo_data import write_demo_dataset

    return write_demo_dataset(str(tmp_path_factory.mktemp("data") / "shapes16"), resolution=16, num_classes=2,
                              images_per_class=10, seed=0)


@pytest.fixture
def make_tiny_model():
    return tiny_model


def read_tree(folder) -> dict:
    """{relative path: bytes} of every file under `folder` (byte-identity checks of outputs)."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


SMALL_DINOV2 = "vit_small_patch14_dinov2.lvd142m"


def save_random_dinov2_weights(path) -> str:
    """A random timm DINOv2-S state dict at `path` (LayerScale set to 0.2 so the blocks matter)."""
    import timm

    state = timm.create_model(SMALL_DINOV2, pretrained=False, num_classes=0).state_dict()
    state = {k: torch.full_like(v, 0.2) if k.endswith(".gamma") else v for k, v in state.items()}
    torch.save(state, path)
    return str(path)


@pytest.fixture
def small_tmpfs(tmp_path):
    """`mount(size_bytes) -> folder`: a fresh tmpfs of that size (a disk that fills up for real),
    unmounted afterwards. Needs root (CI runs as root); skipped with the reason otherwise."""
    import subprocess

    mounts = []

    def mount(size_bytes: int):
        folder = tmp_path / f"tmpfs{len(mounts)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size_bytes)}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({(done.stderr or done.stdout).strip()[:120]}): needs root")
        mounts.append(folder)
        return folder

    yield mount
    for folder in reversed(mounts):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def one_stage_loss_and_draw(prediction="velocity", seed=3):
    """The flow-matching loss of a tiny one-stage SiT (with `prediction`) on a fixed batch, and what
    the objective drew for it: (loss, x, eps, t (B, 1, 1, 1), x_t, the model's output at (x_t, t)).
    The draws are read back from the model's inputs (x_t = (1 - t) x + t eps on the linear path), so
    a test can compute the loss again by hand."""
    from dfm import FlowMatchingObjective

    torch.manual_seed(0)
    model = randomize_(tiny_model("SiT-S/2", class_dropout_prob=0.0, prediction=prediction))
    x, y = torch.randn(5, 4, 8, 8), torch.randint(0, 10, (5,))
    recorded = {}

    def hook(module, args, kwargs):
        recorded["xs"], recorded["t"] = args[0], args[1]

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    out = FlowMatchingObjective(1, time_distribution="uniform")(model, x, y, generator=torch.Generator().manual_seed(seed))
    handle.remove()
    t, x_t = recorded["t"][:, 0], recorded["xs"][0]
    with torch.no_grad():
        output = model(x_t, t, y)
    t = t.view(-1, 1, 1, 1)
    return out["loss"].item(), x, (x_t - (1 - t) * x) / t, t, x_t, output
