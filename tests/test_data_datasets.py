"""data.open_dataset on hand-written files of every documented format, and its errors."""

import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

import data


def _write_per_image_latents(root, moments, labels, with_classes=False):
    entries = []
    for i, (m, lab) in enumerate(zip(moments, labels)):
        rel = f"{i // 1000:05d}/img-mean-std-{i:08d}.npy"
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        np.save(os.path.join(root, rel), m)
        entries.append([rel, lab])
    meta = {"labels": entries}
    if with_classes:
        meta["classes"] = [f"c{k}" for k in range(10)]
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f)


def _write_packed(root, moments, labels, shard_size):
    os.makedirs(root)
    shards = []
    for s, start in enumerate(range(0, len(moments), shard_size)):
        chunk = moments[start:start + shard_size]
        np.save(os.path.join(root, f"shard-{s:05d}.npy"), chunk)
        shards.append({"file": f"shard-{s:05d}.npy", "start": start, "count": len(chunk)})
    np.save(os.path.join(root, "labels.npy"), np.asarray(labels, dtype=np.int64))
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump({"format": "dfm-packed-latents", "version": 1, "num_items": len(moments),
                   "item_shape": list(moments.shape[1:]), "dtype": "float32", "shard_size": shard_size,
                   "shards": shards, "num_classes": 7}, f)


@pytest.fixture
def moments():
    return np.random.default_rng(0).standard_normal((5, 8, 2, 2)).astype(np.float32)


def test_per_image_latents_folder_and_zip(tmp_path, moments):
    labels = [3, 1, 4, 1, 5]
    root = str(tmp_path / "lat")
    _write_per_image_latents(root, moments, labels)
    ds = data.open_dataset(root)
    assert ds.kind == "latents" and len(ds) == 5 and ds.item_shape == (8, 2, 2)
    assert ds.num_classes == 6  # no class list: max label + 1
    for i in range(5):
        x, y = ds[i]
        assert x.dtype == torch.float32 and y == labels[i]
        np.testing.assert_array_equal(x.numpy(), moments[i])

    zpath = str(tmp_path / "lat.zip")
    with zipfile.ZipFile(zpath, "w") as zf:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                full = os.path.join(dirpath, name)
                zf.write(full, os.path.relpath(full, root))
    zds = data.open_dataset(zpath)
    assert zds.kind == "latents" and len(zds) == 5
    np.testing.assert_array_equal(zds[4][0].numpy(), moments[4])
    assert len(pickle.dumps(zds)) < 10_000  # no open ZIP handle travels to DataLoader workers


def test_packed(tmp_path, moments):
    root = str(tmp_path / "packed")
    labels = [0, 1, 2, 3, 6]
    _write_packed(root, moments, labels, shard_size=3)
    ds = data.open_dataset(root)
    assert isinstance(ds, data.PackedLatentDataset)
    assert ds.kind == "latents" and len(ds) == 5 and ds.item_shape == (8, 2, 2) and ds.num_classes == 7
    for i in range(-1, 5):
        np.testing.assert_array_equal(ds[i][0].numpy(), moments[i])
        assert ds[i][1] == labels[i]
    with pytest.raises(IndexError):
        ds[5]
    assert len(pickle.dumps(ds)) < 10_000  # shard files are reopened per process, never pickled
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    x = torch.cat([b[0] for b in loader])
    np.testing.assert_array_equal(x.numpy(), moments)


def _save_shard(path, array, version=(1, 0)):
    with open(path, "wb") as f:
        np.lib.format.write_array(f, array, version=version)


