"""companion.data: the offline loaders, and the download path exercised offline with file:// URLs."""
import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import zipfile

import pytest
import torch

from companion import data


def test_load_digits():
    x, y = data.load_digits()
    assert x.shape == (1797, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() == 1.0 and set(y.tolist()) == set(range(10))
    xi, _ = data.load_digits(images=True)
    assert xi.shape == (1797, 8, 8) and torch.equal(xi.reshape(-1, 64), x)


def test_augment_digits_shapes_range_and_reproducibility():
    x, _ = data.load_digits()
    a = data.augment_digits(x[:50], generator=torch.Generator().manual_seed(0))
    b = data.augment_digits(x[:50], generator=torch.Generator().manual_seed(0))
    assert a.shape == (50, 64) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
    assert not torch.equal(a, x[:50])
    clean = data.augment_digits(x[:50], max_shift=0, noise_std=0.0, drop_prob=0.0)
    assert torch.equal(clean, x[:50])  # no augmentation is the identity
    img = data.augment_digits(x[:5].reshape(-1, 8, 8), max_shift=2)
    assert img.shape == (5, 8, 8)


def test_augment_digits_shift_moves_pixels():
    x = torch.zeros(1, 8, 8)
    x[0, 4, 4] = 1.0
    g = torch.Generator().manual_seed(3)
    out = data.augment_digits(x, max_shift=1, noise_std=0.0, drop_prob=0.0, generator=g)
    (r, c), = (out[0] == 1).nonzero().tolist()
    assert abs(r - 4) <= 1 and abs(c - 4) <= 1 and out.sum() == 1


def test_augment_digits_bad():
    with pytest.raises(ValueError, match=r"x: expected shape \[N, 64\] or \[N, 8, 8\]"):
        data.augment_digits(torch.zeros(3, 10))
    with pytest.raises(ValueError, match="drop_prob"):
        data.augment_digits(torch.zeros(3, 64), drop_prob=1.5)


def test_stdlib_text():
    doc = data.stdlib_text()
    src = data.stdlib_text("source")
    assert len(doc) > 100_000 and len(src) > len(doc)
    assert src.count("\ndef ") > 10 * doc.count("\ndef ")  # docstrings, not code
    assert data.stdlib_text(max_chars=100) == doc[:100]
    with pytest.raises(ValueError, match="kind: expected 'docstrings' | 'source'"):
        data.stdlib_text("code")


def test_stdlib_text_is_frozen():
    """The corpus is shipped data, the same characters on every Python: its length, checksum
    and first paragraph are those of the files made from CPython 3.11.7."""
    import hashlib

    for kind, n in (("docstrings", 471_642), ("source", 2_541_144)):
        text = data.stdlib_text(kind)
        assert len(text) == n
        assert hashlib.sha256(text.encode("utf-8")).hexdigest() == data._CORPUS_SHA256[kind]
    assert data.stdlib_text().startswith("Abstract Base Classes (ABCs) according to PEP 3119.")
    assert (data._CORPUS_DIR / "PSF-LICENSE.txt").read_text().startswith("A. HISTORY OF THE SOFTWARE")


def test_stdlib_text_damaged_file_is_named(tmp_path, monkeypatch):
    import gzip

    (tmp_path / "stdlib_docstrings.txt.gz").write_bytes(gzip.compress(b"not the corpus"))
    monkeypatch.setattr(data, "_CORPUS_DIR", tmp_path)
    monkeypatch.setattr(data, "_CORPUS_CACHE", {})
    with pytest.raises(ValueError, match="stdlib_docstrings.txt.gz: checksum"):
        data.stdlib_text()
    monkeypatch.setattr(data, "_CORPUS_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="corpus is missing"):
        data.stdlib_text()


def test_char_vocab_round_trip():
    text = "hello, world"
    v = data.CharVocab.from_text(text)
    ids = v.encode(text)
    assert v.decode(ids) == text and len(v) == len(set(text)) + 2
    assert v.pad_id == len(set(text)) and v.mask_id == v.pad_id + 1
    with pytest.raises(ValueError, match="character 'z' is not in the vocabulary"):
        v.encode("z")


def test_lm_windows_are_shifted_slices():
    ids = torch.arange(100)
    x, y = data.lm_windows(ids, 10, 4, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 10)
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1)
    with pytest.raises(ValueError, match="need at least seq_len"):
        data.lm_windows(torch.arange(5), 10, 2)


def test_mask_tokens():
    ids = torch.arange(10_000) % 7
    corrupted, masked = data.mask_tokens(ids, 0.15, 99, generator=torch.Generator().manual_seed(0))
    assert abs(masked.float().mean().item() - 0.15) < 0.02
    assert torch.equal(corrupted[masked], torch.full((int(masked.sum()),), 99))
    assert torch.equal(corrupted[~masked], ids[~masked])


def test_gaussian_mixture_and_ring():
    g = torch.Generator().manual_seed(0)
    x, comp = data.gaussian_mixture(20_000, [[0.0, 0.0], [5.0, 5.0]], [0.5, 1.0], [1, 3], generator=g)
    assert x.shape == (20_000, 2)
    assert abs(comp.float().mean().item() - 0.75) < 0.02
    assert torch.allclose(x[comp == 1].mean(0), torch.tensor([5.0, 5.0]), atol=0.05)
    assert abs(x[comp == 0].std().item() - 0.5) < 0.02
    ring, centers = data.gaussian_ring(8000, num_modes=8, radius=2.0, std=0.05, generator=g)
    assert centers.shape == (8, 2) and torch.allclose(centers.norm(dim=1), torch.full((8,), 2.0))
    assert (ring.norm(dim=1) - 2.0).abs().max() < 0.4
    with pytest.raises(ValueError, match="stds, weights: expected 2 entries"):
        data.gaussian_mixture(5, [0.0, 1.0], [1.0], [1.0, 1.0])


def test_split_and_minibatches():
    x, y = torch.arange(100).float(), torch.arange(100)
    xtr, xte, ytr, yte = data.split(x, y, test_fraction=0.2, seed=1)
    assert len(xte) == 20 and len(xtr) == 80 and torch.equal(xtr.long(), ytr)
    assert sorted(torch.cat([ytr, yte]).tolist()) == list(range(100))
    stream = data.minibatches(x, y, batch_size=30, generator=torch.Generator().manual_seed(0))
    first_epoch = [next(stream) for _ in range(3)]
    seen = torch.cat([b[1] for b in first_epoch])
    assert len(set(seen.tolist())) == 90  # one permutation per epoch, partial batch dropped
    with pytest.raises(ValueError, match="tensors\\[1\\]: expected first dimension 100"):
        data.split(x, y[:5])


# ---- downloads, exercised offline on file:// URLs ----------------------------------------------
@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPANION_DATA", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_download_caches_and_checks_sha(tmp_path, cache):
    src = tmp_path / "hello.txt"
    src.write_bytes(b"hello")
    sha = hashlib.sha256(b"hello").hexdigest()
    path = data.download(src.as_uri(), sha256=sha)
    assert path.name == "hello.txt" and path.is_relative_to(cache) and path.read_bytes() == b"hello"
    src.unlink()  # now offline for this file: the cache answers
    assert data.download(src.as_uri(), sha256=sha) == path
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        other = tmp_path / "other.txt"
        other.write_bytes(b"bye")
        data.download(other.as_uri(), sha256=sha)
    assert not list(cache.rglob("other.txt"))  # nothing half-written is left in the cache
    assert not any(p.name.endswith(".part") for p in cache.rglob("*"))


def test_download_cache_is_keyed_by_the_whole_url(tmp_path, cache):
    for sub, body in (("a", b"first"), ("b", b"second")):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "data.bin").write_bytes(body)
    first = data.download((tmp_path / "a" / "data.bin").as_uri())
    second = data.download((tmp_path / "b" / "data.bin").as_uri())
    assert first != second
    assert first.read_bytes() == b"first" and second.read_bytes() == b"second"


