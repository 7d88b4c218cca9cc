"""Data for the notebooks: offline loaders (used at ci scale) and cached downloaders (full scale).

Offline, always available:
    load_digits, augment_digits      scikit-learn's bundled 8x8 digits, and a two-view augmentation
    stdlib_text                      text of a fixed list of Python standard-library modules
    CharVocab, lm_windows, mask_tokens
    gaussian_mixture, gaussian_ring  generated 2-D (or d-D) point clouds
    split, minibatches               train/test split and an endless minibatch stream

Full scale (network, cached under ``cache_dir()``; nothing downloads on import or at ci scale):
    download, mnist, cifar10, text8, enwik8, tinystories, hf_dataset
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ._validate import check_int, check_range, check_tensor

__all__ = [
    "load_digits", "augment_digits", "stdlib_text", "CharVocab", "lm_windows", "mask_tokens",
    "gaussian_mixture", "gaussian_ring", "split", "minibatches",
    "cache_dir", "download", "mnist", "cifar10", "text8", "enwik8", "tinystories", "hf_dataset",
]


# --------------------------------------------------------------------------------------------
# Offline data
# --------------------------------------------------------------------------------------------
def load_digits(*, images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), no download.

    Returns ``x`` float32 in [0, 1] of shape ``[1797, 64]`` (or ``[1797, 8, 8]`` with
    ``images=True``) and ``y`` int64 labels ``[1797]``.
    """
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    if images:
        x = x.reshape(-1, 8, 8)
    return x, y


