"""``prepare``: the official ILSVRC-2012 archives -> the ImageFolder layout of
:mod:`deqlib.data.imagenet` (``python -m deqlib.data.imagenet prepare ...``).

The archives are downloaded by hand from https://image-net.org/ (an account is needed; nothing
here downloads them). The devkit's ``meta.mat`` is read by :mod:`deqlib.data.matv5`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np

from ..download import file_digest
from ..matv5 import read_mat

__all__ = ["ILSVRC_MD5", "CLASSES_FILE", "PREPARE_COMMAND", "prepare_imagenet"]

# MD5s of the official ILSVRC-2012 archives, as published with the download links on
# image-net.org (and in torchvision.datasets.imagenet.ARCHIVE_META).
ILSVRC_MD5 = {
    "train": "1d675b47d978889d74fa0da5fadfb00e",  # ILSVRC2012_img_train.tar
    "val": "29b22e2961454d5413ddabcf34fc5622",  # ILSVRC2012_img_val.tar
    "devkit": "fa75699e90414af021442c21a62c3abf",  # ILSVRC2012_devkit_t12.tar.gz
}
CLASSES_FILE = "classes.tsv"
PREPARE_COMMAND = ("python -m deqlib.data.imagenet prepare --train-tar ILSVRC2012_img_train.tar "
                   "--val-tar ILSVRC2012_img_val.tar --devkit ILSVRC2012_devkit_t12.tar.gz --out {out}")


_TRAIN_MEMBER = re.compile(r"n\d{8}\.tar")
_VAL_MEMBER = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")
_GT_NAME = "data/ILSVRC2012_validation_ground_truth.txt"
_META_NAME = "data/meta.mat"


class _HashingReader:
    """A file read front to back, hashed on the way: the big archives are checksummed while
    they are extracted, in one pass over their 150 GB instead of two."""

    def __init__(self, fh: io.BufferedReader, algorithm: str = "md5"):
        self.fh, self.hash = fh, hashlib.new(algorithm)

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.hash.update(data)
        return data

    def hexdigest(self) -> str:
        while self.read(1 << 20):  # the tail after the tar's end-of-archive blocks counts too
            pass
        return self.hash.hexdigest()


def _member_name(archive: Path, member: tarfile.TarInfo) -> str:
    """A regular file's plain name (no folder, not hidden); ValueError naming it otherwise."""
    name = member.name
    if not member.isfile() or "/" in name or "\\" in name or name.startswith(".") or not name:
        raise ValueError(f"{archive}: unexpected member {name!r} (expected plain image files)")
    return name