def test_html_error_page_is_never_cached(tmp_path, cache):
    """A server answering with an HTML error page: rejected with the file named, not cached,
    and the next call (the real file now served) succeeds."""
    src = tmp_path / "train-images-idx3-ubyte.gz"
    src.write_bytes(b"<!DOCTYPE html><html><body>503 Service Unavailable</body></html>")
    with pytest.raises(RuntimeError, match="train-images-idx3-ubyte.gz from .* is an HTML page"):
        data.download(src.as_uri(), kind="gzip")
    assert not [p for p in cache.rglob("*") if p.is_file()]
    src.write_bytes(b"not gzip at all")
    with pytest.raises(RuntimeError, match="is not a gzip file"):
        data.download(src.as_uri(), kind="gzip")
    src.write_bytes(gzip.compress(b"ok"))
    assert gzip.decompress(data.download(src.as_uri(), kind="gzip").read_bytes()) == b"ok"


def test_corrupt_cached_file_is_fetched_again(tmp_path, cache):
    src = tmp_path / "x.zip"
    src.write_bytes(b"PK\x03\x04 good")
    path = data.download(src.as_uri(), kind="zip")
    path.write_bytes(b"<html>bad</html>")  # damaged in the cache
    assert data.download(src.as_uri(), kind="zip").read_bytes() == b"PK\x03\x04 good"