def augment_digits(x: torch.Tensor, *, max_shift: int = 1, noise_std: float = 0.1,
                   drop_prob: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random view of each digit: a shift of up to ``max_shift`` pixels (zero fill), pixel
    dropout with probability ``drop_prob`` and Gaussian noise of std ``noise_std``; clipped to [0, 1].

    ``x`` is ``[N, 64]`` or ``[N, 8, 8]``; the output has the same shape.
    """
    check_tensor("x", x)
    if x.shape[-1] == 64 and x.dim() == 2:
        img, flat = x.reshape(-1, 8, 8), True
    elif x.dim() == 3 and x.shape[-2:] == (8, 8):
        img, flat = x, False
    else:
        raise ValueError(f"x: expected shape [N, 64] or [N, 8, 8], got {tuple(x.shape)}")
    check_int("max_shift", max_shift, 0, 7)
    check_range("noise_std", noise_std, 0.0)
    check_range("drop_prob", drop_prob, 0.0, 1.0)
    n = img.shape[0]
    dev = img.device
    padded = torch.nn.functional.pad(img, (max_shift,) * 4)
    shifts = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).to(dev)
    rows = shifts[:, 0, None] + torch.arange(8, device=dev)  # [n, 8]
    cols = shifts[:, 1, None] + torch.arange(8, device=dev)
    out = padded[torch.arange(n, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if drop_prob > 0:
        keep = torch.rand(out.shape, generator=generator).to(dev) >= drop_prob
        out = out * keep
    if noise_std > 0:
        out = out + noise_std * torch.randn(out.shape, generator=generator).to(dev, out.dtype)
    out = out.clamp(0.0, 1.0)
    return out.reshape(-1, 64) if flat else out


# The text corpus of the language-model notebooks: the docstrings and the sources of a fixed,
# sorted list of pure-Python standard-library modules, frozen from CPython 3.11.7 and shipped as
# package data (companion/corpus/, beside the Python Software Foundation licence that covers it),
# so that every Python version reads the same characters. `python3 tasks.py corpus` rebuilds the
# files from the running interpreter and prints their checksums.
_CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
_CORPUS_SHA256 = {
    "docstrings": "958336f1a733b7066311d241b271247f997575abbb1ccbce7f791fbe8bee7946",
    "source": "ae535706cfc7b240105d6372738c87c1961c7f97842e3a4af4f5daac5650c622",
}
_CORPUS_CACHE: dict[str, str] = {}


def stdlib_text(kind: str = "docstrings", *, max_chars: int | None = None) -> str:
    """English text from the Python standard library, the same on every machine and Python.

    ``kind="docstrings"``: the docstrings of the modules, classes and functions of a fixed list
    of modules, one paragraph each (471,642 characters); ``kind="source"``: the source files
    themselves (2,541,144 characters). Both are frozen from CPython 3.11.7 and shipped with
    companion (``companion/corpus/``, under the PSF licence); the file's SHA-256 is checked on
    first use. ``max_chars`` truncates the result.
    """
    if kind not in ("docstrings", "source"):
        raise ValueError(f"kind: expected 'docstrings' | 'source', got {kind!r}")
    if max_chars is not None:
        check_int("max_chars", max_chars, 1)
    if kind not in _CORPUS_CACHE:
        path = _CORPUS_DIR / f"stdlib_{kind}.txt.gz"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: the shipped text corpus is missing; reinstall companion (or copy "
                "companion/corpus/ beside data.py)")
        raw = gzip.decompress(path.read_bytes())
        digest = hashlib.sha256(raw).hexdigest()
        if digest != _CORPUS_SHA256[kind]:
            raise ValueError(f"{path}: checksum {digest} differs from the shipped corpus's "
                             f"{_CORPUS_SHA256[kind]}: the file is damaged or was changed")
        _CORPUS_CACHE[kind] = raw.decode("utf-8")
    text = _CORPUS_CACHE[kind]
    return text[:max_chars] if max_chars is not None else text


class CharVocab:
    """A character vocabulary: ``encode``/``decode``, ``len()``, and two special ids,
    ``pad_id`` and ``mask_id``, placed after the characters."""

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if len(set(chars)) != len(chars):
            raise ValueError("chars: expected distinct characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.pad_id = len(chars)
        self.mask_id = len(chars) + 1

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        if not isinstance(text, str) or not text:
            raise ValueError("text: expected a non-empty string")
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars) + 2

    def encode(self, text: str) -> torch.Tensor:
        try:
            return torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"text: character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        special = {self.pad_id: "", self.mask_id: "\u2588"}
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            out.append(self.chars[i] if 0 <= i < len(self.chars) else special.get(i, "?"))
        return "".join(out)


def lm_windows(ids: torch.Tensor, seq_len: int, batch_size: int, *,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random windows of a 1-D token stream for next-token prediction.

    Returns ``x, y`` of shape ``[batch_size, seq_len]`` with ``y`` shifted one step left of ``x``.
    """
    check_tensor("ids", ids)
    if ids.dim() != 1:
        raise ValueError(f"ids: expected a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
    check_int("seq_len", seq_len, 1)
    check_int("batch_size", batch_size, 1)
    if ids.numel() < seq_len + 1:
        raise ValueError(f"ids: need at least seq_len + 1 = {seq_len + 1} tokens, got {ids.numel()}")
    starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    windows = ids[(starts[:, None] + offsets).to(ids.device)]
    return windows[:, :-1], windows[:, 1:]


def mask_tokens(ids: torch.Tensor, rate: float, mask_id: int, *,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style corruption: each token is chosen with probability ``rate`` and replaced by
    ``mask_id``. Returns ``(corrupted, masked)`` with ``masked`` True where a token was chosen."""
    check_tensor("ids", ids)
    check_range("rate", rate, 0.0, 1.0)
    masked = (torch.rand(ids.shape, generator=generator) < rate).to(ids.device)
    corrupted = torch.where(masked, torch.full_like(ids, mask_id), ids)
    return corrupted, masked


def gaussian_mixture(n: int, means, stds, weights, *, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples of an isotropic Gaussian mixture: ``means`` ``[K, d]`` (or ``[K]`` for 1-D),
    ``stds`` ``[K]``, ``weights`` ``[K]`` (normalised here). Returns ``(x [n, d], component [n])``."""
    check_int("n", n, 1)
    means = torch.as_tensor(means, dtype=torch.float32)
    if means.dim() == 1:
        means = means[:, None]
    stds = torch.as_tensor(stds, dtype=means.dtype).reshape(-1)
    weights = torch.as_tensor(weights, dtype=means.dtype).reshape(-1)
    k = means.shape[0]
    if stds.numel() != k or weights.numel() != k:
        raise ValueError(f"stds, weights: expected {k} entries each (one per mean), "
                         f"got {stds.numel()} and {weights.numel()}")
    if (stds <= 0).any() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError("stds must be > 0 and weights >= 0 with a positive sum")
    comp = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=generator)
    noise = torch.randn(n, means.shape[1], generator=generator)
    return means[comp] + stds[comp, None] * noise, comp


def gaussian_ring(n: int, num_modes: int = 8, radius: float = 2.0, std: float = 0.05, *,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points from ``num_modes`` equal Gaussians evenly spaced on a circle.
    Returns ``(x [n, 2], centers [num_modes, 2])``."""
    check_int("num_modes", num_modes, 1)
    check_range("radius", radius, 0.0, low_open=True)
    angles = 2 * math.pi * torch.arange(num_modes, dtype=torch.float32) / num_modes
    centers = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    x, _ = gaussian_mixture(n, centers, torch.full((num_modes,), float(std)),
                            torch.ones(num_modes), generator=generator)
    return x, centers


def _common_length(who: str, tensors) -> int:
    """The first dimension shared by all ``tensors`` (ValueError naming the odd one out)."""
    if not tensors:
        raise ValueError(f"{who}: expected at least one tensor")
    n = tensors[0].shape[0]
    for i, t in enumerate(tensors):
        if t.shape[0] != n:
            raise ValueError(f"tensors[{i}]: expected first dimension {n}, got {t.shape[0]}")
    return n


def split(*tensors: torch.Tensor, test_fraction: float = 0.2, seed: int = 0):
    """Shuffle and split tensors that share their first dimension.

    Returns ``(train_0, test_0, train_1, test_1, ...)`` like scikit-learn's ``train_test_split``.
    """
    n = _common_length("split", tensors)
    check_range("test_fraction", test_fraction, 0.0, 1.0, low_open=True, high_open=True)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(n * test_fraction)))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    out = []
    for t in tensors:
        out += [t[train_idx.to(t.device)], t[test_idx.to(t.device)]]
    return tuple(out)


def minibatches(*tensors: torch.Tensor, batch_size: int,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """An endless stream of minibatches: one fresh permutation per epoch, the last partial batch
    of each epoch dropped (so every batch has ``batch_size`` rows)."""
    n = _common_length("minibatches", tensors)
    check_int("batch_size", batch_size, 1, n)
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = perm[start:start + batch_size]
            yield tuple(t[idx.to(t.device)] for t in tensors)


# --------------------------------------------------------------------------------------------
# Full-scale downloads (cached)
# --------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where downloads are kept: ``$COMPANION_DATA`` or ``~/.cache/companion``."""
    root = os.environ.get("COMPANION_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "companion")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_MAGIC = {"gzip": b"\x1f\x8b", "zip": b"PK\x03\x04"}


def _file_problem(path: Path, url: str, name: str, kind: str | None,
                  sha256: str | None) -> str | None:
    """Why the file at ``path`` is not what ``url`` should give, or None: a checksum that differs
    from ``sha256``, an HTML page (a server's error page) where a data file was expected, or
    first bytes that are not those of ``kind`` ("gzip" or "zip")."""
    if sha256 is not None:
        got = _sha256(path)
        if got != sha256:
            return f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}"
    with open(path, "rb") as f:
        head = f.read(512)
    if not name.lower().endswith((".htm", ".html")) and \
            head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        return f"{name} from {url} is an HTML page (a server's error page?), not the data file"
    if kind is not None and not head.startswith(_MAGIC[kind]):
        return f"{name} from {url} is not a {kind} file (it starts with {head[:8]!r})"
    return None


def download(url: str, *, sha256: str | None = None, filename: str | None = None,
             kind: str | None = None) -> Path:
    """Download ``url`` into ``cache_dir()`` once and return the local path.

    The cache is keyed by the whole URL (two URLs ending in the same file name are two files):
    the file lives at ``cache_dir() / <hash of the URL> / <name>``. It is written to a temporary
    name and renamed only when complete and verified: with ``sha256`` its checksum must match;
    an HTML page (a server's error page) is never accepted for a data file; with ``kind``
    ("gzip" or "zip") its first bytes must be that format's. A cached file that fails these
    checks is fetched again. Offline and not cached: RuntimeError naming the URL and the path.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"url: expected an absolute URL, got {url!r}")
    if kind is not None and kind not in _MAGIC:
        raise ValueError(f"kind: expected one of {sorted(_MAGIC)} or None, got {kind!r}")
    name = filename or url.rstrip("/").rsplit("/", 1)[-1]
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"filename: expected a plain file name, got {name!r}")
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    target = cache_dir() / key / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_file():
        if _file_problem(target, url, name, kind, sha256) is None:
            return target
        target.unlink()  # stale or corrupt: fetch again
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".part")
    try:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, os.fdopen(fd, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                bar = _progress(total, name)
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
                bar.close()
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise RuntimeError(
                f"could not download {url} into {target} ({e}). Run this once where the network is "
                f"reachable, or place the file at that path by hand."
            ) from e
        problem = _file_problem(Path(tmp), url, name, kind, sha256)
        if problem is not None:
            raise RuntimeError(f"download of {name} rejected, not cached: {problem}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _progress(total, name):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=None)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()


MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (the MNIST format), gzipped or not, into a uint8 tensor."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != math.prod(dims):
        raise ValueError(f"{path}: expected {math.prod(dims)} bytes of data, got {len(body)}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def mnist(split: str = "train", *, base_url: str = MNIST_URL) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST: ``x`` float32 ``[N, 1, 28, 28]`` in [0, 1] and ``y`` int64 ``[N]`` (download, cached)."""
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' | 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(download(base_url + f"{prefix}-images-idx3-ubyte.gz", kind="gzip"))
    labels = read_idx(download(base_url + f"{prefix}-labels-idx1-ubyte.gz", kind="gzip"))
    return images[:, None].float() / 255.0, labels.long()


def cifar10(split: str = "train", *, grayscale: bool = False, url: str = CIFAR10_URL
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10: ``x`` float32 ``[N, 3, 32, 32]`` (``[N, 1, 32, 32]`` with ``grayscale``) in [0, 1]
    and ``y`` int64 ``[N]`` (download, cached)."""
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' | 'test', got {split!r}")
    wanted = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5") \
        if split == "train" else ("test_batch",)
    xs, ys = [], []
    with tarfile.open(download(url, kind="gzip"), "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for name in wanted:
            if name not in members:
                raise RuntimeError(f"{url}: archive has no member {name}")
            batch = pickle.load(tar.extractfile(members[name]), encoding="latin1")
            xs.append(torch.as_tensor(batch["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
            ys.append(torch.as_tensor(batch["labels"], dtype=torch.int64))
    x = torch.cat(xs).float() / 255.0
    if grayscale:
        x = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    return x, torch.cat(ys)


def _read_single_zip_member(path: Path) -> bytes:
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        if len(names) != 1:
            raise RuntimeError(f"{path}: expected one file in the archive, found {names}")
        return zf.read(names[0])


def text8(*, url: str = TEXT8_URL) -> str:
    """text8: 10^8 characters of cleaned English Wikipedia (download, cached)."""
    return _read_single_zip_member(download(url, kind="zip")).decode("ascii")


def enwik8(*, url: str = ENWIK8_URL) -> bytes:
    """enwik8: the first 10^8 bytes of an English Wikipedia dump (download, cached)."""
    return _read_single_zip_member(download(url, kind="zip"))


def tinystories(split: str = "train", *, max_chars: int | None = None,
                base_url: str = TINYSTORIES_URL) -> str:
    """TinyStories (GPT-4 version) as one string (download, cached; the train split is ~2 GB)."""
    if split not in ("train", "valid"):
        raise ValueError(f"split: expected 'train' | 'valid', got {split!r}")
    path = download(base_url + f"TinyStoriesV2-GPT4-{split}.txt")
    with open(path, encoding="utf-8") as f:
        return f.read(max_chars) if max_chars is not None else f.read()


def hf_dataset(name: str, config: str | None = None, split: str = "train"):
    """``datasets.load_dataset(name, config, split=split)`` with the cache under ``cache_dir()``."""
    try:
        import datasets  # noqa: F401  (optional dependency, full scale only)
    except ImportError:
        raise ImportError("hf_dataset needs the optional package 'datasets' (pip install datasets)") from None
    from datasets import load_dataset

    return load_dataset(name, config, split=split, cache_dir=str(cache_dir() / "hf"))
