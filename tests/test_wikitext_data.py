"""deqlib.data.wikitext: vocabulary, batchify, segments, the real slice, the download."""

import dataclasses
import hashlib
import zipfile

import pytest
import torch

from deqlib.data.download import DownloadError
from deqlib.data.wikitext import (EOS, LMStream, Vocabulary, WikiTextData, batchify, fetch_wikitext103,
                                  load_wikitext, read_lines)
from conftest import ROOT, skip_without_slice

SLICE = "../shared/data/wikitext-2"  # as params.yaml says it, relative to the repository
CORPUS = "b a b\n\nc a b\n"  # counts: b 3, a 2, c 1, <eos> 3 (the blank line included)


def _corpus(tmp_path, text=CORPUS, name="train.txt"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_vocabulary_eos_first_then_by_count_and_exact_ids(tmp_path):
    path = _corpus(tmp_path)
    lines = list(read_lines(path))
    assert lines == [["b", "a", "b", EOS], [EOS], ["c", "a", "b", EOS]]
    vocab = Vocabulary.build(read_lines(path))
    assert vocab.words == [EOS, "b", "a", "c"]
    ids, unknown = vocab.encode(read_lines(path))
    assert ids.tolist() == [1, 2, 1, 0, 0, 3, 2, 1, 0] and ids.dtype == torch.int64 and unknown == 0


def test_equal_counts_keep_first_appearance_order(tmp_path):
    vocab = Vocabulary.build(read_lines(_corpus(tmp_path, "z y x\nx y z\n")))
    assert vocab.words == [EOS, "z", "y", "x"]


def test_unseen_words_map_to_unk_or_raise(tmp_path):
    vocab = Vocabulary.build(read_lines(_corpus(tmp_path, "a <unk> a\n")))
    ids, unknown = vocab.encode([["a", "new", "<unk>", "other"]])
    assert ids.tolist() == [1, 2, 2, 2] and unknown == 2
    with pytest.raises(ValueError, match="'new' is not in the vocabulary"):
        vocab.encode([["a", "new"]], unk=None)
    with pytest.raises(ValueError, match="unk='<missing>'"):
        vocab.encode([["new"]], unk="<missing>")


def test_batchify_rows_are_contiguous_chunks():
    data = batchify(torch.arange(23), 4)
    assert data.shape == (4, 5)
    assert data[:, 0].tolist() == [0, 5, 10, 15] and data[1].tolist() == [5, 6, 7, 8, 9]
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="n_batch"):
            batchify(torch.arange(23), bad)
    with pytest.raises(ValueError, match="too few"):
        batchify(torch.arange(5), 4)


def test_segments_targets_shift_and_boundaries():
    stream = LMStream(torch.arange(40), n_batch=2, tgt_len=6)  # rows 0..19 and 20..39
    assert stream.steps_per_epoch == 3  # (20 - 1) // 6: the ragged tail is not trained on
    x, y, pos = stream.batch(1, 2)
    assert x.tolist() == [list(range(12, 18)), list(range(32, 38))]
    assert y.tolist() == [list(range(13, 19)), list(range(33, 39))]
    assert pos.tolist() == [1, 2, 0]
    x0, _, _ = stream.batch(0, 0)
    x1, _, _ = stream.batch(0, 1)
    assert int(x1[0, 0]) == int(x0[0, -1]) + 1  # consecutive segments continue the stream
    with pytest.raises(ValueError, match="i=3"):
        stream.batch(0, 3)


def test_each_rank_takes_its_own_rows():
    stream = LMStream(torch.arange(60), n_batch=4, tgt_len=5)  # rows start at 0, 15, 30, 45
    parts = [stream.batch(0, 1, rank, 2) for rank in (0, 1)]
    assert parts[0][0][:, 0].tolist() == [5, 35] and parts[1][0][:, 0].tolist() == [20, 50]
    assert parts[1][2].tolist() == [0, 1, 1]
    whole = stream.batch(0, 1)[0]
    assert sorted(torch.cat([p[0] for p in parts]).flatten().tolist()) == sorted(whole.flatten().tolist())
    with pytest.raises(ValueError, match="world=3"):
        stream.batch(0, 0, 0, 3)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="folder='wikitext-2'"):
        WikiTextData(folder="wikitext-2", download=True)
    with pytest.raises(ValueError, match="train_file"):
        WikiTextData(train_file="", download=False)
    # A misspelt file name fails here, before the archive is fetched, not after.
    with pytest.raises(ValueError, match="train_file='wiki.trian.tokens'"):
        WikiTextData(train_file="wiki.trian.tokens", download=True)
    with pytest.raises(ValueError, match="eval_file='test.txt'"):
        WikiTextData(eval_file="test.txt", download=True)
    WikiTextData(train_file="any.txt", eval_file="other.txt", folder="", download=False)  # local files: any name


