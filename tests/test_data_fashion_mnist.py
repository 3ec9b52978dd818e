"""Fashion-MNIST (bnlab.data.fashion_mnist): the IDX reader on real and broken files, the search order,
explicit directories, checksums and downloading."""

import gzip
import hashlib
import shutil
import struct

import numpy as np
import pytest
import torch

from bnlab import data
from bnlab.data import fashion_mnist
from bnlab.errors import UserError

FASHION = data.locate("fashion-mnist")
needs_fashion = pytest.mark.skipif(FASHION is None, reason="no Fashion-MNIST copy on this machine "
                                   "(apt-get install dataset-fashion-mnist, or set BNLAB_DATA)")


def write_idx(path, array, type_code=0x08, compress=False):
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">i", s) for s in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return payload


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype,code", [(np.uint8, 0x08), (np.int16, 0x0B), (np.float32, 0x0D), (np.float64, 0x0E)])
def test_idx_roundtrip_by_hand(tmp_path, compress, dtype, code):
    array = (np.arange(2 * 3 * 5) % 200).astype(dtype).reshape(2, 3, 5)
    path = tmp_path / "a.idx"
    payload = write_idx(path, array, code, compress)
    np.testing.assert_array_equal(data.read_idx(path), array)
    np.testing.assert_array_equal(data.read_idx(path, hashlib.sha256(payload).hexdigest()), array)


def test_idx_errors_name_the_file(tmp_path):
    good = tmp_path / "good"
    write_idx(good, np.zeros((4, 3, 3), np.uint8))
    raw = good.read_bytes()
    cases = {"magic": b"\x08\x03" + raw[2:], "typecode": raw[:2] + b"\x42" + raw[3:],
             "truncated": raw[:-5], "short_header": raw[:6], "trailing": raw + b"\0"}
    messages = {"magic": "not an IDX file", "typecode": "not an IDX file", "truncated": "truncated",
                "short_header": "truncated IDX header", "trailing": "trailing data"}
    for name, content in cases.items():
        path = tmp_path / f"{name}-images-idx3-ubyte"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"{path.name}.*{messages[name]}.*apt-get install dataset-fashion-mnist"):
            data.read_idx(path)
    gz = tmp_path / "cut.gz"
    gz.write_bytes(gzip.compress(raw)[:-9])
    with pytest.raises(ValueError, match="cut.gz: cannot decompress"):
        data.read_idx(gz)
    with pytest.raises(ValueError, match="good: checksum mismatch"):
        data.read_idx(good, "0" * 64)
    with pytest.raises(FileNotFoundError, match="missing: no such file"):
        data.read_idx(tmp_path / "missing")


@needs_fashion
def test_fashion_mnist_real_files():
    images = data.read_idx(fashion_mnist.find_file(FASHION, "t10k-images-idx3-ubyte"))
    labels = data.read_idx(fashion_mnist.find_file(FASHION, "t10k-labels-idx1-ubyte"))
    # Xiao et al. 2017: 10,000 test images of 28x28 grey pixels, 1,000 per class
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10


@needs_fashion
def test_fashion_mnist_load_subset_and_normalization(tmp_path, monkeypatch):
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    ds = data.load("fashion-mnist", subset=1000, seed=3)
    assert ds.train_x.shape == (1000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_y.bincount().tolist() == [100] * 10
    assert ds.in_channels == 1 and ds.num_classes == 10 and ds.augment
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    # normalized with the full training set's statistics: the test set comes out near mean 0, std 1
    assert abs(ds.test_x.mean().item()) < 0.05 and abs(ds.test_x.std().item() - 1) < 0.05
    again = data.load("fashion-mnist", subset=1000, seed=3)
    assert torch.equal(again.train_x, ds.train_x)
    assert not torch.equal(data.load("fashion-mnist", subset=1000, seed=4).train_y, ds.train_y)


@needs_fashion
def test_corrupt_copy_in_data_dir_is_named(tmp_path):
    for f in FASHION.iterdir():
        shutil.copy(f, tmp_path / f.name)
    target = fashion_mnist.find_file(tmp_path, "train-labels-idx1-ubyte")
    raw = bytearray(gzip.decompress(target.read_bytes()) if target.suffix == ".gz" else target.read_bytes())
    raw[100] ^= 1  # one flipped bit: still a valid IDX file, but not Fashion-MNIST
    target.unlink()
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte: checksum mismatch"):
        data.load("fashion-mnist", data_dir=tmp_path)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "nowhere")
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with pytest.raises(data.DatasetNotFoundError, match="not found in.*apt-get install dataset-fashion-mnist"):
        data.load("fashion-mnist", download=False)


@needs_fashion
def test_search_order_data_dir_then_env_then_cache(tmp_path, monkeypatch):
    first, second = tmp_path / "given", tmp_path / "env" / "fashion-mnist"
    for directory in (first, second):
        directory.mkdir(parents=True)
        for f in FASHION.iterdir():
            (directory / f.name).symlink_to(f)
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "env"))
    assert data.locate("fashion-mnist") == second
    assert data.locate("fashion-mnist", data_dir=first) == first
    monkeypatch.delenv("BNLAB_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.locate("fashion-mnist") == FASHION
    # an explicit directory is authoritative: without the files there, nothing else is looked at
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "nothing"))
    assert data.locate("fashion-mnist") is None


