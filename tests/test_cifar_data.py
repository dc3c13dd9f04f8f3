"""deqlib.data.cifar: the shared slice, the download path on a fake archive, augmentation."""

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from deqlib.data.cifar import (
    CIFAR_FOLDER,
    CifarTransform,
    load_cifar10,
    normalize,
    random_crop_flip,
)
from deqlib.data.download import DownloadError
from conftest import ROOT, skip_without_slice

SLICE = "../shared/data/cifar-10-subset"  # as params.yaml says it, relative to the repository


def test_reads_the_shared_slice_through_the_configured_root():
    skip_without_slice(SLICE)
    data = load_cifar10(SLICE, base=ROOT, download_missing=False)
    assert data.train_x.shape == (5085, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (1017, 3, 32, 32)
    assert data.train_y.shape == (5085,) and data.test_y.shape == (1017,)
    assert set(data.train_y.tolist()) == set(range(10)) == set(data.test_y.tolist())
    assert data.classes[0] == "airplane" and len(data.classes) == 10
    # the first test image is the official one (a cat): channel planes, not interleaved pixels
    assert int(data.test_y[0]) == 3


def _fake_archive(tmp_path: Path, n_per_batch: int = 3) -> tuple[Path, str, np.ndarray]:
    """A tar.gz in the CIFAR python layout with tiny batches; returns (path, md5, test images)."""
    rng = np.random.default_rng(0)
    members = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        members[name] = pickle.dumps({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                                      b"filenames": [b"x.png"] * n_per_batch}, protocol=2)
    members["batches.meta"] = pickle.dumps({b"num_cases_per_batch": 10000, b"num_vis": 3072,
                                            b"label_names": [f"c{i}".encode() for i in range(10)]}, protocol=2)
    (tmp_path / "src").mkdir()
    archive = tmp_path / "src" / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"{CIFAR_FOLDER}/{name}")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    test = pickle.loads(members["test_batch"], encoding="bytes")[b"data"]
    return archive, hashlib.md5(archive.read_bytes()).hexdigest(), test


def test_download_extracts_and_reads_a_fake_archive(tmp_path):
    archive, md5, test = _fake_archive(tmp_path)
    root = tmp_path / "data"
    data = load_cifar10(root, url=archive.as_uri(), md5=md5)
    assert data.train_x.shape == (15, 3, 32, 32) and data.test_x.shape == (3, 3, 32, 32)
    assert torch.equal(data.test_x, torch.from_numpy(test).view(3, 3, 32, 32))
    assert (root / CIFAR_FOLDER).is_dir()
    # a second load reads the folder and fetches nothing
    again = load_cifar10(root, url="file:///nonexistent", md5=md5)
    assert torch.equal(again.train_x, data.train_x)


def test_checksum_mismatch_is_an_error_and_leaves_no_data(tmp_path):
    archive, _, _ = _fake_archive(tmp_path)
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        load_cifar10(root, url=archive.as_uri(), md5="0" * 32)
    assert not (root / CIFAR_FOLDER).exists()
    assert not any(root.iterdir())


def test_offline_error_names_the_url(tmp_path):
    with pytest.raises(DownloadError, match="could not download file:///no/such/cifar.tar.gz"):
        load_cifar10(tmp_path, url="file:///no/such/cifar.tar.gz")
    with pytest.raises(FileNotFoundError, match="download is off"):
        load_cifar10(tmp_path, download_missing=False)


def test_random_crop_flip_is_deterministic_given_a_generator():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a = random_crop_flip(x, torch.Generator().manual_seed(5))
    b = random_crop_flip(x, torch.Generator().manual_seed(5))
    c = random_crop_flip(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)


