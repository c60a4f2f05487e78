"""experiments/study/build_data.py: deterministic, offline, labels and crops as documented."""
import importlib.util
import json
import os
import socket

import numpy as np
import pytest
import skimage.data
from PIL import Image

import data
from evaluation.stats_file import load_statistics
from conftest import read_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("build_data", os.path.join(REPO, "experiments", "study", "build_data.py"))
build_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_data)

CLASSES = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
           "motorcycle"]



@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")

    def no_network(*args, **kwargs):
        raise AssertionError("the study data builder opened a network connection")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "socket", no_network)
        patch.setattr(socket, "create_connection", no_network)
        for name in ("a", "b"):
            build_data.build(str(tmp / name), train_per_class=3, heldout_per_class=2, seed=5)
    return tmp


def test_two_builds_are_byte_identical_and_the_seed_matters(built, tmp_path):
    first, second = read_tree(built / "a"), read_tree(built / "b")
    assert len(first) == 8 * 5 + 2 + 3 and first == second  # PNGs, 2 dataset.json, crops, info, swd npz
    build_data.build(str(tmp_path / "c"), train_per_class=3, heldout_per_class=2, seed=6)
    assert read_tree(tmp_path / "c")["train/00000/img00000000.png"] != first["train/00000/img00000000.png"]


def test_labels_classes_and_pixels_come_from_the_right_photograph(built):
    train, heldout = data.open_dataset(str(built / "a" / "train")), data.open_dataset(str(built / "a" / "heldout"))
    assert train.classes == CLASSES and len(train) == 24 and len(heldout) == 16
    assert np.bincount(train.labels).tolist() == [3] * 8 and np.bincount(heldout.labels).tolist() == [2] * 8
    with open(built / "a" / "crops.json") as f:
        crops = json.load(f)
    photos = {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(), "chelsea": skimage.data.chelsea(),
              "rocket": skimage.data.rocket(), "hubble_deep_field": skimage.data.hubble_deep_field(),
              "retina": skimage.data.retina(), "immunohistochemistry": skimage.data.immunohistochemistry(),
              "motorcycle": skimage.data.stereo_motorcycle()[0]}
    for c in crops:
        dataset = train if c["split"] == "train" else heldout
        image, label = dataset[c["index"]]
        assert label == c["label"] == CLASSES.index(c["photograph"])
        top, left, side = c["box"]
        photo = photos[c["photograph"]]
        assert side in {round(s * min(photo.shape[:2])) for s in (0.125, 0.25, 0.5)}
        expected = np.asarray(Image.fromarray(photo[top:top + side, left:left + side]).resize((32, 32), Image.LANCZOS))
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected)
    train_boxes = {(c["label"], *c["box"]) for c in crops if c["split"] == "train"}
    assert not train_boxes & {(c["label"], *c["box"]) for c in crops if c["split"] == "heldout"}


def test_swd_reference_holds_every_heldout_crop(built):
    stats = load_statistics(str(built / "a" / "heldout_swd.npz"))
    heldout = data.open_dataset(str(built / "a" / "heldout"))
    expected = np.stack([heldout[i][0].permute(1, 2, 0).numpy() for i in range(len(heldout))])
    np.testing.assert_array_equal(stats.arrays["swd_images"], expected)
    assert stats.available() == ("swd",) and stats.meta["resolution"] == [32, 32]
