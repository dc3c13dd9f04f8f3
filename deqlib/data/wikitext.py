"""Word-level WikiText: vocabulary, batchified token streams, segments with a memory.

Reading is the customary one for WikiText (as in Transformer-XL and the DEQ code): every line,
blank ones included, is split on whitespace and ends with an ``<eos>`` token; the vocabulary
comes from the training split only, ``<eos>`` first, then words by decreasing count (ties in
order of first appearance), so that the frequency cutoffs of an adaptive softmax fall on
frequency bands. Words of other splits that the training split never saw map to ``<unk>``
(WikiText-103 has none: its vocabulary is closed; the WikiText-2 slice trained on ``valid.txt``
does).

Layout: :func:`batchify` returns ``(n_batch, T)``: row ``b`` is the ``b``-th contiguous chunk
of the stream, and a segment is a slice of columns. Each process takes its own rows.

WikiText-103 is fetched, when absent, from its canonical archive (see :data:`WT103_URLS`).
"""

from __future__ import annotations

import array
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..checks import check_bool, check_int, check_str
from .download import DownloadError, data_root, download, extract

__all__ = [
    "EOS",
    "UNK",
    "Vocabulary",
    "read_lines",
    "batchify",
    "LMStream",
    "WikiTextData",
    "load_wikitext",
    "fetch_wikitext103",
    "WT103_URLS",
    "WT103_MD5",
    "WT103_FILES",
]

EOS = "<eos>"
UNK = "<unk>"

# The archive the WikiText authors published. The research.metamind.io S3 bucket, the URL all
# published checksums refer to, answers 403 since 2024 (pytorch/text#2255); Stephen Merity's
# wikitext.smerity.com mirror serves the same zip. We try the mirror first and check the file
# against the MD5 that torchtext's WikiText103 definition gives for the S3 archive, so either
# source is accepted only if it is that exact file.
WT103_URLS = (
    "https://wikitext.smerity.com/wikitext-103-v1.zip",
    "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
)
WT103_MD5 = "9ddaacaf6af0710eda8c456decff7832"
WT103_FILES = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")  # in the archive's folder
WT103_FOLDER = "wikitext-103"
# Some hosts refuse urllib's default agent; say who is asking.
_HEADERS = {"User-Agent": "deqlib/0.1 (research reproduction; python-urllib)"}


def read_lines(path: str | os.PathLike) -> Iterable[list[str]]:
    """Yield the tokens of each line of ``path`` followed by ``<eos>`` (blank lines too).

    Raises ValueError naming the file, the line and the byte where it is not UTF-8 (a bare
    UnicodeDecodeError names neither, and its position counts from a chunk of the file).
    """
    with open(path, encoding="utf-8") as fh:
        try:
            for line in fh:
                yield line.split() + [EOS]
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text ({_first_bad_byte(path)})") from err


def _first_bad_byte(path: str | os.PathLike) -> str:
    """Where ``path`` first fails to decode as UTF-8, found line by line (a byte 0x0A is never
    part of a multi-byte character, so the lines of the raw bytes decode on their own)."""
    offset = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"line {number}, byte {offset + err.start}: {err.reason} 0x{raw[err.start]:02x}"
            offset += len(raw)
    return "a decoding error that a second reading did not meet"


class _UnknownWord(ValueError):
    """A word outside the vocabulary with no ``unk`` to map it to (the caller names the file)."""


