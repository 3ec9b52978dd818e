"""Datasets and the loader: the IDX reader on real and broken files, subsets, shuffling, augmentation."""

import gzip
import hashlib
import shutil
import struct

import numpy as np
import pytest
import torch

from bnlab import data
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
    images = data.read_idx(data._find_file(FASHION, "t10k-images-idx3-ubyte"))
    labels = data.read_idx(data._find_file(FASHION, "t10k-labels-idx1-ubyte"))
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
    target = data._find_file(tmp_path, "train-labels-idx1-ubyte")
    raw = bytearray(gzip.decompress(target.read_bytes()) if target.suffix == ".gz" else target.read_bytes())
    raw[100] ^= 1  # one flipped bit: still a valid IDX file, but not Fashion-MNIST
    target.unlink()
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte: checksum mismatch"):
        data.load("fashion-mnist", data_dir=tmp_path)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with pytest.raises(data.DatasetNotFoundError, match="not found in.*apt-get install dataset-fashion-mnist"):
        data.load("fashion-mnist", download=False)


def test_generated_datasets():
    digits = data.load("digits")
    assert digits.train_x.shape == (1437, 1, 8, 8) and len(digits.test_y) == 360
    assert digits.train_y.bincount().sum() == 1437 and not digits.augment
    synthetic = data.load("synthetic")
    assert synthetic.num_classes == 4 and synthetic.train_x.shape[1:] == (1, 8, 8)
    assert torch.equal(data.load("synthetic").train_x, synthetic.train_x)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        data.load("imagenet")


def test_mnist1d_matches_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path))
    import mnist1d.data
    made = []
    original = mnist1d.data.make_dataset
    monkeypatch.setattr(mnist1d.data, "make_dataset", lambda args: made.append(original(args)) or made[-1])
    for attempt in range(2):  # generated by the package, then read back from the cache
        ds = data.load("mnist1d")
        reference = made[0]
        assert ds.train_x.shape == (4000, 1, 40) and ds.test_x.shape == (1000, 1, 40)
        np.testing.assert_array_equal(ds.train_y.numpy(), reference["y"])
        x = reference["x"]
        np.testing.assert_allclose(ds.test_x[:, 0].numpy(), (reference["x_test"] - x.mean()) / x.std(ddof=1),
                                   rtol=1e-4, atol=1e-4)
    assert len(made) == 1 and (tmp_path / "mnist1d").is_dir()


def test_loader_shuffles_a_permutation_each_epoch():
    x = torch.arange(103, dtype=torch.float32).view(-1, 1, 1, 1)
    y = torch.arange(103)
    loader = data.Loader(x, y, batch_size=10, drop_last=False, seed=1)
    epochs = [torch.cat([yb for _, yb in loader]) for _ in range(2)]
    assert len(loader) == 11
    for seen in epochs:
        assert sorted(seen.tolist()) == list(range(103))          # every example exactly once
    assert not torch.equal(epochs[0], epochs[1])                    # a new order each epoch
    dropped = data.Loader(x, y, batch_size=10, drop_last=True, seed=1)
    assert len(dropped) == 10 and all(len(yb) == 10 for _, yb in dropped)
    for xb, yb in data.Loader(x, y, batch_size=10, seed=1):
        assert torch.equal(xb.flatten().long(), yb)                 # x and y stay paired


def test_loader_never_yields_a_batch_of_one_silently():
    x, y = torch.zeros(21, 1, 2, 2), torch.zeros(21, dtype=torch.long)
    loader = data.Loader(x, y, batch_size=10, drop_last=False)
    assert len(loader) == 2
    with pytest.warns(RuntimeWarning, match="batch of 1"):
        sizes = [len(yb) for _, yb in loader]
    assert sizes == [10, 10]