def test_packed_rows_come_from_positioned_reads_not_a_map(tmp_path):
    """Every row equals the array np.load reads, in this process and in forked workers that inherit
    the opened files; no shard is mapped into the process (mapped pages would grow its RSS)."""
    moments = np.random.default_rng(1).standard_normal((7, 8, 4, 4)).astype(np.float32)
    root = str(tmp_path / "packed")
    _write_packed(root, moments, [1] * 7, shard_size=3)
    _save_shard(os.path.join(root, "shard-00001.npy"), moments[3:6], version=(2, 0))  # the larger header
    ds = data.open_dataset(root)
    first = ds[0][0]
    first += 1  # the item is the caller's own copy
    for i in range(7):
        np.testing.assert_array_equal(ds[i][0].numpy(), np.load(os.path.join(root, ds._shards[i // 3]["file"]))[i % 3])
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=True, num_workers=2,
                                         generator=torch.Generator().manual_seed(0))
    seen = {}
    for x, _ in loader:
        for row in x.numpy():
            seen[np.flatnonzero((moments == row).all(axis=(1, 2, 3)))[0]] = row
    assert sorted(seen) == list(range(7))
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as f:
            assert "shard-0000" not in f.read()


@pytest.mark.parametrize("array, words", [
    (np.asfortranarray(np.zeros((3, 8, 2, 2), np.float32)), "Fortran order"),
    (np.zeros((3, 8, 2, 2), ">f4"), ">f4"),
    (np.zeros((3, 8, 2, 2), np.float64), "float64"),
    (np.zeros((2, 8, 2, 2), np.float32), "(2, 8, 2, 2), index.json says float32 (3, 8, 2, 2)"),
])
def test_a_shard_unlike_its_index_is_named(tmp_path, moments, array, words):
    root = str(tmp_path / "packed")
    _write_packed(root, moments, [0] * 5, shard_size=3)
    _save_shard(os.path.join(root, "shard-00000.npy"), array)
    ds = data.open_dataset(root)
    with pytest.raises(data.robust.CorruptSampleError, match=r"shard-00000\.npy\[row 1\]") as info:
        ds[1]
    assert words in str(info.value)
    np.testing.assert_array_equal(ds[4][0].numpy(), moments[4])  # the other shard still reads


def test_a_shard_truncated_after_it_was_opened(tmp_path, moments):
    root = str(tmp_path / "packed")
    _write_packed(root, moments, [0] * 5, shard_size=3)
    ds = data.open_dataset(root)
    np.testing.assert_array_equal(ds[0][0].numpy(), moments[0])
    path = os.path.join(root, "shard-00000.npy")
    os.truncate(path, os.path.getsize(path) - moments[0].nbytes // 2)
    np.testing.assert_array_equal(ds[1][0].numpy(), moments[1])
    with pytest.raises(data.robust.CorruptSampleError, match=r"\[row 2\].*ended before this row"):
        ds[2]


NUMBERED = [
    ["00000/img00000000.png", "00000/img00000007.png", "00001/img00001000.png", "01281/img01281166.png"],
    ["00000/img-mean-std-00000003.npy", "00002/img-mean-std-00002999.npy"],
    ["00000/img000000001.png"],  # nine digits: the prefix is "img0"
]
NOT_NUMBERED = [
    ["00000/img00000000.png", "00000/img00000001.jpg"],  # another suffix
    ["00000/img00000000.png", "00001/img00000001.png"],  # the folder is not idx // 1000
    ["00000/img00000000.png", "00000/img0000001.png"],  # shorter
    ["00000/img00000000.png", "00000/img00000001.png.bak"],  # longer
    ["00000/img00000000.png", "00000/imgx0000001.png"],  # a letter among the digits
    ["cat/photo.png", "dog/é.png", "dog/\u732b.png"],  # free names, not ASCII
    ["00000/img00000000.png", "00000/img0000000é.png"],
]


@pytest.mark.parametrize("names", NUMBERED + NOT_NUMBERED)
def test_file_names_keep_every_name_without_a_python_object_each(names, monkeypatch):
    from data import per_image
    from data.per_image import FileNames

    monkeypatch.setattr(per_image, "_CHUNK", 2)  # names are converted in chunks

    held = FileNames(names)
    assert len(held) == len(names) and list(held) == names and [held[i] for i in range(-len(names), 0)] == names
    assert (held.numbers is not None) == (names in NUMBERED)
    if held.numbers is not None:
        assert held.numbers.tolist() == [int(n.split("/")[1][len(held.prefix):8 + len(held.prefix)]) for n in names]
    assert held.first_difference(list(names)) is None and held.first_difference(FileNames(names)) is None
    changed = names[:-1] + [names[-1][:-1] + "x"]
    assert held.first_difference(FileNames(changed)) == held.first_difference(changed) == len(names) - 1
    with pytest.raises(IndexError):
        held[len(names)]


def test_latent_names_follow_the_image_numbers_or_the_positions():
    import re

    from data.encode import latent_names
    from data.per_image import FileNames

    def by_hand(files):  # the rule as the docs state it: idx of img{idx}.png, else the position
        found = [re.search(r"img(\d+)\.[A-Za-z]+$", f) for f in files]
        idx = [int(m.group(1)) for m in found] if all(found) else []
        idx = idx if idx and len(set(idx)) == len(idx) else range(len(files))
        return [f"{i // 1000:05d}/img-mean-std-{i:08d}.npy" for i in idx]

    for files in NUMBERED + NOT_NUMBERED + [["a/img5.png", "b/img5.png"], ["x/img12.png", "y/img3.jpg"]]:
        assert list(latent_names(FileNames(files))) == list(latent_names(files)) == by_hand(files), files


def test_a_large_per_image_dataset_keeps_about_16_bytes_per_item(tmp_path):
    """numbers + labels (int64 each); a list of names held ~100 bytes per item."""
    import gc
    import tracemalloc

    n = 20000
    root = tmp_path / "lat"
    root.mkdir()
    with open(root / "dataset.json", "w") as f:
        json.dump({"labels": [[f"{i // 1000:05d}/img-mean-std-{i:08d}.npy", i % 7] for i in range(n)]}, f)
    gc.collect()
    tracemalloc.start()
    try:
        ds = data.open_dataset(str(root))
        gc.collect()
        retained, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ds.files[12345] == "00012/img-mean-std-00012345.npy" and int(ds.labels[12345]) == 12345 % 7
    assert retained < 24 * n, retained


def test_parent_folder_prefers_latents(tmp_path, moments):
    from PIL import Image

    _write_per_image_latents(str(tmp_path / "vae-sd"), moments, [0] * 5, with_classes=True)
    os.makedirs(tmp_path / "images" / "00000")
    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "images" / "00000" / "img00000000.png")
    with open(tmp_path / "images" / "dataset.json", "w") as f:
        json.dump({"labels": [["00000/img00000000.png", 0]]}, f)
    ds = data.open_dataset(str(tmp_path))
    assert ds.kind == "latents" and ds.num_classes == 10
    img = data.open_dataset(str(tmp_path), kind="images")
    assert img.kind == "images" and img.item_shape == (3, 16, 16)
    assert img[0][0].dtype == torch.uint8 and img[0][0][:, 0, 0].tolist() == [10, 20, 30]
    with pytest.raises(ValueError, match="holds latents, but images were expected"):
        data.open_dataset(str(tmp_path / "vae-sd"), kind="images")


def test_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="nothing-here.*does not exist"):
        data.open_dataset(missing)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="empty.*not a dataset"):
        data.open_dataset(str(tmp_path / "empty"))
    os.makedirs(tmp_path / "nolabels")
    with open(tmp_path / "nolabels" / "dataset.json", "w") as f:
        json.dump({"labels": []}, f)
    with pytest.raises(ValueError, match="empty"):
        data.open_dataset(str(tmp_path / "nolabels"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .zip"):
        data.open_dataset(str(tmp_path / "file.txt"))
