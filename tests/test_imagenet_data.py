"""deqlib.data.imagenet and deqlib.data.matv5: layout checks, transforms against hand-computed
geometry, batches independent of workers and processes, prepare on tiny official-format
archives (atomic, checksummed), the shared slice."""

import base64
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deqlib.data.imagenet import (
    ILSVRC_MD5,
    EvalTransform,
    ImageDataset,
    ImageNetBatches,
    ImageNetDataConfig,
    ImageNetEval,
    TrainTransform,
    center_crop_box,
    eval_transform,
    load_imagenet,
    load_rgb,
    main,
    measure_throughput,
    normalize,
    preload_images,
    prepare_imagenet,
    random_resized_crop_box,
    scan_image_folder,
    train_transform,
)
from deqlib.data.matv5 import read_mat
from conftest import ROOT, skip_without_slice

SLICE = "../shared/data/imagenette-slice"  # relative to the repository, as params.yaml would say it


def _jpeg(path: Path, size=(20, 16), mode="RGB", seed=0, color=None) -> bytes:
    """A small JPEG of noise (or one colour) at ``path``; returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    if color is not None:
        arr = np.broadcast_to(np.array(color, dtype=np.uint8), (size[1], size[0], bands)).copy()
    else:
        arr = rng.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)
    img.save(path, "JPEG", quality=95)
    return path.read_bytes()


def _folder(root: Path, classes=("n00000001", "n00000002", "n00000003"), n_train=4, n_val=2) -> Path:
    for c, wnid in enumerate(classes):
        for split, n in (("train", n_train), ("val", n_val)):
            for k in range(n):
                _jpeg(root / split / wnid / f"{wnid}_{k}.JPEG", size=(20 + k, 16), seed=100 * c + k)
    return root


def _cfg(root: Path, **kw) -> ImageNetDataConfig:
    return ImageNetDataConfig(root=str(root.parent), folder=root.name, workers=0, **kw)


# --------------------------------------------------------------------------------- config


@pytest.mark.parametrize("kw, key", [
    ({"eval_size": 300, "eval_resize": 256}, "eval_size"),
    ({"scale": (0.0, 1.0)}, "scale"),
    ({"scale": (0.6, 0.2)}, "scale"),
    ({"scale": (0.1, 1.5)}, "scale"),
    ({"check": "full"}, "check"),
    ({"workers": -1}, "workers"),
    ({"flip": "yes"}, "flip"),
    ({"max_per_class": 0}, "max_per_class"),
    ({"train_size": 2.5}, "train_size"),
    ({"folder": ""}, "folder"),
])
def test_config_refuses_bad_values_by_name(kw, key):
    with pytest.raises(ValueError, match=rf"^{key} must be .*got {key}="):
        ImageNetDataConfig(**kw)


# --------------------------------------------------------------------------------- layout


def test_reads_the_layout_classes_sorted_and_limited(tmp_path):
    root = _folder(tmp_path / "inet", classes=("n00000002", "n00000001"))
    data = load_imagenet(_cfg(root))
    assert data.classes == ("n00000001", "n00000002") == data.class_names
    assert len(data.train) == 8 and len(data.val) == 4
    assert data.train.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert data.train.path(4) == root / "train" / "n00000002" / "n00000002_0.JPEG"
    limited = load_imagenet(_cfg(root, max_per_class=1))
    assert len(limited.train) == 2 and len(limited.val) == 2


def test_root_from_the_environment_and_relative_to_base(tmp_path, monkeypatch):
    root = _folder(tmp_path / "data" / "inet", classes=("n00000001",), n_train=1, n_val=1)
    monkeypatch.setenv("DEQLIB_DATA", str(tmp_path / "data"))
    assert load_imagenet(ImageNetDataConfig(root="", folder="inet", workers=0)).folder == root
    rel = load_imagenet(ImageNetDataConfig(root="data", folder="inet", workers=0), base=tmp_path)
    assert rel.folder == root


def test_missing_root_names_path_layout_and_prepare(tmp_path):
    with pytest.raises(ValueError) as err:
        load_imagenet(_cfg(tmp_path / "nowhere"))
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "train/<wnid>/*.JPEG" in msg and "val/<wnid>" in msg
    assert "python -m deqlib.data.imagenet prepare --train-tar ILSVRC2012_img_train.tar" in msg
    assert "image-net.org" in msg and "account" in msg


def test_missing_split_is_named(tmp_path):
    root = _folder(tmp_path / "inet", n_val=0)
    assert not (root / "val").exists()
    with pytest.raises(ValueError, match=r"has no val/ folder.*prepare"):
        load_imagenet(_cfg(root))


def test_empty_class_folder_is_named(tmp_path):
    root = _folder(tmp_path / "inet")
    for p in (root / "train" / "n00000002").iterdir():
        p.unlink()
    with pytest.raises(ValueError, match=r"class folder .*train/n00000002 holds no images"):
        load_imagenet(_cfg(root))


def test_flat_validation_folder_is_refused(tmp_path):
    root = _folder(tmp_path / "inet")
    _jpeg(root / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(ValueError, match=r"1 image files outside class folders \(e.g. ILSVRC2012_val_00000001"):
        load_imagenet(_cfg(root))


def test_train_val_class_mismatch_names_the_classes(tmp_path):
    root = _folder(tmp_path / "inet")
    _jpeg(root / "val" / "n00000009" / "x.JPEG")
    with pytest.raises(ValueError, match=r"train and val classes differ: only in train/ \[\] \(0\), "
                                         r"only in val/ \['n00000009'\]"):
        load_imagenet(_cfg(root))


def test_truncated_and_corrupt_images_found_by_the_header_check(tmp_path):
    root = _folder(tmp_path / "inet")
    cut = root / "train" / "n00000001" / "big.JPEG"
    blob = _jpeg(cut, size=(64, 64))
    cut.write_bytes(blob[:len(blob) // 2])  # header intact, data cut short: opening succeeds
    (root / "val" / "n00000002" / "text.JPEG").write_bytes(b"not an image at all")
    with pytest.raises(ValueError) as err:
        load_imagenet(_cfg(root))
    msg = str(err.value)
    assert "1 unreadable image(s)" in msg and str(cut) in msg and "truncated" in msg
    (root / "train" / "n00000001" / "big.JPEG").unlink()
    with pytest.raises(ValueError, match=r"text\.JPEG \(UnidentifiedImageError"):
        load_imagenet(_cfg(root))


def test_list_check_defers_a_truncated_file_to_its_decode(tmp_path):
    root = _folder(tmp_path / "inet", classes=("n00000001",), n_train=1, n_val=1)
    cut = root / "train" / "n00000001" / "n00000001_0.JPEG"
    blob = _jpeg(cut, size=(64, 64))
    cut.write_bytes(blob[:len(blob) // 2])
    data = load_imagenet(_cfg(root, check="list"))  # the listing passes
    with pytest.raises(ValueError, match=rf"cannot decode {cut}"):
        data.train_batches(1).batch(0, 0)
    with pytest.raises(ValueError, match="truncated"):
        load_imagenet(_cfg(root, check="decode"))
    (root / "train" / "n00000001" / "n00000001_0.JPEG").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty file"):
        load_imagenet(_cfg(root, check="list"))


def test_trailing_bytes_after_the_end_marker_are_no_false_alarm(tmp_path):
    root = _folder(tmp_path / "inet", classes=("n00000001",), n_train=1, n_val=1)
    path = root / "train" / "n00000001" / "n00000001_0.JPEG"
    path.write_bytes(path.read_bytes() + b"\0" * 4000)  # no FF D9 in the last KiB, still valid
    load_imagenet(_cfg(root))


def test_greyscale_and_cmyk_become_rgb(tmp_path):
    _jpeg(tmp_path / "g.JPEG", mode="L", seed=3)
    grey = load_rgb(tmp_path / "g.JPEG")
    arr = np.asarray(grey)
    assert grey.mode == "RGB" and arr.shape == (16, 20, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    with Image.open(tmp_path / "g.JPEG") as im:
        assert (arr[..., 0] == np.asarray(im)).all()
    _jpeg(tmp_path / "white.JPEG", mode="CMYK", color=(0, 0, 0, 0))
    _jpeg(tmp_path / "cyan.JPEG", mode="CMYK", color=(255, 0, 0, 0))
    white, cyan = (np.asarray(load_rgb(tmp_path / f"{n}.JPEG")).astype(int) for n in ("white", "cyan"))
    assert np.abs(white - 255).max() <= 2  # no ink: white
    assert np.abs(cyan - np.array([0, 255, 255])).max() <= 2  # full cyan ink absorbs red


def test_class_names_from_classes_tsv(tmp_path):
    root = _folder(tmp_path / "inet", classes=("n00000001", "n00000002"), n_train=1, n_val=1)
    (root / "classes.tsv").write_text("wnid\timagenet1k_index\tname\n"
                                      "n00000002\t7\tgoldfish\nn00000001\t3\ttench\nn00000005\t9\tother\n")
    assert load_imagenet(_cfg(root)).class_names == ("tench", "goldfish")
    (root / "classes.tsv").write_text("wnid\timagenet1k_index\tname\nn00000002\t7\n")
    with pytest.raises(ValueError, match=r"classes.tsv line 2: expected wnid<TAB>index<TAB>name"):
        load_imagenet(_cfg(root))
    (root / "classes.tsv").write_text("wnid\timagenet1k_index\tname\nn00000002\t7\tgoldfish\n")
    with pytest.raises(ValueError, match=r"classes.tsv names no class \['n00000001'\]"):
        load_imagenet(_cfg(root))


# --------------------------------------------------------------------------------- transforms


def test_crop_box_forced_geometries():
    g = torch.Generator().manual_seed(0)
    assert random_resized_crop_box(10, 10, (1.0, 1.0), (1.0, 1.0), g) == (0, 0, 10, 10)
    for seed in range(20):
        left, top, w, h = random_resized_crop_box(8, 8, (0.25, 0.25), (1.0, 1.0), torch.Generator().manual_seed(seed))
        assert (w, h) == (4, 4) and 0 <= left <= 4 and 0 <= top <= 4
    # 20 x 10 (aspect 2) with the whole area: no crop of aspect <= 4/3 fits, so the fallback,
    # the centre 13 x 10 (w = round(10 * 4/3)), left = (20 - 13) // 2
    assert random_resized_crop_box(20, 10, (1.0, 1.0), (3 / 4, 4 / 3), g) == (3, 0, 13, 10)
    # 10 x 30 (aspect 1/3): w = 10, h = round(10 / (3/4)) = 13, top = (30 - 13) // 2 = 8
    assert random_resized_crop_box(10, 30, (1.0, 1.0), (3 / 4, 4 / 3), g) == (0, 8, 10, 13)


def test_crop_box_draws_stay_in_range_and_follow_the_generator():
    boxes = [random_resized_crop_box(400, 300, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(s))
             for s in range(300)]
    for left, top, w, h in boxes:
        assert 0 <= left and left + w <= 400 and 0 <= top and top + h <= 300
        assert 0.08 * 0.98 <= w * h / 120_000 <= 1.0
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03  # rounding w and h
    assert len(set(boxes)) > 250  # the draws vary
    again = random_resized_crop_box(400, 300, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(7))
    assert again == boxes[7]


def test_center_crop_box_hand_computed():
    # 300 x 200 -> short side 256: 384 x 256; crop 224 at left (384-224)/2 = 80, top 16;
    # in source pixels (x 300/384 = 0.78125, y 200/256): 62.5, 12.5, 237.5, 187.5
    assert center_crop_box(300, 200, 256, 224) == (62.5, 12.5, 237.5, 187.5)
    assert center_crop_box(200, 300, 256, 224) == (12.5, 62.5, 187.5, 237.5)
    # 500 x 375 -> 341 x 256 (int(341.33)); left = round(58.5) = 58 (half to even), top = 16
    box = center_crop_box(500, 375, 256, 224)
    assert box == pytest.approx((58 * 500 / 341, 16 * 375 / 256, 282 * 500 / 341, 240 * 375 / 256))
    # crop 222: left = round(59.5) = 60 (not the floor, 59), top = round(17.0) = 17
    box = center_crop_box(500, 375, 256, 222)
    assert box == pytest.approx((60 * 500 / 341, 17 * 375 / 256, 282 * 500 / 341, 239 * 375 / 256))


def _gradient(w: int, h: int) -> Image.Image:
    """Pixel (y, x) = (10 y + x, x, y): every pixel its own value."""
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([10 * y + x, x, y], -1).astype(np.uint8), "RGB")


def test_eval_transform_pixels():
    img = _gradient(8, 8)
    out = eval_transform(img, 8, 4)  # no resize: the centre 4 x 4 exactly
    assert out.shape == (3, 4, 4) and out.dtype == torch.uint8
    assert torch.equal(out, torch.from_numpy(np.array(img)[2:6, 2:6]).permute(2, 0, 1))
    # one resize of the box == resize the whole image, then crop (pixel for pixel)
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8))
    two_step = img.resize((int(16 * 37 / 23), 16), Image.Resampling.BILINEAR)  # 25 x 16
    two_step = two_step.crop((6, 2, 18, 14))  # left round((25-12)/2) = 6, top 2
    assert torch.equal(eval_transform(img, 16, 12), torch.from_numpy(np.array(two_step)).permute(2, 0, 1))


def test_train_transform_crops_the_drawn_box_and_flips():
    img = _gradient(8, 8)
    arr = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    flips = set()
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        left, top, w, h = random_resized_crop_box(8, 8, (0.25, 0.25), (1.0, 1.0), g)
        flipped = float(torch.rand(1, generator=g)) < 0.5  # the next draw is the flip
        crop = arr[:, top:top + 4, left:left + 4]  # a 4 x 4 box to 4 x 4: exact pixels
        out = train_transform(img, 4, (0.25, 0.25), True, torch.Generator().manual_seed(seed), ratio=(1.0, 1.0))
        assert torch.equal(out, crop.flip(-1) if flipped else crop)
        no_flip = train_transform(img, 4, (0.25, 0.25), False, torch.Generator().manual_seed(seed), ratio=(1.0, 1.0))
        assert torch.equal(no_flip, crop)
        flips.add(flipped)
    assert flips == {True, False}


def test_normalize_hand_values():
    x = torch.zeros(1, 3, 1, 2, dtype=torch.uint8)
    x[0, :, 0, 1] = 255
    out = normalize(x)
    assert out.dtype == torch.float32
    assert out[0, :, 0, 0].tolist() == pytest.approx([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], rel=1e-6)
    assert out[0, :, 0, 1].tolist() == pytest.approx([0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225], rel=1e-6)


# --------------------------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("tiny") / "inet", n_train=4, n_val=3)


def _train(tiny, workers, batch=4, seed=3):
    split = scan_image_folder(tiny / "train")
    dataset = ImageDataset(split, split.labels, TrainTransform(8, (0.3, 1.0), True, seed))
    return ImageNetBatches(dataset, batch, seed, workers)


def test_batches_do_not_depend_on_workers_or_processes(tiny):
    single, pooled = _train(tiny, 0), _train(tiny, 2)
    assert single.steps_per_epoch == 3  # 12 images, batches of 4
    try:
        for epoch, i in [(0, 0), (0, 1), (0, 2), (1, 0)]:
            x, y = single.batch(epoch, i)
            assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
            x2, y2 = pooled.batch(epoch, i)
            assert torch.equal(x, x2) and torch.equal(y, y2)
        assert pooled._prefetch.restarts == 1  # consecutive steps (across the epoch) from one loader
        x, y = single.batch(0, 1)
        shares = [single.batch(0, 1, rank, 2) for rank in (0, 1)]
        assert torch.equal(torch.stack([shares[0][0], shares[1][0]], 1).flatten(0, 1), x)
        assert torch.equal(torch.stack([shares[0][1], shares[1][1]], 1).flatten(0, 1), y)
        with pytest.raises(ValueError, match=r"batch_size=4 is not divisible by world=3"):
            single.batch(0, 0, 0, 3)
        with pytest.raises(ValueError, match=r"^i must be an integer in \[0, 2\], got i=3"):
            single.batch(0, 3)
    finally:
        pooled.close()


def test_an_epoch_is_a_permutation_and_epochs_differ(tiny):
    b = _train(tiny, 0, batch=4)
    labels = [torch.cat([b.batch(e, i)[1] for i in range(3)]) for e in (0, 1)]
    assert sorted(labels[0].tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    assert not torch.equal(labels[0], labels[1])
    resumed = _train(tiny, 0, batch=4).batch(1, 2)  # a resumed run starts mid-epoch
    # an image's draws change with the epoch (seeded by (seed, epoch, index)), not only its batch
    ds = b.dataset
    assert not torch.equal(ds[(0, 5)][0], ds[(1, 5)][0]) and torch.equal(ds[(1, 5)][0], ds[(1, 5)][0])
    assert torch.equal(resumed[0], b.batch(1, 2)[0])


def test_eval_batches_from_workers_follow_the_stride(tiny):
    split = scan_image_folder(tiny / "val")
    ds = ImageDataset(split, split.labels, EvalTransform(9, 8))
    whole = torch.stack([normalize(ds[i][0][None])[0] for i in range(9)])
    ev = ImageNetEval(ds, workers=2)
    try:
        for start in (2, 6):  # process 1 of 2, batches of 2: batches 1, 3 -> items 2..3, 6..7
            x, y = ev.batch(start, start + 2)
            assert torch.equal(x, whole[start:start + 2])
            assert y.tolist() == split.labels[start:start + 2].tolist()
        assert torch.equal(ev.batch(0, 9)[0], whole)  # another request: a restart, the right items
        assert ev._prefetch.restarts == 3
    finally:
        ev.close()


def test_eval_batches_prefetch_along_a_stride(tiny):
    split = scan_image_folder(tiny / "val")
    ds = ImageDataset(split, split.labels, EvalTransform(9, 8))
    whole = torch.stack([normalize(ds[i][0][None])[0] for i in range(9)])
    ev = ImageNetEval(ds, workers=0)
    for start in (0, 4, 8):  # process 0 of 2, batches of 2: 0, 2, 4 -> items 0, 4, 8
        x, y = ev.batch(start, min(start + 2, 9))
        assert torch.equal(x, whole[start:start + 2])
        assert torch.equal(ev.batch(start, min(start + 2, 9))[0], x)  # asked twice: no restart (below)
    assert ev._prefetch.restarts == 2  # the first call, then the stride learnt from the second
    with pytest.raises(ValueError, match=r"^stop must be an integer in \[3, 9\], got stop=10"):
        ev.batch(2, 10)


def test_preload_serves_the_same_interface_from_memory(tiny):
    split = scan_image_folder(tiny / "train")
    images = preload_images(split, 12, workers=0)
    assert images.shape == (12, 3, 12, 12) and images.dtype == torch.uint8
    # image 1 is 21 x 16: short side 16 -> 12, long int(12 * 21 / 16) = 15, centre 12 x 12
    with Image.open(split.path(1)) as im:
        ref = eval_transform(im.convert("RGB"), 12, 12)
    assert (images[1].int() - ref.int()).abs().max() <= 8  # draft decoding differs a little
    assert torch.equal(ImageDataset(images, split.labels, EvalTransform(12, 12))[3][0], images[3])  # served as stored
    b = ImageNetBatches(ImageDataset(images, split.labels, TrainTransform(8, (0.5, 1.0), True, 0)), 4, 0, 0)
    x, y = b.batch(0, 0)
    assert x.shape == (4, 3, 8, 8)
    data = load_imagenet(_cfg(tiny, preload=True, preload_size=12, train_size=10, eval_resize=12, eval_size=10))
    assert data.train_images.shape == (12, 3, 12, 12) and data.val_images.shape == (9, 3, 12, 12)
    assert data.train_batches(6).batch(0, 1)[0].shape == (6, 3, 10, 10)
    assert data.eval_batches().batch(0, 9)[0].shape == (9, 3, 10, 10)


def test_throughput_measures_and_the_cli_prints_it(tiny, capsys):
    r = measure_throughput(tiny, workers=0, size=8, images=16, batch_size=4)
    assert r["images"] == 16 and r["images_per_s"] > 0 and r["per_core"] == r["images_per_s"]
    assert main(["throughput", "--root", str(tiny), "--workers", "1", "--size", "8", "--images", "8",
                 "--batch", "4", "--mode", "preload"]) == 0
    assert "images/s per worker" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        main(["throughput", "--root", str(tiny), "--workers", "-2"])
    assert err.value.code == 2 and "workers must be an integer in [0, 256], got workers=-2" in capsys.readouterr().err


# --------------------------------------------------------------------------------- MAT-files


# synsets written by scipy.io.savemat (1.17, do_compression=True), an independent writer:
# ILSVRC2012_ID 1, 2, 3; WNID n01440764, n01443537, n00001740; words; num_children 0, 0, 2.
SCIPY_META = (
    "TUFUTEFCIDUuMCBNQVQtZmlsZSBQbGF0Zm9ybTogcG9zaXgsIENyZWF0ZWQgb246IFRodSBEZWMgIDMgMTU6MTA6MDYgMjAyNgAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABSU0PAAAA9QAAAHic42NgYNjBzMDABqQ5gJiJAQJYoXygFAMjFLMDcXFl"
    "XnFqSTFQnoWBDypuAcSePsFhQc5GBoZG8Z4uDOF+QAIOyvOLUorhvLzS3PjkjMyclKLUPAawGSD9MPvZ0OxnRMIgwAkVh4AP9iD9Dkj6WbDo50TS"
    "LwDl5xkYmpgYmJuZQMVB5ngQMEcIzRwQvyQ1LzlDRyEkMy85UaEERCLMI99fFOt3oChcjE2NzZHcEUDAHGk0c0D89PyclLTMYmDQOCcWJRYXZ5YW"
    "KySWFiWWlBYPgvDhoCB8gMDQ3MQAhzuwmcOGZg6In5pXkllSSXk8AwDJMjJL")


def test_reads_a_meta_mat_written_by_scipy():
    synsets = read_mat(base64.b64decode(SCIPY_META))["synsets"]
    assert [(float(s["ILSVRC2012_ID"][0, 0]), s["WNID"], s["words"], float(s["num_children"][0, 0]))
            for s in synsets] == [(1.0, "n01440764", "tench, Tinca tinca", 0.0),
                                  (2.0, "n01443537", "goldfish, Carassius auratus", 0.0),
                                  (3.0, "n00001740", "entity", 2.0)]


def _el(mtype: int, data: bytes, small: bool = True) -> bytes:
    """A MAT v5 element, "small" (4-byte tag) when it fits, as MATLAB writes it."""
    if small and len(data) <= 4:
        return struct.pack("<HH", mtype, len(data)) + data.ljust(4, b"\0")
    return struct.pack("<II", mtype, len(data)) + data + b"\0" * (-len(data) % 8)


def _mx(cls: int, dims: tuple, body: bytes, name: bytes = b"") -> bytes:
    head = _el(6, struct.pack("<II", cls, 0)) + _el(5, struct.pack(f"<{len(dims)}i", *dims)) + _el(1, name)
    return _el(14, head + body, small=False)


def _matlab_meta(rows: list[tuple[int, str, str]]) -> bytes:
    """A meta.mat as MATLAB writes one: the variable zlib-compressed, whole doubles stored as
    uint8, wnids as uint16 code units, words as UTF-8, short fields in small elements."""
    names = [b"ILSVRC2012_ID", b"WNID", b"words"]
    body = _el(5, struct.pack("<i", 32)) + _el(1, b"".join(n.ljust(32, b"\0") for n in names))
    for ident, wnid, words in rows:
        body += _mx(6, (1, 1), _el(2, bytes([ident])))  # class double, stored as miUINT8
        body += _mx(4, (1, len(wnid)), _el(4, struct.pack(f"<{len(wnid)}H", *map(ord, wnid))))
        body += _mx(4, (1, len(words)), _el(16, words.encode()))
    header = b"MATLAB 5.0 MAT-file, Platform: GLNXA64".ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    out = header
    for var in (_mx(2, (len(rows), 1), body, b"synsets"), _mx(4, (1, 3), _el(16, b"1.0"), b"version")):
        packed = zlib.compress(var)
        out += struct.pack("<II", 15, len(packed)) + packed  # compressed elements are not padded
    return out


def test_reads_matlab_style_compressed_small_elements():
    raw = _matlab_meta([(1, "n01440764", "tench"), (2, "n01443537", "goldfish")])
    synsets = read_mat(raw)["synsets"]
    assert [(s["ILSVRC2012_ID"].tolist(), s["WNID"], s["words"]) for s in synsets] == [
        ([[1.0]], "n01440764", "tench"), ([[2.0]], "n01443537", "goldfish")]
    assert synsets[0]["ILSVRC2012_ID"].dtype == np.float64
    assert read_mat(raw)["version"] == "1.0"  # read after an unpadded compressed element


def test_mat_reader_refuses_other_formats(tmp_path):
    with pytest.raises(ValueError, match=r"not a MATLAB v5 MAT-file \(it starts 'MATLAB 7.3 MAT-file"):
        read_mat(b"MATLAB 7.3 MAT-file, HDF5".ljust(128, b" "))
    path = tmp_path / "x.mat"
    path.write_bytes(b"\x89HDF")
    with pytest.raises(ValueError, match=rf"{path} is not a MATLAB v5 MAT-file"):
        read_mat(path)


# --------------------------------------------------------------------------------- prepare


def _tar(path: Path, members: dict[str, bytes], mode: str = "w") -> str:
    with tarfile.open(path, mode) as tf:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return hashlib.md5(path.read_bytes()).hexdigest()


def _archives(tmp: Path, gt_lines: int | None = None) -> tuple[dict[str, Path], dict[str, str], dict]:
    """Tiny archives in the official format: 2 classes x 2 train JPEGs, 4 validation JPEGs."""
    tmp.mkdir(parents=True, exist_ok=True)
    wnids = {1: "n01443537", 2: "n01440764"}  # ILSVRC2012_ID order is not sorted wnid order
    imgs = {}
    inner = {}
    for k, wnid in enumerate(wnids.values()):
        files = {f"{wnid}_{j}.JPEG": _jpeg(tmp / "src" / f"{wnid}_{j}.JPEG", seed=10 * k + j) for j in range(2)}
        imgs.update(files)
        buf = tmp / f"{wnid}.tar"
        _tar(buf, files)
        inner[f"{wnid}.tar"] = buf.read_bytes()
    paths = {"train": tmp / "ILSVRC2012_img_train.tar", "val": tmp / "ILSVRC2012_img_val.tar",
             "devkit": tmp / "ILSVRC2012_devkit_t12.tar.gz"}
    md5 = {"train": _tar(paths["train"], inner)}
    gt = [2, 1, 1, 2]
    val = {f"ILSVRC2012_val_{n:08d}.JPEG": _jpeg(tmp / "src" / f"v{n}.JPEG", seed=50 + n) for n in range(1, 5)}
    md5["val"] = _tar(paths["val"], val)
    lines = gt[:gt_lines] if gt_lines is not None else gt
    md5["devkit"] = _tar(paths["devkit"], {
        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": "".join(f"{g}\n" for g in lines).encode(),
        "ILSVRC2012_devkit_t12/data/meta.mat": _matlab_meta([(1, wnids[1], "goldfish, Carassius auratus"),
                                                             (2, wnids[2], "tench, Tinca tinca")]),
    }, "w:gz")
    return paths, md5, {"train": imgs, "val": val, "gt": gt, "wnids": wnids}


def test_prepare_builds_the_layout_from_official_format_archives(tmp_path):
    paths, md5, src = _archives(tmp_path / "arch")
    out = prepare_imagenet(paths["train"], paths["val"], paths["devkit"], tmp_path / "imagenet", md5=md5)
    assert out == tmp_path / "imagenet" and sorted(p.name for p in tmp_path.iterdir()) == ["arch", "imagenet"]
    assert (out / "train" / "n01440764" / "n01440764_1.JPEG").read_bytes() == src["train"]["n01440764_1.JPEG"]
    # validation image 1 is ILSVRC2012_ID 2 = n01440764; image 2 is ID 1 = n01443537
    assert (out / "val" / "n01440764" / "ILSVRC2012_val_00000001.JPEG").read_bytes() == \
        src["val"]["ILSVRC2012_val_00000001.JPEG"]
    assert sorted(p.name for p in (out / "val" / "n01443537").iterdir()) == [
        "ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000003.JPEG"]
    assert (out / "classes.tsv").read_text().splitlines() == [
        "wnid\timagenet1k_index\tname\tn_train\tn_val",
        "n01440764\t0\ttench, Tinca tinca\t2\t2", "n01443537\t1\tgoldfish, Carassius auratus\t2\t2"]
    data = load_imagenet(ImageNetDataConfig(root=str(tmp_path), folder="imagenet", workers=0))
    assert data.class_names == ("tench, Tinca tinca", "goldfish, Carassius auratus") and len(data.val) == 4
    with pytest.raises(ValueError, match=r"imagenet already exists"):
        prepare_imagenet(paths["train"], paths["val"], paths["devkit"], out, md5=md5)


def test_prepare_checks_the_published_checksums_by_default(tmp_path, capsys):
    paths, md5, _ = _archives(tmp_path / "arch")
    assert ILSVRC_MD5 == {"train": "1d675b47d978889d74fa0da5fadfb00e", "val": "29b22e2961454d5413ddabcf34fc5622",
                          "devkit": "fa75699e90414af021442c21a62c3abf"}
    with pytest.raises(SystemExit) as err:
        main(["prepare", "--train-tar", str(paths["train"]), "--val-tar", str(paths["val"]),
              "--devkit", str(paths["devkit"]), "--out", str(tmp_path / "imagenet")])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert f"{paths['devkit']}: md5 {md5['devkit']}, expected fa75699e90414af021442c21a62c3abf" in msg
    # the train tar is hashed as it streams: a mismatch there removes what was extracted
    bad = dict(md5, train="0" * 32)
    with pytest.raises(ValueError, match=rf"{paths['train']}: md5 {md5['train']}, expected 0{{32}}"):
        prepare_imagenet(paths["train"], paths["val"], paths["devkit"], tmp_path / "imagenet", md5=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arch"]


def test_prepare_refuses_malformed_archives_and_leaves_nothing(tmp_path):
    paths, md5, _ = _archives(tmp_path / "arch", gt_lines=3)  # the 4th image has no label
    with pytest.raises(ValueError, match=r"ILSVRC2012_val_00000004.JPEG has no line in the ground truth \(3 lines\)"):
        prepare_imagenet(paths["train"], paths["val"], paths["devkit"], tmp_path / "imagenet", md5=md5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arch"]
    swapped = dict(md5, train=md5["val"], val=md5["train"])
    with pytest.raises(ValueError, match=r"member 'ILSVRC2012_val_00000001.JPEG' is not a class tar"):
        prepare_imagenet(paths["val"], paths["train"], paths["devkit"], tmp_path / "imagenet", md5=swapped)
    with pytest.raises(ValueError, match=r"no val archive at .*nowhere.tar"):
        prepare_imagenet(paths["train"], tmp_path / "nowhere.tar", paths["devkit"], tmp_path / "imagenet", md5=md5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arch"]


def test_a_killed_prepare_leaves_no_tree_and_the_next_one_clears_it(tmp_path):
    paths, md5, _ = _archives(tmp_path / "arch")
    out = tmp_path / "imagenet"
    script = (
        "import json, shutil, sys, time\n"
        "import deqlib.data.imagenet as m\n"
        "copy = shutil.copyfileobj\n"
        "def slow(*a, **k):\n"
        "    copy(*a, **k)\n"
        "    time.sleep(600)\n"  # hold the first image written, to be killed there
        "shutil.copyfileobj = slow\n"
        "p = json.loads(sys.argv[1])\n"
        "m.prepare_imagenet(p['train'], p['val'], p['devkit'], p['out'], md5=p['md5'])\n")
    arg = json.dumps({**{k: str(v) for k, v in paths.items()}, "out": str(out), "md5": md5})
    proc = subprocess.Popen([sys.executable, "-c", script, arg], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    partial = tmp_path / f"imagenet.partial-{proc.pid}"
    try:
        deadline = time.monotonic() + 120
        while not list(partial.glob("train/*/*.JPEG")):
            assert proc.poll() is None and time.monotonic() < deadline, "prepare ended or never wrote"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    assert partial.is_dir() and not out.exists()  # what a kill leaves: nothing that looks complete
    prepare_imagenet(paths["train"], paths["val"], paths["devkit"], out, md5=md5)
    assert not partial.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["arch", "imagenet"]


# --------------------------------------------------------------------------------- the slice


def test_reads_the_shared_slice_as_it_is():
    skip_without_slice(SLICE)
    data = load_imagenet(ImageNetDataConfig(root=SLICE.rsplit("/", 1)[0], folder="imagenette-slice",
                                            workers=0), base=ROOT)
    assert len(data.train) == 2500 and len(data.val) == 500 and len(data.classes) == 10
    assert data.classes[0] == "n01440764" and data.class_names[0] == "tench"
    assert data.class_names[-1] == "parachute" and data.train.labels.tolist().count(9) == 250
    x, y = data.train_batches(8, seed=0).batch(0, 0)
    assert x.shape == (8, 3, 224, 224) and torch.isfinite(x).all()
    xe, ye = data.eval_batches().batch(0, 4)
    assert xe.shape == (4, 3, 224, 224) and ye.tolist() == [0, 0, 0, 0]
    small = load_imagenet(ImageNetDataConfig(root=SLICE.rsplit("/", 1)[0], folder="imagenette-slice", workers=0,
                                             max_per_class=3, preload=True, preload_size=64, train_size=56,
                                             eval_resize=64, eval_size=56), base=ROOT)
    assert small.train_images.shape == (30, 3, 64, 64)
    assert small.train_batches(10).batch(0, 2)[0].shape == (10, 3, 56, 56)