class Vocabulary:
    """Word <-> id, built from a training split: ``<eos>`` is id 0, then by decreasing count."""

    def __init__(self, words: Sequence[str]):
        if len(set(words)) != len(words):
            raise ValueError("vocabulary words must be unique")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, lines: Iterable[list[str]]) -> Vocabulary:
        counts = Counter()
        for tokens in lines:
            counts.update(tokens)
        counts.pop(EOS, None)
        # most_common sorts by count and keeps first-appearance order among equal counts.
        return cls([EOS] + [w for w, _ in counts.most_common()])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, lines: Iterable[list[str]], unk: str | None = UNK) -> tuple[Tensor, int]:
        """``(ids, n_unknown)``: one int64 stream of every token; unseen words become ``unk``.

        Raises ValueError on an unseen word when ``unk`` is None or not in the vocabulary.
        """
        unk_id = self.index.get(unk) if unk is not None else None
        ids = array.array("q")
        n_unknown = 0
        get = self.index.get
        for tokens in lines:
            for w in tokens:
                i = get(w)
                if i is None:
                    if unk_id is None:
                        raise _UnknownWord(f"word {w!r} is not in the vocabulary and unk={unk!r} "
                                           "is not a word of it")
                    i, n_unknown = unk_id, n_unknown + 1
                ids.append(i)
        if not len(ids):
            return torch.zeros(0, dtype=torch.int64), n_unknown
        return torch.frombuffer(ids, dtype=torch.int64).clone(), n_unknown


def batchify(tokens: Tensor, n_batch: int) -> Tensor:
    """``(T_total,)`` -> ``(n_batch, T)``: row ``b`` is the ``b``-th of ``n_batch`` contiguous
    chunks of the stream (``T = T_total // n_batch``; the remainder is dropped)."""
    check_int("n_batch", n_batch, 1)
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-d stream, got shape {tuple(tokens.shape)}")
    T = tokens.numel() // n_batch
    if T < 2:
        raise ValueError(f"{tokens.numel()} tokens are too few for n_batch={n_batch}")
    return tokens[: n_batch * T].view(n_batch, T)