def test_loader_epoch_order_depends_only_on_seed_and_epoch():
    x, y = torch.randn(50, 1, 4, 4), torch.arange(50)
    a = data.Loader(x, y, 8, augment=True, seed=5)
    first = [list(a), list(a)]
    b = data.Loader(x, y, 8, augment=True, seed=5)
    b.epoch = 1
    for (xa, ya), (xb, yb) in zip(first[1], b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_augmentation_keeps_shapes_labels_and_content():
    torch.manual_seed(0)
    x = torch.rand(64, 2, 9, 9) + 1      # strictly positive, so padding zeros are recognisable
    y = torch.arange(64)
    loader = data.Loader(x, y, 16, shuffle=False, augment=True, crop_padding=2, seed=0)
    for xb, yb in loader:
        assert xb.shape == (16, 2, 9, 9) and xb.dtype == x.dtype
        for image, label in zip(xb, yb):
            original = x[label]
            # the crop must equal a shifted window of the zero-padded original, possibly flipped
            padded = torch.nn.functional.pad(original, [2, 2, 2, 2])
            windows = [padded[:, i:i + 9, j:j + 9] for i in range(5) for j in range(5)]
            assert any(torch.equal(image, w) or torch.equal(image, w.flip(-1)) for w in windows)
    flips = data.Loader(x, y, 64, shuffle=False, augment="flip", seed=0)
    xb, yb = next(iter(flips))
    flipped = [torch.equal(a, b.flip(-1)) for a, b in zip(xb, x)]
    unchanged = [torch.equal(a, b) for a, b in zip(xb, x)]
    assert all(f or u for f, u in zip(flipped, unchanged)) and 10 < sum(flipped) < 54


def test_sequence_crop_and_sharding():
    x, y = torch.rand(40, 1, 12) + 1, torch.arange(40)
    xb, yb = next(iter(data.Loader(x, y, 40, shuffle=False, augment="crop", crop_padding=3)))
    assert xb.shape == (40, 1, 12)
    for row, label in zip(xb, yb):
        padded = torch.nn.functional.pad(x[label], [3, 3])
        assert any(torch.equal(row, padded[:, i:i + 12]) for i in range(7))
    shards = [torch.cat([b for _, b in data.Loader(x, y, 5, drop_last=False, seed=2, rank=r, world_size=3)]) for r in range(3)]
    union = torch.cat(shards)
    assert len(union) == 39 and len(set(union.tolist())) == 39   # disjoint, equal-sized shards


def test_loader_argument_errors():
    x, y = torch.zeros(10, 1, 2, 2), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="differ in length"):
        data.Loader(x, y[:5], 2)
    with pytest.raises(ValueError, match="augment must be"):
        data.Loader(x, y, 2, augment="rotate")
    with pytest.raises(ValueError, match="no batch"):
        data.Loader(x, y, 20)


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

    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(url))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: checksum mismatch.*8d4fb7e6c68d591d4c3dfef9ec88bf0d"):
        data._download_fashion_mnist(tmp_path)
    assert requested == [data.FASHION_MNIST_URL + "train-images-idx3-ubyte.gz"]
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


def test_cifar_never_downloads_into_an_explicit_data_dir(tmp_path, monkeypatch):
    from bnlab import cifar
    monkeypatch.setattr(cifar, "download_archive", lambda name: pytest.fail("downloaded"))
    with pytest.raises(UserError, match=f"--data-dir {tmp_path / 'none'} \\(no such directory\\): cifar10: "
                                        "cifar-10-python.tar.gz not found"):
        data.load("cifar10", data_dir=tmp_path / "none")


def test_unknown_dataset_and_subset_are_user_errors():
    with pytest.raises(UserError, match="unknown dataset 'imagenet'"):
        data.load("imagenet")
    with pytest.raises(UserError, match="subset must be between 1 and the training-set size 512"):
        data.load("synthetic", subset=10_000)


