"""Inception-v3 features of the ADM suite, from torch-fidelity's port of the 2015 TF graph.

torch-fidelity's ``FeatureExtractorInceptionV3`` reproduces the graph ADM evaluates with
(``classify_image_graph_def.pb``): the TF1 bilinear resize to 299x299 (no half-pixel
centres), ``(x - 128) / 128``, TF's average pooling that ignores padding and the max pool
in the last block. The tensors ADM reads map onto it as follows (torch-fidelity's weight
converter names ``mixed_6/conv/conv2d_params -> Mixed_6d.branch1x1.conv``):

============================  ==============================================  ==========
TF 2015 graph tensor          torch-fidelity module / feature                 our key
============================  ==============================================  ==========
``pool_3:0`` (2048)           ``"2048"`` (global average pool of Mixed_7c)    ``pool``
``mixed_6/conv:0``            output of ``Mixed_6d.branch1x1`` (conv, BN,     ``spatial``
(17x17x192, NHWC)             ReLU), NCHW; channels ``[:7]``, flattened as
                              (17, 17, 7) row-major = ADM's NHWC reshape
``softmax/logits/MatMul``     ``"logits_unbiased"`` = pool @ fc.weight.T,     ``logits``
                              1008 columns, no bias (ADM's IS input)
============================  ==============================================  ==========

(In the 2015 graph ``mixed`` .. ``mixed_10`` are torchvision's Mixed_5b .. Mixed_7c, so
``mixed_6`` is the third 17x17 block after the ``mixed_3`` reduction, Mixed_6d; a layer
scope's own name, e.g. ``mixed_6/conv``, is its ReLU output.)
"""
from __future__ import annotations

import contextlib
import io
import os
import socket
import urllib.parse
from typing import Dict, Optional

import numpy as np
import torch

from utils.hub import host_reachable

from .npz import EvaluationError, first_line

# torch-fidelity's URL_INCEPTION_V3 (tests/test_evaluation_inputs.py checks they agree); written out so that
# importing this module (the metric registry does, for training's config check) does not import
# torch-fidelity, torchvision and their ~160 MiB
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_WEIGHTS_FILENAME = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[-1]
# pytorch-fid's port of the same graph: its state dict has exactly the layer names and shapes of
# torch-fidelity's network (torchvision's Inception3 layout), so it would load without a word, but
# it is another file (another sha256: statistics made with one never match the other's)
PYTORCH_FID_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
SPATIAL_CHANNELS = 7


class WeightsError(EvaluationError, RuntimeError):
    """Network weights that cannot be found, downloaded or loaded."""


@contextlib.contextmanager
def strict_fp32():
    """Disable TF32 in cuDNN convolutions and cuBLAS matmuls (both on by default for convs)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def default_inception_weights_path() -> str:
    """Where torch.hub (and torch-fidelity) cache the weights: ``$TORCH_HOME/hub/checkpoints``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_FILENAME)


def resolve_inception_weights(path: Optional[str] = None, timeout: float = 30.0) -> str:
    """A local path to the Inception weights: ``path``, the torch.hub cache, or a download.

    Fails fast with one :class:`WeightsError` when the file is missing and GitHub cannot be
    reached, instead of hanging on the download.
    """
    if path is not None:
        if os.path.basename(path).startswith(PYTORCH_FID_FILENAME.split("-")[0] + "-"):
            raise WeightsError(f"--inception-weights {path}: that is pytorch-fid's {PYTORCH_FID_FILENAME}; this "
                               f"codebase uses torch-fidelity's {INCEPTION_WEIGHTS_FILENAME} (the same network, "
                               f"another file and hash): download {INCEPTION_WEIGHTS_URL}")
        if not os.path.isfile(path):
            raise WeightsError(f"--inception-weights {path}: no such file; download {INCEPTION_WEIGHTS_URL}")
        return path
    cached = default_inception_weights_path()
    if os.path.isfile(cached):
        return cached
    how_to = (f"download {INCEPTION_WEIGHTS_URL} on a machine with internet access and pass "
              f"--inception-weights /path/to/{INCEPTION_WEIGHTS_FILENAME} (or copy it to {cached})")
    if not host_reachable(INCEPTION_WEIGHTS_URL, timeout=min(timeout, 5.0)):
        raise WeightsError(f"the Inception weights are not cached and {urllib.parse.urlparse(INCEPTION_WEIGHTS_URL).hostname} "
                           f"is unreachable; {how_to}")
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, cached, progress=True)
    except Exception as exc:  # any network or disk failure ends in the same advice
        raise WeightsError(f"downloading the Inception weights failed ({exc}); {how_to}") from None
    finally:
        socket.setdefaulttimeout(previous)
    return cached


