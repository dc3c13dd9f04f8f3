"""Fetch one data set for the profile DVC runs: the command of the fetch stages in dvc.yaml.

    python -m pipelines.fetch cifar10|wikitext103 [--profile small] [--params PATH]

The stage's output is the folder the paper profile reads by default: ``data/<folder>`` beside
``params.yaml`` (``data/cifar-10-batches-py``, ``data/wikitext-103``; git-ignored, cached by
DVC). What the command does depends on where the experiment's configuration (``data.root``,
else ``$DEQLIB_DATA``, else ``data/``) says the data set is:

* there, at the stage's output (the paper profiles, with no override): the archive is
  downloaded from the data set's canonical URLs (each tried in turn), its checksum checked, and
  extracted, unless the folder is already complete. The archive stays beside the folder
  (``data/cifar-10-python.tar.gz``, ``data/wikitext-103-v1.zip``), so an extraction that DVC
  repeats (it removes a stage's outputs before running it) downloads nothing; with no network,
  a copy of the archive placed there by hand is checked and extracted.
* elsewhere (the small profiles read the slices in ``../shared/data``; an override of the
  paper profile): nothing is downloaded unless the profile's ``data.download`` is true and the
  folder is missing. The files the experiment reads are checked, and the output folder holds
  only a note (:data:`NOTE`) naming where the experiment reads them and their sha256, so the
  downstream stage re-runs when that changes.

Everything is checked before anything is written: a bad configuration is one line naming it
(exit status 2); data that cannot be fetched or found is one line naming the data set, each URL
tried and why it failed, or the missing files (exit status 1). Downloads and extractions are
atomic (``deqlib.data.download``): a failure leaves no half-written file or folder.

A data set that cannot be downloaded (ImageNet needs an account) would get an entry whose
``fetch`` prepares the folder from archives the user supplies, with the same output rule.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deqlib.data.download import DATA_ENV, DEFAULT_DATA_DIR, DownloadError, data_root, file_digest
from pipelines.run import ROOT, ConfigError, check_config

PROG = "python -m pipelines.fetch"
NOTE = "data-is-elsewhere.txt"  # the whole content of an output folder whose data lives elsewhere


class FetchError(Exception):
    """The data set could not be fetched or found; the message says why in one line."""


def _fetch_cifar10(root: Path, urls: Sequence[str], checksum: str) -> Path:
    from deqlib.data.cifar import fetch_cifar10

    errors = []
    for url in urls:
        try:
            return fetch_cifar10(root, url, checksum)
        except DownloadError as err:
            errors.append(str(err))
    raise DownloadError("CIFAR-10 could not be fetched: " + "; ".join(errors))


def _fetch_wikitext103(root: Path, urls: Sequence[str], checksum: str) -> Path:
    from deqlib.data.wikitext import fetch_wikitext103

    return fetch_wikitext103(root, urls, checksum)


def _cifar_files(cfg: Any) -> tuple[str, ...]:
    from deqlib.data.cifar import TEST_FILE, TRAIN_FILES

    return (*TRAIN_FILES, TEST_FILE, "batches.meta")


@dataclass(frozen=True)
class DataSet:
    """One downloadable data set: where its experiment reads it and how it is fetched.

    ``folder``: the folder the archive extracts to, and the stage's output ``data/<folder>``.
    ``target(root, data_cfg)``: the folder the experiment reads; ``files(data_cfg)``: the files
    it reads there. ``fetch(root, urls, checksum)`` downloads and extracts into ``root``.
    """

    title: str
    experiment: str
    folder: str
    urls: tuple[str, ...]
    checksum: str
    fetch: Callable[[Path, Sequence[str], str], Path]
    target: Callable[[Path, Any], Path]
    files: Callable[[Any], tuple[str, ...]]


def _datasets() -> dict[str, DataSet]:
    from deqlib.data.cifar import CIFAR_FOLDER, CIFAR_MD5, CIFAR_URL
    from deqlib.data.wikitext import WT103_FOLDER, WT103_MD5, WT103_URLS

    return {
        "cifar10": DataSet("CIFAR-10", "cifar10", CIFAR_FOLDER, (CIFAR_URL,), CIFAR_MD5, _fetch_cifar10,
                           target=lambda root, cfg: root / CIFAR_FOLDER, files=_cifar_files),
        "wikitext103": DataSet("WikiText-103", "wikitext", WT103_FOLDER, tuple(WT103_URLS), WT103_MD5,
                               _fetch_wikitext103,
                               target=lambda root, cfg: root / cfg.folder if cfg.folder else root,
                               files=lambda cfg: (cfg.train_file, cfg.eval_file)),
    }


DATASETS = _datasets()


def _is_note(folder: Path) -> bool:
    return folder.is_dir() and [p.name for p in folder.iterdir()] == [NOTE]


def _missing(folder: Path, files: Sequence[str]) -> list[str]:
    return [name for name in files if not (folder / name).is_file()]


def _where(cfg: Any, key: str, target: Path, root: Path) -> str:
    """How the configuration names ``target``: as ``params.yaml`` or ``$DEQLIB_DATA`` says it."""
    rest = target.relative_to(root) if target != root else Path()
    if cfg.root:
        relative = "" if Path(cfg.root).expanduser().is_absolute() else ", relative to the folder of params.yaml"
        return f"{Path(cfg.root) / rest} ({key}.data.root{relative})"
    if os.environ.get(DATA_ENV):
        return f"{Path(os.environ[DATA_ENV]) / rest} (${DATA_ENV})"
    return f"{Path(DEFAULT_DATA_DIR) / rest} (the default data root, beside params.yaml)"


def _write_note(out: Path, text: str) -> None:
    """``out`` becomes a folder holding only :data:`NOTE` with ``text``, replaced whole."""
    tmp = out.with_name(f".{out.name}.note-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / NOTE).write_text(text)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(name: str, profile: str | None = None, params_path: str | Path | None = None) -> tuple[Path, str]:
    """Prepare data set ``name`` for ``profile`` (None: ``params.yaml``'s) as the module's
    docstring says; returns ``(stage output folder, what was done)``. Raises
    :class:`~pipelines.run.ConfigError` (bad configuration) or :class:`FetchError`."""
    if name not in DATASETS:
        raise ConfigError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    ds = DATASETS[name]
    params_path = Path(params_path or ROOT / "params.yaml").resolve()
    profile, exp = check_config(ds.experiment, profile, {}, params_path)
    key = f"{ds.experiment}.{profile}"
    cfg = exp.data
    base = params_path.parent
    root = data_root(cfg.root, base).resolve()
    target = ds.target(root, cfg).resolve()
    out = (base / DEFAULT_DATA_DIR / ds.folder).resolve()  # resolved as target is: data/ may be a link
    files = ds.files(cfg)
    if target != out and target.is_relative_to(out):
        raise FetchError(f"{key} reads {ds.title} from {target}, inside {out}, the folder the fetch stage "
                         f"replaces; choose another data.root")
    if target == out and _is_note(out):
        shutil.rmtree(out)  # a note that a run of another profile left, outside DVC
    fetched = False
    if _missing(target, files):
        if not target.exists() and cfg.download:
            try:
                ds.fetch(root, ds.urls, ds.checksum)
            except DownloadError as err:
                raise FetchError(f"{key}: {err}") from None
            fetched = True
        elif not target.exists():
            point = f"{key}.data.root" + ("" if cfg.root else f" or ${DATA_ENV}")
            raise FetchError(f"{key} reads {target}, which is not there, and {key}.data.download is false; "
                             f"put the data there or point {point} at it")
        missing = _missing(target, files)
        if missing:
            raise FetchError(f"{target} lacks {missing}, which {key} reads")
    if target == out:
        return out, f"{key}: {ds.title} {'fetched into' if fetched else 'already in'} {out}"
    where = _where(cfg, key, target, root)
    if out.exists() and not _is_note(out):
        return out, f"{key} reads its data from {where}; {out} holds other files and is left as it is"
    digests = "".join(f"sha256 {file_digest(target / f)}  {f}\n" for f in files)
    _write_note(out, f"Profile {profile} of the {ds.experiment} experiment reads its data from\n"
                     f"{where}, not from this folder: the DVC stage fetch_{name} downloaded nothing.\n"
                     f"The files it reads, when the stage ran:\n{digests}")
    done = f"{ds.title} fetched into" if fetched else "nothing to fetch: it reads its data from"
    return out, f"{key}: {done} {where}; noted in {out / NOTE}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=sorted(DATASETS))
    p.add_argument("--profile", choices=["paper", "small"], help="default: params.yaml's profile")
    p.add_argument("--params", help="the parameter file (default: the repository's params.yaml); the "
                                    "output goes to data/ beside it")
    args = p.parse_args(argv)
    try:
        _, done = fetch(args.dataset, args.profile, args.params)
    except ConfigError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return err.status
    except (FetchError, OSError) as err:
        print(f"{PROG}: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