def test_bnlab_data_is_also_the_cache_where_downloads_go(tmp_path, monkeypatch):
    """$BNLAB_DATA is authoritative (no other copy is used) but, being the cache, gets a missing copy
    downloaded into it; --data-dir never does."""
    fetched = []

    def offline(target):
        fetched.append(target)
        raise OSError("offline")

    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(data, "_download_fashion_mnist", offline)
    with pytest.raises(data.DatasetNotFoundError, match="the download from .* failed"):
        data.load("fashion-mnist")
    assert fetched == [tmp_path / "env" / "fashion-mnist"]
    with pytest.raises(data.DatasetNotFoundError, match="--data-dir"):
        data.load("fashion-mnist", data_dir=tmp_path / "env")
    assert len(fetched) == 1


def _images(n=20, channels=1, side=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, side, side, generator=g)
    y = torch.arange(n) % 4
    return data.Dataset("toy", x, y, x[:6].clone(), y[:6].clone(), 4, channels, "test", False)


@pytest.mark.parametrize("side,size", [(28, 14), (28, 7), (32, 8)])
def test_downsample_is_block_means_restandardized_against_numpy(side, size):
    ds = _images(channels=3 if side == 32 else 1, side=side)
    out = data.downsample(ds, size)
    f = side // size

    def blocks(x):  # float64 NumPy: the mean of each f×f block
        a = x.numpy().astype(np.float64)
        return a.reshape(a.shape[0], a.shape[1], size, f, size, f).mean(axis=(3, 5))
    train, test = blocks(ds.train_x), blocks(ds.test_x)
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True, ddof=1)
    np.testing.assert_allclose(out.train_x.numpy(), (train - mean) / std, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.test_x.numpy(), (test - mean) / std, rtol=1e-4, atol=1e-5)
    assert torch.equal(out.train_y, ds.train_y) and torch.equal(out.test_y, ds.test_y)


def test_downsample_pools_a_validation_split_with_the_training_statistics():
    ds = data.split_validation(_images(n=40), 8, seed=0)
    out = data.downsample(ds, 14)
    pooled = torch.nn.functional.avg_pool2d(torch.cat([ds.train_x, ds.val_x]), 2)
    train, val = pooled[:len(ds.train_x)], pooled[len(ds.train_x):]
    mean, std = train.mean((0, 2, 3), keepdim=True), train.std((0, 2, 3), keepdim=True)
    torch.testing.assert_close(out.val_x, (val - mean) / std)
    assert torch.equal(out.val_y, ds.val_y)


def test_downsample_never_upsamples_and_rejects_sequences():
    ds = _images(side=8)
    assert data.downsample(ds, 8) is ds and data.downsample(ds, 14) is ds
    seq = data.Dataset("mnist1d", torch.zeros(4, 1, 40), torch.zeros(4, dtype=torch.long), torch.zeros(2, 1, 40),
                       torch.zeros(2, dtype=torch.long), 10, 1, "test", False)
    with pytest.raises(ValueError, match=r"mnist1d holds 1-D examples \(1, 40\), expected images"):
        data.downsample(seq, 14)
    with pytest.raises(ValueError, match="size must be a positive"):
        data.downsample(ds, 0)


@pytest.mark.parametrize("name", ["mnist1d", "digits", "synthetic"])
def test_registry_shapes_and_sizes_match_what_load_returns(name):
    ds = data.load(name)
    assert data.example_shape(name) == tuple(ds.train_x.shape[1:]) == tuple(ds.test_x.shape[1:])
    assert data.split_sizes(name) == (len(ds.train_y), len(ds.test_y))
    assert data.is_image(name) == (ds.train_x.dim() == 4)


@pytest.mark.skipif(data.locate("fashion-mnist") is None, reason="Fashion-MNIST files are not installed")
def test_fashion_mnist_registry_matches_the_files():
    ds = data.load("fashion-mnist", download=False)
    assert data.example_shape("fashion-mnist") == tuple(ds.train_x.shape[1:]) == (1, 28, 28)
    assert data.split_sizes("fashion-mnist") == (len(ds.train_y), len(ds.test_y)) == (60000, 10000)