class LMStream:
    """Consecutive segments of a batchified stream, for :func:`deqlib.train.train`.

    Step ``i`` of an epoch is the segment of columns ``[i*tgt_len, (i+1)*tgt_len)`` as input and
    the same columns shifted by one as target; the stream is the same every epoch (language
    models are trained in order, so that a segment's memory is the segment before it).

    ``batch(epoch, i, rank, world)`` returns ``(inputs, targets, position)``: ``inputs`` and
    ``targets`` ``(n_batch / world, tgt_len)`` int64, the rows ``rank::world``, and
    ``position = tensor([epoch, i, rank])``, which lets the model tell whether the memory it
    holds is that of the previous segment of its own rows.
    """

    def __init__(self, tokens: Tensor, n_batch: int, tgt_len: int):
        check_int("tgt_len", tgt_len, 1)
        self.data = batchify(tokens, n_batch)
        self.n_batch, self.tgt_len = n_batch, tgt_len
        self.steps_per_epoch = (self.data.shape[1] - 1) // tgt_len  # full segments only
        if self.steps_per_epoch < 1:
            raise ValueError(f"tgt_len={tgt_len} leaves no full segment in a stream of "
                             f"{self.data.shape[1]} tokens per row")

    def batch(self, epoch: int, i: int, rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        if not 0 <= i < self.steps_per_epoch:
            raise ValueError(f"segment i={i} out of range [0, {self.steps_per_epoch})")
        if self.n_batch % world:
            raise ValueError(f"n_batch={self.n_batch} is not divisible by world={world} processes")
        rows = self.data[rank::world]
        s = i * self.tgt_len
        inputs = rows[:, s:s + self.tgt_len]
        targets = rows[:, s + 1:s + 1 + self.tgt_len]
        return inputs.contiguous(), targets.contiguous(), torch.tensor([epoch, i, rank])


@dataclass(frozen=True)
class WikiTextData:
    """Where the corpus is and which files are the training and evaluation splits.

    ``root``: the data root (relative paths resolve against the params file's folder; empty
    means ``$DEQLIB_DATA`` if set, else ``data/`` beside the params file). Files are read from
    ``root/folder``. ``download``: fetch and extract WikiText-103 into ``root`` when the files
    are absent (``folder`` must then be ``"wikitext-103"``, the archive's folder). ``unk``: the
    word unseen words map to.
    """

    root: str = ""
    folder: str = WT103_FOLDER
    train_file: str = "wiki.train.tokens"
    eval_file: str = "wiki.test.tokens"
    download: bool = True
    unk: str = UNK

    def __post_init__(self) -> None:
        for name in ("root", "folder"):
            check_str(name, getattr(self, name))
        for name in ("train_file", "eval_file", "unk"):
            check_str(name, getattr(self, name), nonempty=True)
        check_bool("download", self.download)
        if self.download and self.folder != WT103_FOLDER:
            raise ValueError(f"download=True fetches WikiText-103, whose folder is {WT103_FOLDER!r}; "
                             f"got folder={self.folder!r}")
        if self.download:  # checked before a 180 MB download, not after it
            for name in ("train_file", "eval_file"):
                if getattr(self, name) not in WT103_FILES:
                    raise ValueError(f"download=True fetches WikiText-103, whose files are "
                                     f"{list(WT103_FILES)}; got {name}={getattr(self, name)!r}")


def fetch_wikitext103(root: str | os.PathLike, urls: Sequence[str] = WT103_URLS,
                      checksum: str = WT103_MD5) -> Path:
    """Download (trying ``urls`` in order) and extract WikiText-103 into ``root``; returns
    ``root/wikitext-103``. The archive stays in ``root``. Raises DownloadError naming every
    URL's failure, in one line."""
    root = Path(root)
    folder = root / WT103_FOLDER
    if folder.is_dir():
        return folder
    archive = root / "wikitext-103-v1.zip"
    errors = []
    for url in urls:
        try:
            download(url, archive, checksum, algorithm="md5", headers=_HEADERS)
            break
        except DownloadError as err:
            errors.append(err)
    else:
        reasons = "; ".join(f"could not download {e.url} ({e.reason})" if e.url else str(e) for e in errors)
        hint = f"; with no network, place the file at {archive} by hand" if any(e.url for e in errors) else ""
        raise DownloadError(f"WikiText-103 could not be fetched: {reasons}{hint}")
    return extract(archive, root, WT103_FOLDER)


def load_wikitext(cfg: WikiTextData, base: str | os.PathLike | None = None) -> dict:
    """Read the splits of ``cfg``: ``{"vocab", "train", "eval", "eval_unknown", "paths"}``.

    ``train``/``eval`` are int64 streams; ``eval_unknown`` counts evaluation tokens mapped to
    ``unk``. ``base`` is the folder relative roots resolve against.
    """
    root = data_root(cfg.root, base)
    folder = root / cfg.folder if cfg.folder else root
    paths = {"train": folder / cfg.train_file, "eval": folder / cfg.eval_file}
    if not all(p.exists() for p in paths.values()):
        if not cfg.download:
            missing = [str(p) for p in paths.values() if not p.exists()]
            raise FileNotFoundError(f"WikiText files missing: {missing} (download=False)")
        fetch_wikitext103(root)
    vocab = Vocabulary.build(read_lines(paths["train"]))
    if len(vocab) == 1:  # else: a one-word model, and a 'too few tokens' error naming no file
        raise ValueError(f"{paths['train']} has no words (the training split is empty or blank)")
    train, _ = vocab.encode(read_lines(paths["train"]), cfg.unk)
    try:
        evaluation, unknown = vocab.encode(read_lines(paths["eval"]), cfg.unk)
    except _UnknownWord as err:  # an unseen word without an unk: say which file holds it
        raise ValueError(f"{paths['eval']}: {err}") from err
    if not bool((evaluation != vocab.index[EOS]).any()):  # else met only after training
        raise ValueError(f"{paths['eval']} has no words (the evaluation split is empty or blank)")
    return {"vocab": vocab, "train": train, "eval": evaluation, "eval_unknown": unknown, "paths": paths}
