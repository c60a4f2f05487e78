"""The feature vocabulary metrics declare their needs in, and the networks behind it.

A metric (``evaluation.metric_base.Metric``) names the kinds of :data:`FEATURES` it reads; the
networks to load follow from them, so a metric that reads only ``images`` loads no network and
needs no weights file. :class:`FeatureNetworks` locates the weights of the networks a set of kinds
needs (failing fast, before any image is read), builds them on request and computes the kinds of
a batch in one forward pass per network.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from .fdd import DEFAULT_DINOV2_MODEL, DINOV2_IMAGE_SIZE, DinoV2FeatureExtractor, load_dinov2, resolve_dinov2_weights
from .inception import InceptionFeatureExtractor, resolve_inception_weights, strict_fp32

# kind -> (network that computes it or None, what a batch of B images gives)
FEATURES: Dict[str, Tuple[Optional[str], str]] = {
    "images": (None, "uint8 (B, H, W, 3): the images themselves"),
    "inception_pool": ("inception", "float32 (B, 2048): Inception pool_3"),
    "inception_spatial": ("inception", "float32 (B, 2023): Inception mixed_6/conv[..., :7], NHWC-flattened"),
    "inception_logits": ("inception", "float32 (B, 1008): Inception bias-free logits"),
    "dinov2": ("dinov2", "float32 (B, D): DINOv2 final-norm CLS token"),
}
# the order networks are located and named in messages
NETWORKS = ("inception", "dinov2")
_INCEPTION_KEYS = {"inception_pool": "pool", "inception_spatial": "spatial", "inception_logits": "logits"}


def check_kinds(kinds: Iterable[str], owner: str) -> Tuple[str, ...]:
    """``kinds`` as a tuple; ValueError naming ``owner`` for a kind outside :data:`FEATURES`."""
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in FEATURES]
    if unknown:
        raise ValueError(f"{owner} needs unknown feature kind(s) {unknown}; known: {list(FEATURES)}")
    return kinds


def networks_of(kinds: Iterable[str]) -> List[str]:
    """The networks computing ``kinds``, in :data:`NETWORKS` order (none for ``images`` alone)."""
    used = {FEATURES[k][0] for k in kinds}
    return [n for n in NETWORKS if n in used]


@dataclass
class NetworkOptions:
    """Where the networks' weights are: local files (None: the torch.hub / Hugging Face cache, or a download)."""

    inception_weights: Optional[str] = None
    dinov2_model: str = DEFAULT_DINOV2_MODEL
    dinov2_weights: Optional[str] = None


class FeatureNetworks:
    """The networks ``kinds`` need: weights located at construction, networks built by :meth:`build`.

    ``paths`` maps each needed network to its local weights file (``WeightsError``, one line, when
    one is missing and cannot be downloaded). ``networks(images, kinds)`` returns ``{kind: array}``.
    """

    def __init__(self, kinds: Iterable[str], options: Optional[NetworkOptions] = None,
                 device: str | torch.device = "cpu"):
        self.kinds = tuple(dict.fromkeys(kinds))
        self.options = options or NetworkOptions()
        self.device = torch.device(device)
        self.paths: Dict[str, str] = {}
        for network in networks_of(self.kinds):
            if network == "inception":
                self.paths[network] = resolve_inception_weights(self.options.inception_weights)
            else:
                self.paths[network] = resolve_dinov2_weights(self.options.dinov2_model, self.options.dinov2_weights)
        self._built: Dict[str, object] = {}

    def build(self) -> "FeatureNetworks":
        """Load the networks (random init happens here: callers that must not move the global random
        streams wrap this in ``torch.random.fork_rng``)."""
        if "inception" in self.paths and "inception" not in self._built:
            self._built["inception"] = InceptionFeatureExtractor(self.paths["inception"], self.device)
        if "dinov2" in self.paths and "dinov2" not in self._built:
            model = load_dinov2(self.options.dinov2_model, self.paths["dinov2"], self.device)
            self._built["dinov2"] = DinoV2FeatureExtractor(model)
        return self

    def __call__(self, images: np.ndarray, kinds: Iterable[str]) -> Dict[str, np.ndarray]:
        """``{kind: array}`` of uint8 ``(B, H, W, 3)`` images for each of ``kinds`` (see :data:`FEATURES`)."""
        kinds = set(kinds)
        out: Dict[str, np.ndarray] = {}
        if "images" in kinds:
            out["images"] = images
        if kinds & set(_INCEPTION_KEYS):
            with strict_fp32():
                feats = self.build()._built["inception"](images)
            out.update({kind: feats[key] for kind, key in _INCEPTION_KEYS.items() if kind in kinds})
        if "dinov2" in kinds:
            with strict_fp32():
                out["dinov2"] = self.build()._built["dinov2"](images)
        return out


def network_meta(network: str, options: NetworkOptions, identity: Dict[str, object]) -> Dict[str, object]:
    """What a statistics file records of a network: the weights file's identity (and DINOv2's model)."""
    if network == "dinov2":
        return {"model": options.dinov2_model, "image_size": DINOV2_IMAGE_SIZE, **identity}
    return dict(identity)