def _read_devkit(devkit: Path) -> tuple[dict[int, tuple[str, str]], list[int]]:
    """``({ILSVRC2012_ID: (wnid, words)}, validation ground truth ids in image order)``."""
    try:
        with tarfile.open(devkit) as tf:
            found = {suffix: m for m in tf.getmembers() for suffix in (_GT_NAME, _META_NAME)
                     if m.isfile() and m.name.endswith(suffix)}
            missing = [s for s in (_GT_NAME, _META_NAME) if s not in found]
            if missing:
                raise ValueError(f"{devkit} holds no {missing} (expected ILSVRC2012_devkit_t12/{_GT_NAME} "
                                 f"and .../{_META_NAME})")
            gt_text = tf.extractfile(found[_GT_NAME]).read().decode("ascii")
            meta_bytes = tf.extractfile(found[_META_NAME]).read()
    except (tarfile.TarError, OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{devkit} is not a readable devkit tar.gz ({type(err).__name__}: {err})") from err
    meta = read_mat(meta_bytes, where=f"{devkit}:{found[_META_NAME].name}")
    synsets = meta.get("synsets")
    if not isinstance(synsets, list) or not synsets or not all(
            isinstance(s, dict) and "ILSVRC2012_ID" in s and "WNID" in s for s in synsets):
        raise ValueError(f"{devkit}:{found[_META_NAME].name} has no struct array 'synsets' with fields "
                         "ILSVRC2012_ID and WNID")
    mapping = {}
    for s in synsets:
        ids = np.asarray(s["ILSVRC2012_ID"]).ravel()
        if ids.size != 1 or not isinstance(s["WNID"], str):
            raise ValueError(f"{devkit}: a synset with ILSVRC2012_ID={ids.tolist()} WNID={s['WNID']!r}")
        words = s.get("words")
        mapping[int(ids[0])] = (s["WNID"], words if isinstance(words, str) and words else s["WNID"])
    gt = []
    for n, line in enumerate(gt_text.split(), start=1):
        if not line.isdigit() or int(line) not in mapping:
            raise ValueError(f"{devkit}:{found[_GT_NAME].name} line {n}: {line!r} is no ILSVRC2012_ID of meta.mat")
        gt.append(int(line))
    return mapping, gt


def _check_md5(path: Path, got: str, expected: str) -> None:
    if got != expected:
        raise ValueError(f"{path}: md5 {got}, expected {expected} (the published checksum): a damaged "
                         "or different file; download it again")


def _remove_dead_partials(out: Path) -> None:
    """Delete ``out.partial-<pid>`` folders whose process is gone (what a killed prepare left);
    one of a live process (a prepare running beside this one) is kept."""
    for part in out.parent.glob(f"{out.name}.partial-*"):
        pid = part.name.rsplit("-", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(part, ignore_errors=True)
        except (PermissionError, OverflowError):
            pass  # alive under another user, or not a pid


def prepare_imagenet(train_tar: str | os.PathLike, val_tar: str | os.PathLike, devkit: str | os.PathLike,
                     out: str | os.PathLike, md5: dict[str, str] | None = None) -> Path:
    """Make the ImageFolder layout at ``out`` from the official ILSVRC-2012 archives.

    ``train_tar`` holds one tar per class (``n01440764.tar`` ...) of JPEGs; ``val_tar`` the
    flat ``ILSVRC2012_val_00000001.JPEG`` ...; ``devkit`` (tar.gz) the validation ground truth
    (one ILSVRC2012_ID per line, in image order) and ``meta.mat`` (ILSVRC2012_ID -> WNID, read
    by :mod:`deqlib.data.matv5`). Writes ``out/train/<wnid>/``, ``out/val/<wnid>/`` and
    ``out/classes.tsv`` (wnid, ImageNet-1k index, name from meta.mat's ``words``, counts).

    Everything is built in ``out.partial-<pid>`` and renamed onto ``out`` at the end, so a
    killed run leaves no ``out``; the next run deletes partial folders of dead processes. The
    devkit's MD5 is checked first; the big tars are hashed while they stream (one read each)
    and the tree is renamed only when both match.

    Args:
        md5: ``{"train", "val", "devkit"}`` checksums (default :data:`ILSVRC_MD5`; tests pass
            their tiny archives').
    Raises:
        ValueError: naming the file: a missing archive, ``out`` already there, a checksum
            mismatch, an archive not in the official format, validation images without a
            ground-truth line (or lines without an image), val and train classes differing.
    """
    paths = {"train": Path(train_tar), "val": Path(val_tar), "devkit": Path(devkit)}
    md5 = dict(ILSVRC_MD5 if md5 is None else md5)
    if sorted(md5) != sorted(paths):
        raise ValueError(f"md5 must have the keys {sorted(paths)}, got md5={md5!r}")
    for kind, path in paths.items():
        if not path.is_file():
            raise ValueError(f"no {kind} archive at {path} (the official ILSVRC-2012 archives are "
                             "downloaded from https://image-net.org/ with an account)")
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; remove it to prepare again")
    if not out.parent.is_dir():
        raise ValueError(f"the folder of --out {out} does not exist")
    _remove_dead_partials(out)
    _check_md5(paths["devkit"], file_digest(paths["devkit"], "md5"), md5["devkit"])
    mapping, gt = _read_devkit(paths["devkit"])
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        counts = _extract_train(paths["train"], tmp / "train", md5["train"])
        val_counts = _extract_val(paths["val"], tmp / "val", md5["val"], mapping, gt)
        if set(val_counts) != set(counts):
            only_t = sorted(set(counts) - set(val_counts))
            only_v = sorted(set(val_counts) - set(counts))
            raise ValueError(f"{paths['val']}: validation classes differ from {paths['train']}'s: only in "
                             f"train {only_t[:10]} ({len(only_t)}), only in val {only_v[:10]} ({len(only_v)})")
        names = {wnid: words for wnid, words in mapping.values()}
        with open(tmp / CLASSES_FILE, "w", encoding="utf-8") as fh:
            fh.write("wnid\timagenet1k_index\tname\tn_train\tn_val\n")
            for index, wnid in enumerate(sorted(counts)):
                fh.write(f"{wnid}\t{index}\t{names.get(wnid, wnid)}\t{counts[wnid]}\t{val_counts[wnid]}\n")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _extract_train(archive: Path, dest: Path, expected_md5: str) -> dict[str, int]:
    """``archive`` (a tar of per-class tars) -> ``dest/<wnid>/``; returns images per class."""
    counts: dict[str, int] = {}
    dest.mkdir(parents=True)
    try:
        with open(archive, "rb") as raw:
            reader = _HashingReader(raw)
            with tarfile.open(fileobj=reader, mode="r|") as outer:
                for member in outer:
                    name = _member_name(archive, member)
                    if not _TRAIN_MEMBER.fullmatch(name):
                        raise ValueError(f"{archive}: member {name!r} is not a class tar n########.tar "
                                         "(is this ILSVRC2012_img_train.tar?)")
                    wnid = name[:-4]
                    if wnid in counts:
                        raise ValueError(f"{archive}: {name} appears twice")
                    (dest / wnid).mkdir()
                    with tarfile.open(fileobj=outer.extractfile(member), mode="r|") as inner:
                        for m in inner:
                            _copy_member(inner, m, dest / wnid / _member_name(archive / name, m))
                    counts[wnid] = sum(1 for _ in (dest / wnid).iterdir())
                    if not counts[wnid]:
                        raise ValueError(f"{archive}: {name} holds no images")
            _check_md5(archive, reader.hexdigest(), expected_md5)
    except tarfile.TarError as err:
        raise ValueError(f"{archive} is not a readable tar ({type(err).__name__}: {err})") from err
    if not counts:
        raise ValueError(f"{archive} holds no class tars")
    return counts


def _extract_val(archive: Path, dest: Path, expected_md5: str, mapping: dict[int, tuple[str, str]],
                 gt: list[int]) -> dict[str, int]:
    """``archive`` (flat validation JPEGs) -> ``dest/<wnid>/`` by the ground truth."""
    counts: dict[str, int] = {}
    seen: set[int] = set()
    dest.mkdir(parents=True)
    try:
        with open(archive, "rb") as raw:
            reader = _HashingReader(raw)
            with tarfile.open(fileobj=reader, mode="r|") as tf:
                for member in tf:
                    name = _member_name(archive, member)
                    match = _VAL_MEMBER.fullmatch(name)
                    if not match:
                        raise ValueError(f"{archive}: member {name!r} is not ILSVRC2012_val_########.JPEG "
                                         "(is this ILSVRC2012_img_val.tar?)")
                    number = int(match.group(1))
                    if not 1 <= number <= len(gt):
                        raise ValueError(f"{archive}: {name} has no line in the ground truth "
                                         f"({len(gt)} lines)")
                    wnid = mapping[gt[number - 1]][0]
                    (dest / wnid).mkdir(exist_ok=True)
                    _copy_member(tf, member, dest / wnid / name)
                    counts[wnid] = counts.get(wnid, 0) + 1
                    seen.add(number)
            _check_md5(archive, reader.hexdigest(), expected_md5)
    except tarfile.TarError as err:
        raise ValueError(f"{archive} is not a readable tar ({type(err).__name__}: {err})") from err
    if len(seen) != len(gt):
        missing = sorted(set(range(1, len(gt) + 1)) - seen)
        raise ValueError(f"{archive} lacks {len(missing)} of the ground truth's {len(gt)} images (first: "
                         f"ILSVRC2012_val_{missing[0]:08d}.JPEG)")
    return counts


def _copy_member(tf: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    try:
        fh = open(dest, "xb")  # "x": a name twice in an archive is an error, not an overwrite
    except FileExistsError:
        raise ValueError(f"{member.name} appears twice (at {dest})") from None
    with fh:
        shutil.copyfileobj(tf.extractfile(member), fh, 1 << 20)