def test_the_wikitext2_slice_loads_with_the_documented_counts():
    skip_without_slice(SLICE)
    cfg = WikiTextData(root=str(ROOT / SLICE), folder="", train_file="valid.txt", eval_file="test.txt", download=False)
    data = load_wikitext(cfg)
    assert data["train"].numel() == 217_646 and data["eval"].numel() == 245_569  # incl. <eos>
    vocab = data["vocab"]
    assert vocab.words[0] == EOS and int((data["train"] == 0).sum()) == 3760  # one per line
    counts = torch.bincount(data["train"], minlength=len(vocab))
    assert bool((counts[2:] <= counts[1:-1]).all())  # sorted by frequency after <eos>
    assert 0 < data["eval_unknown"] < data["eval"].numel() // 10


def _fake_wt103(tmp_path):
    zpath = tmp_path / "wikitext-103-v1.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("wikitext-103/wiki.train.tokens", CORPUS)
        zf.writestr("wikitext-103/wiki.valid.tokens", "a b\n")
        zf.writestr("wikitext-103/wiki.test.tokens", "c b a\n")
    return zpath, hashlib.md5(zpath.read_bytes()).hexdigest()


def test_download_of_a_fake_archive_then_load(tmp_path):
    zpath, md5 = _fake_wt103(tmp_path)
    root = tmp_path / "data"
    folder = fetch_wikitext103(root, urls=["file:///no/such/mirror.zip", zpath.as_uri()], checksum=md5)
    assert folder == root / "wikitext-103" and (folder / "wiki.test.tokens").exists()
    data = load_wikitext(WikiTextData(root=str(root)))  # present now: nothing is fetched
    assert data["eval"].tolist() == [3, 1, 2, 0] and data["train"].numel() == 9


def test_download_checksum_mismatch_and_offline_errors(tmp_path):
    zpath, _ = _fake_wt103(tmp_path)
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch_wikitext103(root, urls=[zpath.as_uri()], checksum="0" * 32)
    with pytest.raises(DownloadError, match=r"could not download file:///offline/a.zip(.|\n)*file:///offline/b.zip"):
        fetch_wikitext103(root, urls=["file:///offline/a.zip", "file:///offline/b.zip"], checksum="0" * 32)
    assert not (root / "wikitext-103").exists() and not (root / "wikitext-103-v1.zip").exists()
    with pytest.raises(FileNotFoundError, match="download=False"):
        load_wikitext(WikiTextData(root=str(root), download=False))


def _local(tmp_path, train: bytes, evaluation: bytes = b"a b\n") -> WikiTextData:
    (tmp_path / "valid.txt").write_bytes(train)
    (tmp_path / "test.txt").write_bytes(evaluation)
    return WikiTextData(root=str(tmp_path), folder="", train_file="valid.txt", eval_file="test.txt",
                        download=False)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_a_file_that_is_not_utf8_is_named_with_where(tmp_path, split):
    """A bare UnicodeDecodeError named neither the file nor where in it the bad byte is."""
    bad = b"a b\nc \x9f\xfe d\n"  # 0x9f cannot start a UTF-8 character: line 2, byte 6
    cfg = _local(tmp_path, bad, b"a b\n") if split == "train" else _local(tmp_path, CORPUS.encode(), bad)
    name = "valid.txt" if split == "train" else "test.txt"
    with pytest.raises(ValueError, match=rf"{name} is not UTF-8 text \(line 2, byte 6: invalid start byte 0x9f\)"):
        load_wikitext(cfg)


@pytest.mark.parametrize("text", [b"", b"\n \n\t\n"], ids=["empty", "blank_lines"])
@pytest.mark.parametrize("split", ["train", "eval"])
def test_a_file_without_words_is_named(tmp_path, split, text):
    """An empty training file gave a one-word vocabulary and failed later, in batchify, with
    '0 tokens are too few' and no file name; an empty evaluation file, after training."""
    cfg = _local(tmp_path, text) if split == "train" else _local(tmp_path, CORPUS.encode(), text)
    name = "valid.txt" if split == "train" else "test.txt"
    with pytest.raises(ValueError, match=rf"{name} has no words"):
        load_wikitext(cfg)


def test_an_unseen_word_without_unk_names_the_file(tmp_path):
    cfg = dataclasses.replace(_local(tmp_path, CORPUS.encode(), b"a zebra\n"), unk="<missing>")
    with pytest.raises(ValueError, match=r"test.txt: word 'zebra' is not in the vocabulary"):
        load_wikitext(cfg)