def _inception_network(features):
    """torch-fidelity's network without torch-fidelity's file reading.

    Its constructor loads the weights file with ``torch.load(weights_only=False)``, which runs
    any code a crafted file carries. Here it is handed an empty dict we serialised ourselves and
    its ``load_state_dict`` call is skipped; :func:`build_inception` loads the tensors that
    :func:`models.checkpoints.read_weights` read safely.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class InceptionV3(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: D102 - the constructor's call
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    return InceptionV3("inception-v3-compat", list(features), feature_extractor_weights_path=empty)


def build_inception(weights_path: str, features=("2048", "logits_unbiased")) -> torch.nn.Module:
    """torch-fidelity's Inception-v3 with the weights of ``weights_path``, read without running
    code from the file (one :class:`WeightsError` for a file that is refused or does not fit)."""
    from models.checkpoints import read_weights
    from models.weights_io import UntrustedCheckpointError

    try:
        state = read_weights(weights_path, "the Inception weights")
        model = _inception_network(features)
        torch.nn.Module.load_state_dict(model, state)
    except UntrustedCheckpointError as exc:
        raise WeightsError(str(exc)) from None
    except Exception as exc:  # not a weights file, or the state dict of another network
        raise WeightsError(
            f"{weights_path}: not loadable as torch-fidelity Inception weights ({first_line(exc)}); "
            f"expected {INCEPTION_WEIGHTS_FILENAME} from {INCEPTION_WEIGHTS_URL}") from None
    return model


class InceptionFeatureExtractor:
    """``extractor(images)`` -> ADM's pool_3, spatial and logit features of uint8 NHWC images."""

    def __init__(self, weights_path: str, device: str | torch.device = "cpu"):
        model = build_inception(weights_path)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self._spatial: Optional[torch.Tensor] = None
        self.model.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """uint8 ``(B, H, W, 3)`` -> ``pool (B, 2048)``, ``spatial (B, 2023)``, ``logits (B, 1008)``, float32."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        with strict_fp32():
            pool, logits = self.model(x)
        spatial = self._spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1)
        self._spatial = None
        return {
            "pool": pool.float().cpu().numpy(),
            "spatial": spatial.float().cpu().numpy(),
            "logits": logits.float().cpu().numpy(),
        }


def save_random_inception_weights(path: str, seed: int = 0) -> str:
    """Write randomly initialised weights of the same architecture to ``path`` (tests, smoke runs).

    He-normal convolutions and identity batch norms keep activations O(1) through the 94
    layers, so every feature (pool, spatial, logits) varies from image to image.
    """
    model = _inception_network(["2048"])  # random init, no weights read
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("conv.weight"):
            fan_in = tensor[0].numel()
            value = torch.randn(tensor.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif name == "fc.weight":
            value = torch.randn(tensor.shape, generator=gen) * 0.05
        elif name.endswith("running_var") or name.endswith("bn.weight"):
            value = torch.ones_like(tensor)
        elif tensor.is_floating_point():
            value = torch.zeros_like(tensor)
        else:
            value = tensor.clone()
        state[name] = value
    torch.save(state, path)
    return path
