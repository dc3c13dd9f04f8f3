"""pipelines.fetch, the command of DVC's fetch stages: each data set fetched from tiny archives
the test makes (file:// URLs, no network), the one-line failure without network, the small
profile's note in place of a download, and dvc.yaml's fetch stages matching the command."""

import dataclasses
import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT
from deqlib.config import load_params
from deqlib.data import DATA_ENV, DEFAULT_DATA_DIR
from deqlib.data.cifar import CIFAR_FOLDER, load_cifar10
from deqlib.data.wikitext import WikiTextData, load_wikitext
from pipelines.fetch import DATASETS, NOTE, PROG, main

CIFAR_MEMBERS = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


def _cifar_archive(folder: Path, n: int = 2) -> tuple[Path, str]:
    """A tar.gz in the CIFAR-10 python layout with ``n`` images per batch: (path, md5)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name in CIFAR_MEMBERS:
            if name == "batches.meta":
                blob = pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}, protocol=2)
            else:
                blob = pickle.dumps({b"labels": [int(v) for v in rng.integers(0, 10, n)],
                                     b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}, protocol=2)
            info = tarfile.TarInfo(f"{CIFAR_FOLDER}/{name}")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def _wikitext_archive(folder: Path) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "wikitext-103-v1.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("wikitext-103/wiki.train.tokens", "b a b\n\nc a b\n")
        zf.writestr("wikitext-103/wiki.valid.tokens", "a b\n")
        zf.writestr("wikitext-103/wiki.test.tokens", "c b a\n")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def _params(folder: Path, **roots: str) -> Path:
    """``folder/params.yaml`` holding the repository's cifar10 and wikitext sections, profile
    paper; ``roots`` (e.g. ``cifar10_small="/x"``) replace a profile's data.root. The fetch
    command's output goes to ``folder/data``."""
    params = load_params(ROOT / "params.yaml")
    out = {"profile": "paper", "cifar10": params["cifar10"], "wikitext": params["wikitext"]}
    for key, root in roots.items():
        experiment, profile = key.rsplit("_", 1)
        out[experiment][profile]["data"]["root"] = root
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(out))
    return path


def _serve(monkeypatch, name: str, *urls: str, checksum: str = "0" * 32) -> None:
    """Point data set ``name`` at ``urls`` and ``checksum`` instead of its canonical source."""
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(DATASETS[name], urls=tuple(urls), checksum=checksum))


def _no_download(monkeypatch, name: str) -> None:
    def refuse(root, urls, checksum):
        raise AssertionError(f"{name} was downloaded")

    monkeypatch.setitem(DATASETS, name, dataclasses.replace(DATASETS[name], fetch=refuse))


def _leftovers(folder: Path) -> list[str]:
    """Partial downloads and extraction folders under ``folder``."""
    return sorted(p.name for p in folder.rglob("*") if ".partial-" in p.name or p.name.startswith("."))


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)