def test_download_offline_error_names_url_and_path(tmp_path, cache):
    url = (tmp_path / "missing.bin").as_uri()
    with pytest.raises(RuntimeError, match=r"could not download .*missing\.bin into .*cache"):
        data.download(url)
    with pytest.raises(ValueError, match="url: expected an absolute URL"):
        data.download("missing.bin")


def _idx(arr: torch.Tensor) -> bytes:
    header = bytes([0, 0, 0x08, arr.dim()]) + struct.pack(">" + "I" * arr.dim(), *arr.shape)
    return gzip.compress(header + arr.to(torch.uint8).numpy().tobytes())


def test_mnist_reader_on_small_files(tmp_path, cache):
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([3, 1, 4, 1, 5], dtype=torch.uint8)
    mirror = tmp_path / "mnist"
    mirror.mkdir()
    (mirror / "t10k-images-idx3-ubyte.gz").write_bytes(_idx(images))
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(_idx(labels))
    x, y = data.mnist("test", base_url=mirror.as_uri() + "/")
    assert x.shape == (5, 1, 28, 28) and torch.allclose(x[:, 0] * 255, images.float())
    assert y.tolist() == [3, 1, 4, 1, 5]
    with pytest.raises(RuntimeError, match="could not download"):
        data.mnist("train", base_url=mirror.as_uri() + "/")


def test_cifar10_reader_on_small_archive(tmp_path, cache):
    rng = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4, 3072), generator=rng, dtype=torch.uint8)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        payload = pickle.dumps({"data": pixels.numpy(), "labels": [0, 9, 2, 7]})
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(buf.getvalue())
    x, y = data.cifar10("test", url=archive.as_uri())
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 9, 2, 7]
    assert torch.allclose(x.reshape(4, -1) * 255, pixels.float())
    g, _ = data.cifar10("test", grayscale=True, url=archive.as_uri())
    assert g.shape == (4, 1, 32, 32)


def test_text8_and_enwik8_readers(tmp_path, cache):
    for name, reader in (("text8", data.text8), ("enwik8", data.enwik8)):
        archive = tmp_path / f"{name}.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr(name, "anarchism originated as a term")
        out = reader(url=archive.as_uri())
        assert (out if isinstance(out, str) else out.decode()) == "anarchism originated as a term"


def test_tinystories_reader(tmp_path, cache):
    mirror = tmp_path / "ts"
    mirror.mkdir()
    (mirror / "TinyStoriesV2-GPT4-valid.txt").write_text("Once upon a time.", encoding="utf-8")
    assert data.tinystories("valid", base_url=mirror.as_uri() + "/", max_chars=4) == "Once"
    with pytest.raises(ValueError, match="split"):
        data.tinystories("test")
