"""Corrupt training data: errors name the file, bad_samples=skip is deterministic, verify finds everything."""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data.robust import BadSampleTracker, CorruptSampleError, ReplaceBadSamples, replacement_index
from data.verify import verify_dataset
from training.sampler import ResumableBatchSampler

SHAPE = (8, 4, 4)


def _png(width=8, height=8, seed=0):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="png", compress_level=0)
    return buf.getvalue()


def _npy(array):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _write(root, payloads, suffix, labels=None):
    """A per-image dataset from {index: bytes}; returns the relative file names."""
    names = []
    for i, payload in enumerate(payloads):
        rel = f"00000/img{i:08d}{suffix}"
        os.makedirs(os.path.join(root, "00000"), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(payload)
        names.append(rel)
    labels = labels or [i % 3 for i in range(len(names))]
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"labels": [[n, lab] for n, lab in zip(names, labels)], "classes": ["a", "b", "c"]}, f)
    return names


def _latents(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


BAD_IMAGES = {  # index -> (payload, words the message must hold)
    1: (b"this is not a png", "not a decodable image"),
    3: (_png()[: len(_png()) // 2], "truncated"),
    4: (_png(8, 6), "differs from the dataset's (3, 8, 8)"),
}


def _bad_latent_payloads():
    good = _npy(_latents(1)[0])
    nan = _latents(1)[0].copy()
    nan[2, 1, 1] = np.nan
    return {
        1: (b"garbage bytes", "not a readable .npy"),
        2: (good[: len(good) // 2], "truncated"),
        4: (_npy(_latents(1)[0][:, :2, :2].copy()), "differs from the dataset's (8, 4, 4)"),
        5: (_npy(nan), "1 non-finite values"),
    }


def _image_dataset(root, n=8):
    payloads = [BAD_IMAGES[i][0] if i in BAD_IMAGES else _png(seed=i) for i in range(n)]
    _write(root, payloads, ".png")
    return data.open_dataset(root)


def _latent_dataset(root, n=10, bad=None):
    bad = _bad_latent_payloads() if bad is None else bad
    good = _latents(n, seed=1)
    payloads = [bad[i][0] if i in bad else _npy(good[i]) for i in range(n)]
    _write(root, payloads, ".npy")
    return data.open_dataset(root), good


def test_corrupt_images_are_named_with_the_problem(tmp_path):
    ds = _image_dataset(str(tmp_path))
    assert ds.kind == "images" and ds.item_shape == (3, 8, 8)
    for i, (_payload, words) in BAD_IMAGES.items():
        with pytest.raises(CorruptSampleError) as info:
            ds[i]
        message = str(info.value)
        assert f"00000/img{i:08d}.png" in message and words in message, message
        assert info.value.index == i and info.value.path == os.path.join(str(tmp_path), f"00000/img{i:08d}.png")
    assert ds[2][0].shape == (3, 8, 8)


def test_corrupt_latents_are_named_with_the_problem(tmp_path):
    ds, good = _latent_dataset(str(tmp_path))
    for i, (_payload, words) in _bad_latent_payloads().items():
        with pytest.raises(CorruptSampleError) as info:
            ds[i]
        assert f"00000/img{i:08d}.npy" in str(info.value) and words in str(info.value), str(info.value)
    assert torch.equal(ds[3][0], torch.from_numpy(good[3]))


def test_corrupt_packed_rows_and_shards_are_named(tmp_path):
    root = str(tmp_path)
    moments = _latents(6, seed=2)
    moments[4, 0, 0, 0] = np.inf
    for s, (start, count) in enumerate([(0, 3), (3, 3)]):
        np.save(os.path.join(root, f"shard-{s:05d}.npy"), moments[start:start + count])
    np.save(os.path.join(root, "labels.npy"), np.array([0, 1, 0, 1, 0, 1]))
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump({"format": "dfm-packed-latents", "version": 1, "num_items": 6, "item_shape": list(SHAPE),
                   "dtype": "float32", "shard_size": 3, "num_classes": 2,
                   "shards": [{"file": "shard-00000.npy", "start": 0, "count": 3},
                              {"file": "shard-00001.npy", "start": 3, "count": 3}]}, f)
    ds = data.open_dataset(root)
    with pytest.raises(CorruptSampleError, match=r"shard-00001\.npy\[row 1\].*non-finite"):
        ds[4]
    shard0 = os.path.join(root, "shard-00000.npy")
    raw = open(shard0, "rb").read()
    open(shard0, "wb").write(raw[: len(raw) - 100])  # truncated
    fresh = data.open_dataset(root)
    with pytest.raises(CorruptSampleError, match=r"shard-00000\.npy\[row 0\].*not a readable \.npy"):
        fresh[0]
    assert torch.equal(fresh[3][0], torch.from_numpy(moments[3]))


def _loader_batches(dataset, workers, start_step=0, steps=6):
    sampler = ResumableBatchSampler(len(dataset), 4, seed=7, start_step=start_step)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
    it = iter(loader)
    return [next(it) for _ in range(steps)]


def test_skip_replaces_deterministically_whatever_the_workers(tmp_path):
    ds, good = _latent_dataset(str(tmp_path), n=12)
    wrapped = ReplaceBadSamples(ds)
    bad = set(_bad_latent_payloads())
    # the replacement is the first good index of the probe sequence, a pure function of the index
    for i in bad:
        j = next(replacement_index(i, a, len(ds)) for a in range(1, 65) if replacement_index(i, a, len(ds)) not in bad)
        x, y, flag = wrapped[i]
        assert flag == i and torch.equal(x, torch.from_numpy(good[j])) and y == j % 3
    assert wrapped[0][2] == -1 and wrapped.kind == "latents" and wrapped.item_shape == SHAPE
    serial = _loader_batches(wrapped, workers=0)
    parallel = _loader_batches(wrapped, workers=2)
    for (x0, y0, f0), (x1, y1, f1) in zip(serial, parallel):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(f0, f1)
    flags = torch.cat([f for _, _, f in serial])
    assert set(flags[flags >= 0].tolist()) <= bad and (flags >= 0).any()
    # resume from step 3 sees exactly the batches of the uninterrupted run
    for (x0, _, f0), (x1, _, f1) in zip(serial[3:], _loader_batches(wrapped, workers=0, start_step=3, steps=3)):
        assert torch.equal(x0, x1) and torch.equal(f0, f1)

    tracker = BadSampleTracker(wrapped, "skip")
    for step, (_, _, f) in enumerate(serial):
        tracker.observe(f, step=step)
    assert tracker.count == len(set(flags[flags >= 0].tolist())) and tracker.replacements == int((flags >= 0).sum())
    report = str(tmp_path / "bad_samples.json")
    tracker.write(report)
    saved = json.load(open(report))
    assert saved["num_files"] == tracker.count and all(r["file"].endswith(".npy") and r["reason"] for r in saved["files"])
    again = BadSampleTracker(wrapped, "skip", existing=report)  # a resumed launch keeps the list
    assert again.count == tracker.count

    strict = BadSampleTracker(wrapped, "error")
    assert strict.observe(torch.tensor([-1, -1])) == []
    with pytest.raises(CorruptSampleError) as info:
        strict.observe(torch.tensor([-1, 1]))
    assert "00000/img00000001.npy" in str(info.value) and "bad_samples=skip" in str(info.value)
    assert "\n" not in str(info.value)
    deferred = BadSampleTracker(wrapped, "error", defer_errors=True)
    assert deferred.observe(torch.tensor([5, 1])) == [] and deferred.pending.index == 5
    with pytest.raises(ValueError, match="bad_samples must be one of error, skip"):
        BadSampleTracker(wrapped, "ignore")


def test_corrupt_sample_error_survives_the_dataloader_reraise():
    error = CorruptSampleError("Caught CorruptSampleError in DataLoader worker process 0 ...")
    assert isinstance(error, ValueError) and error.index is None
    import pickle

    copy = pickle.loads(pickle.dumps(CorruptSampleError(3, "a/b.png", "broken")))
    assert (copy.index, copy.path, copy.reason) == (3, "a/b.png", "broken")


def test_verify_finds_every_problem_and_writes_the_report_only_where_asked(tmp_path, capsys):
    import dataset_tools

    images = str(tmp_path / "images")
    _image_dataset(images)
    before = sorted(os.listdir(images))
    summary = verify_dataset(images, workers=2, progress=False)
    found = {p["file"]: p["reason"] for p in summary["problems"]}
    assert set(found) == {f"00000/img{i:08d}.png" for i in BAD_IMAGES}
    assert "not a decodable image" in found["00000/img00000001.png"] and "(3, 6, 8)" in found["00000/img00000004.png"]
    assert summary["report"] is None and sorted(os.listdir(images)) == before  # nothing written into the dataset
    report = summary["report_data"]
    assert report["num_problems"] == 3 and report["num_items"] == 8 and report["item_shape"] == [3, 8, 8]
    assert [p["file"] for p in report["problems"]] == sorted(found)

    latents = str(tmp_path / "latents")
    _latent_dataset(latents)
    with open(os.path.join(latents, "dataset.json")) as f:
        meta = json.load(f)
    meta["labels"][7][1] = 5  # only 3 classes
    with open(os.path.join(latents, "dataset.json"), "w") as f:
        json.dump(meta, f)
    before = sorted(os.listdir(latents))
    assert dataset_tools.main(["verify", latents, "--workers", "1", "--no-progress"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "5 problem(s)" in lines[0] and len(lines) == 6 and sorted(os.listdir(latents)) == before
    assert lines[1].startswith("  00000/img00000001.npy: not a readable .npy")
    assert dataset_tools.main(["verify", latents, "--workers", "1", "--no-progress", "--report", "-"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert {p["index"] for p in report["problems"]} == set(_bad_latent_payloads()) | {7}
    assert "label 5 is outside 0..2" in report["problems"][-1]["reason"]
    out = str(tmp_path / "elsewhere.json")
    assert dataset_tools.main(["verify", latents, "--no-progress", "--report", out]) == 1
    assert json.load(open(out)) == report and capsys.readouterr().out.splitlines()[-1] == f"  full report: {out}"

    clean = str(tmp_path / "clean")
    _latent_dataset(clean, bad={})
    assert dataset_tools.main(["verify", clean, "--no-progress"]) == 0
    assert capsys.readouterr().out.count("\n") == 1


def test_verify_lists_the_first_ten_problems(tmp_path):
    from data.verify import format_summary

    bad = {i: (b"garbage", "not a readable .npy") for i in range(12)}
    _latent_dataset(str(tmp_path), n=14, bad=bad)
    lines = format_summary(verify_dataset(str(tmp_path), workers=1, progress=False)).splitlines()
    assert len(lines) == 12 and lines[-1] == "  ... 2 more (--report FILE writes them all as JSON)"