def test_download_checks_the_published_md5(tmp_path, monkeypatch):
    requested = []

    class FakeResponse:
        def __init__(self, url):
            requested.append(url)

        def read(self):
            return b"not the real file"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(fashion_mnist.urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(url))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: checksum mismatch.*8d4fb7e6c68d591d4c3dfef9ec88bf0d"):
        fashion_mnist.download_files(tmp_path)
    assert requested == [fashion_mnist.URL + "train-images-idx3-ubyte.gz"]
    assert list(tmp_path.iterdir()) == []     # nothing half-written is left behind


@pytest.mark.parametrize("via_env", [False, True])
def test_an_explicit_data_dir_is_authoritative(tmp_path, monkeypatch, via_env):
    """A missing --data-dir (or $BNLAB_DATA) directory, or one lacking a file, is an error naming both;
    bnlab never falls back to another copy (issue 10, item 6)."""
    monkeypatch.delenv("BNLAB_DATA", raising=False)

    def load(directory):
        if via_env:
            monkeypatch.setenv("BNLAB_DATA", str(directory))
            return data.load("fashion-mnist", download=False)
        return data.load("fashion-mnist", data_dir=directory, download=False)

    named = "\\$BNLAB_DATA" if via_env else "--data-dir"
    with pytest.raises(UserError, match=f"{named} {tmp_path / 'nonexistent'}: no such directory"):
        load(tmp_path / "nonexistent")
    partial = tmp_path / "partial"
    partial.mkdir()
    labels = np.zeros(4, np.uint8)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        write_idx(partial / stem, labels)
    with pytest.raises(UserError, match=f"{named} {partial}: fashion-mnist file t10k-labels-idx1-ubyte.*missing"):
        load(partial)
    assert issubclass(data.DatasetNotFoundError, FileNotFoundError)  # still what it was for callers


def test_bnlab_data_is_also_the_cache_where_downloads_go(tmp_path, monkeypatch):
    """$BNLAB_DATA is authoritative (no other copy is used) but, being the cache, gets a missing copy
    downloaded into it; --data-dir never does."""
    fetched = []

    def offline(target):
        fetched.append(target)
        raise OSError("offline")

    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(fashion_mnist, "download_files", offline)
    with pytest.raises(data.DatasetNotFoundError, match="the download from .* failed"):
        data.load("fashion-mnist")
    assert fetched == [tmp_path / "env" / "fashion-mnist"]
    with pytest.raises(data.DatasetNotFoundError, match="--data-dir"):
        data.load("fashion-mnist", data_dir=tmp_path / "env")
    assert len(fetched) == 1


def test_a_changed_type_byte_is_named_not_called_truncated(tmp_path):
    """Issue 21 item 5: Fashion-MNIST labels whose type byte went from 0x08 to 0x0b (int16) were reported as
    "truncated"; what is wrong is the type byte."""
    raw = bytearray(write_idx(tmp_path / "good", np.arange(6, dtype=np.uint8)))
    raw[2] = 0x0B
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte: wrong IDX type byte \(offset 2\): 0x0b "
                                        r"\(big-endian int16\), expected 0x08 \(unsigned byte\)"):
        data.read_idx(bad, type_code=0x08)
    # a reader that does not know the type still says the type byte is the likely damage
    with pytest.raises(UserError, match=r"truncated.*the size fits type byte 0x08 \(unsigned byte\)"):
        data.read_idx(bad)
    # and the dataset's own files are read expecting unsigned bytes
    copy = tmp_path / "copy"
    copy.mkdir()
    for stem in fashion_mnist.FILES:
        write_idx(copy / stem, np.zeros(3, np.uint8))
    raw = bytearray((copy / "train-images-idx3-ubyte").read_bytes())
    raw[2] = 0x0D
    (copy / "train-images-idx3-ubyte").write_bytes(bytes(raw))
    with pytest.raises(UserError, match=f"--data-dir {copy}: .*train-images-idx3-ubyte: wrong IDX type byte.*0x0d"):
        data.load("fashion-mnist", data_dir=copy, download=False)


def test_check_data_dir_reads_what_an_explicit_directory_holds(tmp_path, monkeypatch):
    """Issue 21 item 3: the up-front check of `bnlab study`, for --data-dir and for $BNLAB_DATA."""
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    data.check_data_dir(["fashion-mnist", "synthetic"])                 # no explicit directory: nothing to do
    with pytest.raises(UserError, match=f"--data-dir {tmp_path / 'none'}: no such directory"):
        data.check_data_dir(["fashion-mnist"], tmp_path / "none")
    data.check_data_dir(["synthetic", "digits"], tmp_path / "none")     # generated: nothing read from files
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "empty"))
    data.check_data_dir(["fashion-mnist"])        # the cache holds no copy yet: downloaded on first use, as before
    copy = tmp_path / "env"
    copy.mkdir()
    for stem in fashion_mnist.FILES:   # well-formed IDX files of two bytes each: not Fashion-MNIST's content
        (copy / f"{stem}.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x02ab"))
    monkeypatch.setenv("BNLAB_DATA", str(copy))
    with pytest.raises(UserError, match=rf"\$BNLAB_DATA {copy}: .*train-images-idx3-ubyte.gz: checksum mismatch"):
        data.check_data_dir(["fashion-mnist"])