def test_cifar10_is_fetched_into_the_default_root_once(tmp_path, monkeypatch, capsys):
    """Paper profile, no override: the archive is downloaded into data/, checked and extracted;
    the experiment reads it there through its empty data.root. A second run fetches nothing,
    and a run after DVC removed the output (it does, before running a stage) extracts the
    archive it kept, without the network."""
    archive, md5 = _cifar_archive(tmp_path / "server")
    params = _params(tmp_path / "repo")
    data = tmp_path / "repo" / DEFAULT_DATA_DIR
    _serve(monkeypatch, "cifar10", archive.as_uri(), checksum=md5)
    assert main(["cifar10", "--params", str(params)]) == 0
    assert "fetched into" in capsys.readouterr().out
    out = data / CIFAR_FOLDER
    assert sorted(p.name for p in out.iterdir()) == sorted(CIFAR_MEMBERS)
    assert sorted(p.name for p in data.iterdir()) == [CIFAR_FOLDER, archive.name] and not _leftovers(data)
    loaded = load_cifar10("", base=params.parent, download_missing=False)  # the paper profile's root
    assert loaded.train_x.shape == (10, 3, 32, 32) and loaded.test_x.shape == (2, 3, 32, 32)

    _serve(monkeypatch, "cifar10", "file:///offline/cifar-10-python.tar.gz", checksum=md5)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["cifar10", "--params", str(params)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before, "a complete folder was fetched again"

    for p in out.iterdir():
        p.unlink()
    out.rmdir()
    assert main(["cifar10", "--params", str(params)]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(CIFAR_MEMBERS)


def test_wikitext103_is_fetched_from_the_first_mirror_that_answers(tmp_path, monkeypatch):
    archive, md5 = _wikitext_archive(tmp_path / "server")
    params = _params(tmp_path / "repo")
    _serve(monkeypatch, "wikitext103", "file:///no/such/mirror.zip", archive.as_uri(), checksum=md5)
    assert main(["wikitext103", "--params", str(params)]) == 0
    data = tmp_path / "repo" / DEFAULT_DATA_DIR
    assert sorted(p.name for p in (data / "wikitext-103").iterdir()) == [
        "wiki.test.tokens", "wiki.train.tokens", "wiki.valid.tokens"]
    assert not _leftovers(data)
    read = load_wikitext(WikiTextData(download=False), base=params.parent)  # the default root
    assert read["train"].numel() == 9 and read["eval"].numel() == 4


@pytest.mark.parametrize("name, urls", [
    ("cifar10", ["http://127.0.0.1:9/cifar-10-python.tar.gz"]),
    ("wikitext103", ["http://127.0.0.1:9/a/wikitext-103-v1.zip", "file:///offline/b/wikitext-103-v1.zip"]),
])
def test_without_network_one_line_names_every_url_and_nothing_is_written(tmp_path, monkeypatch, capsys, name, urls):
    params = _params(tmp_path / "repo")
    _serve(monkeypatch, name, *urls)
    assert main([name, "--params", str(params)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    line = captured.err.strip()
    assert line.startswith(f"{PROG}: ") and "Traceback" not in line
    assert f"{DATASETS[name].experiment}.paper: {DATASETS[name].title} could not be fetched" in line
    assert "by hand" in line
    for url in urls:
        assert f"could not download {url} (" in line, line
    data = tmp_path / "repo" / DEFAULT_DATA_DIR
    assert not data.exists() or list(data.iterdir()) == [], "something was left half-written"


@pytest.mark.parametrize("name", ["cifar10", "wikitext103"])
def test_the_small_profile_downloads_nothing_and_notes_the_slice_it_reads(tmp_path, monkeypatch, capsys, name):
    """The output folder holds only a note naming the slice (as params.yaml writes it) and the
    digest of each file read, so that DVC sees a new output when the slice changes."""
    experiment = DATASETS[name].experiment
    slice_root = tmp_path / "shared" / "slice"
    if name == "cifar10":
        archive, _ = _cifar_archive(tmp_path / "server")
        with tarfile.open(archive) as tf:
            tf.extractall(slice_root, filter="data")
        files = [slice_root / CIFAR_FOLDER / f for f in CIFAR_MEMBERS]
    else:  # the small profile reads valid.txt and test.txt straight from its root
        slice_root.mkdir(parents=True)
        files = [slice_root / "valid.txt", slice_root / "test.txt"]
        for f in files:
            f.write_text(f"words of {f.name}\n")
    params = _params(tmp_path / "repo", **{f"{experiment}_small": "../shared/slice"})
    _no_download(monkeypatch, name)
    assert main([name, "--profile", "small", "--params", str(params)]) == 0
    out = tmp_path / "repo" / DEFAULT_DATA_DIR / DATASETS[name].folder
    assert [p.name for p in out.iterdir()] == [NOTE]
    note = (out / NOTE).read_text()
    assert "../shared/slice" in note and f"{experiment}.small.data.root" in note and str(tmp_path) not in note
    for f in files:
        assert f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}" in note
    assert "../shared/slice" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == [DATASETS[name].folder], "no archive, no download"

    files[0].write_bytes(files[0].read_bytes() + b"\n")  # the slice changes: so does the output
    assert main([name, "--profile", "small", "--params", str(params)]) == 0
    assert (out / NOTE).read_text() != note and [p.name for p in out.iterdir()] == [NOTE]


def test_deqlib_data_overrides_the_default_root_and_is_noted(tmp_path, monkeypatch):
    """$DEQLIB_DATA, with the paper profile's empty data.root: the data set is fetched there,
    and the stage's output notes where it is (data.root, when set, wins over both)."""
    archive, md5 = _cifar_archive(tmp_path / "server")
    params = _params(tmp_path / "repo")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "elsewhere"))
    _serve(monkeypatch, "cifar10", archive.as_uri(), checksum=md5)
    assert main(["cifar10", "--params", str(params)]) == 0
    assert sorted(p.name for p in (tmp_path / "elsewhere" / CIFAR_FOLDER).iterdir()) == sorted(CIFAR_MEMBERS)
    out = tmp_path / "repo" / DEFAULT_DATA_DIR / CIFAR_FOLDER
    assert [p.name for p in out.iterdir()] == [NOTE]
    assert f"${DATA_ENV}" in (out / NOTE).read_text()


def test_a_missing_slice_is_one_line_naming_it(tmp_path):
    """The command as DVC runs it: no network needed, exit status 1, no traceback."""
    params = _params(tmp_path / "repo", cifar10_small="../no/such/slice")
    proc = subprocess.run([sys.executable, "-m", "pipelines.fetch", "cifar10", "--profile", "small",
                           "--params", str(params)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(tmp_path / "no" / "such" / "slice" / CIFAR_FOLDER) in lines[0], lines[0]
    assert "cifar10.small.data.download is false" in lines[0], lines[0]
    assert not (tmp_path / "repo" / DEFAULT_DATA_DIR).exists()


def test_dvc_fetch_stages_match_the_command_and_feed_the_experiments():
    """Each fetch stage runs the command for its data set, lists the parameters it reads, and
    outputs the folder that the paper profile reads by default; the experiment depends on it."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(DATASETS) == {name[len("fetch_"):] for name in stages if name.startswith("fetch_")}
    for name, ds in DATASETS.items():
        stage = stages[f"fetch_{name}"]
        out = f"{DEFAULT_DATA_DIR}/{ds.folder}"
        assert stage["cmd"] == f"python -m pipelines.fetch {name}"
        assert stage["outs"] == [out] and out in stages[ds.experiment]["deps"]
        assert "profile" in stage["params"] and "pipelines/fetch.py" in stage["deps"]
        for profile in ("paper", "small"):
            for key in ("root", "download"):
                assert {f"{ds.experiment}.{profile}.data", f"{ds.experiment}.{profile}.data.{key}"} & \
                    set(stage["params"]), (name, profile, key)