def _shift(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``img`` moved by (dy, dx) with zeros entering: out[i, j] = img[i + dy, j + dx]."""
    H, W = img.shape[-2:]
    out = torch.zeros_like(img)
    ys, yd = (slice(dy, H), slice(0, H - dy)) if dy >= 0 else (slice(0, H + dy), slice(-dy, H))
    xs, xd = (slice(dx, W), slice(0, W - dx)) if dx >= 0 else (slice(0, W + dx), slice(-dx, W))
    out[..., yd, xd] = img[..., ys, xs]
    return out


def test_each_augmented_image_is_a_shift_by_at_most_4_possibly_flipped():
    torch.manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)  # no zeros: padding is visible
    out = random_crop_flip(x, torch.Generator().manual_seed(1), pad=4)
    flips = 0
    for img, aug in zip(x, out):
        matches = [(dy, dx, flip) for flip in (False, True) for dy in range(-4, 5) for dx in range(-4, 5)
                   if torch.equal(aug, _shift(img.flip(-1) if flip else img, dy, dx))]
        assert len(matches) == 1, matches
        flips += matches[0][2]
    assert 16 < flips < 48  # about half are flipped


def test_pad_zero_only_flips():
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), pad=0)
    for img, aug in zip(x, out):
        assert torch.equal(aug, img) or torch.equal(aug, img.flip(-1))


def test_transform_normalizes_and_augments_only_when_asked():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(8)
    plain, y_out = CifarTransform(augment=False)((x, y), torch.Generator().manual_seed(0))
    assert plain.dtype == torch.float32 and torch.equal(y_out, y)
    torch.testing.assert_close(plain, normalize(x))
    aug, _ = CifarTransform(augment=True)((x, y), torch.Generator().manual_seed(0))
    torch.testing.assert_close(aug, normalize(random_crop_flip(x, torch.Generator().manual_seed(0))))


def test_loader_refuses_pickles_that_are_not_arrays(tmp_path):
    folder = tmp_path / CIFAR_FOLDER
    folder.mkdir()
    evil = pickle.dumps({"labels": [0], "data": print}, protocol=2)  # a global outside numpy
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(evil)
    with pytest.raises(ValueError, match=r"data_batch_1 is not a CIFAR-10 python pickle .*refusing to load .*print"):
        load_cifar10(tmp_path, download_missing=False)


def _good_batch(n=2, **change):
    """A batch pickle as the official files hold it (bytes keys); ``change`` replaces or, with
    None, drops an entry."""
    d = {"labels": [1] * n, "data": np.zeros((n, 3072), dtype=np.uint8), **change}
    return pickle.dumps({k.encode(): v for k, v in d.items() if v is not None}, protocol=2)


@pytest.mark.parametrize("blob, message", [
    (_good_batch()[:40], r"data_batch_3 is not a CIFAR-10 python pickle \(EOFError|UnpicklingError"),
    (_good_batch(labels=None), r"data_batch_3 has no \['labels'\]"),
    (_good_batch(data=np.full((2, 3072), 300, dtype=np.int64)), r"data_batch_3: pixel data is torch.int64"),
    (_good_batch(data=np.full((2, 3072), 0.5)), r"data_batch_3: pixel data is torch.float64"),
    (pickle.dumps([1, 2], protocol=2), r"data_batch_3 holds a list"),
    (_good_batch(data=np.zeros((2, 3072), dtype=object)), r"data_batch_3: pixel data is an array of object"),
    (_good_batch(labels=["cat", "dog"]), r"data_batch_3: labels must be integers, got 'cat' \(str\) at 0"),
    (_good_batch(labels=[b"\x01", b"\x02"]), r"data_batch_3: labels must be integers, got b'\\x01' \(bytes\)"),
    (_good_batch(labels=[1, 2.5]), r"data_batch_3: labels must be integers, got 2.5 \(float\) at 1"),
    (_good_batch(labels=[True, False]), r"data_batch_3: labels must be integers, got True \(bool\)"),
], ids=["truncated", "no_labels", "int64_pixels", "float_pixels", "not_a_dict", "object_pixels",
        "str_labels", "bytes_labels", "float_labels", "bool_labels"])
def test_a_bad_batch_file_is_named(tmp_path, blob, message):
    """Not a raw KeyError, EOFError or TypeError, and no silent cast (300 wrapped to 44, 0.5
    floored; a label 2.5 truncated to 2, True read as 1, a bytes label b'\\x01' as a row [1])."""
    folder = tmp_path / CIFAR_FOLDER
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(_good_batch())
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c"] * 10}, protocol=2))
    assert load_cifar10(tmp_path, download_missing=False).train_x.shape == (10, 3, 32, 32)
    (folder / "data_batch_3").write_bytes(blob)
    with pytest.raises(ValueError, match=message):
        load_cifar10(tmp_path, download_missing=False)
    (folder / "data_batch_3").write_bytes(_good_batch())
    (folder / "batches.meta").write_bytes(pickle.dumps({b"classes": []}, protocol=2))
    with pytest.raises(ValueError, match=r"batches.meta has no \['label_names'\]"):
        load_cifar10(tmp_path, download_missing=False)
