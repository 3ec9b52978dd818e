"""CIFAR-10/100 archives (bnlab.data.cifar): parsing, normalization, checksums, broken archives, hostile
pickles, downloading.

The archives here are built by hand in the official format: same member names, Python 2 pickles (protocol 2,
byte strings, NumPy arrays as NumPy 1 pickled them) with the same keys and dtypes, a few images per batch.
"""

import hashlib
import http.server
import io
import json
import pickle
import pickletools
import struct
import tarfile
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from bnlab import cli, data
from bnlab.data import cifar
from bnlab.errors import UserError

# --------------------------------------------------------------------------------------------------
# official-format archives
# --------------------------------------------------------------------------------------------------


def _py2_str(b: bytes) -> bytes:
    """A Python 2 ``str`` as cPickle writes it: SHORT_BINSTRING or BINSTRING."""
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def _py2_int(v: int) -> bytes:
    return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)


def _py2_value(v) -> bytes:
    if isinstance(v, bytes):
        return _py2_str(v)
    if isinstance(v, int):
        return _py2_int(v)
    if isinstance(v, list):
        return b"](" + b"".join(_py2_value(item) for item in v) + b"e"            # EMPTY_LIST MARK ... APPENDS
    if isinstance(v, np.ndarray):  # as NumPy 1 under Python 2: _reconstruct(ndarray, (0,), 'b') + __setstate__
        assert v.dtype == np.uint8 and v.ndim == 2
        dtype = (b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R"          # dtype('u1', 0, 1)
                 b"(K\x03" + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
        shape = _py2_int(v.shape[0]) + b"M" + struct.pack("<H", v.shape[1]) + b"\x86"
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b") + b"\x87R"
                b"(K\x01" + shape + dtype + b"\x89" + _py2_str(v.tobytes()) + b"tb")
    raise TypeError(type(v))


def py2_pickle(batch: dict) -> bytes:
    """``batch`` pickled the way CIFAR's files were (Python 2 cPickle, protocol 2)."""
    items = b"".join(_py2_value(k) + _py2_value(v) for k, v in batch.items())
    return b"\x80\x02}(" + items + b"u."


def write_archive(path, members: dict) -> bytes:
    """A ``.tar.gz`` with a directory entry and the given ``{name: bytes}`` members; returns its bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        folder = tarfile.TarInfo(next(iter(members)).split("/")[0])
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def make_cifar10(directory, per_batch=4, seed=0):
    """An official-format ``cifar-10-python.tar.gz`` in ``directory``: ``(path, raw images, labels)``."""
    rng = np.random.default_rng(seed)
    members, images, labels = {}, {}, {}
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images[batch] = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels[batch] = [int(v) for v in rng.integers(0, 10, per_batch)]
        members[f"cifar-10-batches-py/{batch}"] = py2_pickle({
            b"batch_label": f"batch {batch}".encode(), b"labels": labels[batch], b"data": images[batch],
            b"filenames": [f"img_{batch}_{i}.png".encode() for i in range(per_batch)]})
    members["cifar-10-batches-py/batches.meta"] = py2_pickle({
        b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
                         b"ship", b"truck"], b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    members["cifar-10-batches-py/readme.html"] = b"<html></html>"
    path = directory / "cifar-10-python.tar.gz"
    write_archive(path, members)
    return path, images, labels


def make_cifar100(directory, n_train=6, n_test=3, seed=1):
    rng = np.random.default_rng(seed)
    members, images, fine = {}, {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        images[split] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine[split] = [int(v) for v in rng.integers(20, 100, n)]  # never a coarse label (0..19)
        members[f"cifar-100-python/{split}"] = py2_pickle({
            b"filenames": [f"{split}_{i}.png".encode() for i in range(n)], b"batch_label": split.encode(),
            b"fine_labels": fine[split], b"coarse_labels": [v % 20 for v in fine[split]], b"data": images[split]})
    members["cifar-100-python/meta"] = py2_pickle({b"fine_label_names": [b"apple"] * 100,
                                                   b"coarse_label_names": [b"fish"] * 20})
    path = directory / "cifar-100-python.tar.gz"
    write_archive(path, members)
    return path, images, fine


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def trust(monkeypatch, name, path):
    """Make ``path`` the archive whose MD5 counts as published (the hand-built ones have other sums)."""
    monkeypatch.setitem(cifar.ARCHIVES, name, replace(cifar.ARCHIVES[name], md5=md5(path)))


@pytest.fixture(autouse=True)
def private_dirs(tmp_path, monkeypatch):
    """No test sees the real cache or the network's official address."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "bnlab-data"))
    monkeypatch.setenv("BNLAB_CIFAR_URL", "http://127.0.0.1:9/")  # discard port: nothing listens
    monkeypatch.setattr(cifar, "_PARSED", {})


# --------------------------------------------------------------------------------------------------
# parsing and normalization
# --------------------------------------------------------------------------------------------------

def test_the_test_pickles_are_what_python2_wrote():
    # the writer above emits Python 2's opcodes: byte strings (not BINBYTES) and numpy.core globals
    raw = py2_pickle({b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [1, 300]})
    ops = {op.name for op, _, _ in pickletools.genops(raw)}
    assert {"SHORT_BINSTRING", "GLOBAL", "REDUCE", "BUILD"} <= ops and "BINBYTES" not in ops
    plain = pickle.loads(raw, encoding="bytes")   # the standard unpickler agrees on what it holds
    np.testing.assert_array_equal(plain[b"data"], [[0, 1, 2], [3, 4, 5]])
    assert plain[b"data"].dtype == np.uint8 and plain[b"labels"] == [1, 300]


def test_cifar10_pixels_follow_the_published_layout(tmp_path, monkeypatch):
    path, images, labels = make_cifar10(tmp_path)
    trust(monkeypatch, "cifar10", path)
    arrays, source = cifar.load_arrays("cifar10", data_dir=tmp_path, download=False)
    assert source == str(path)
    assert arrays["train_x"].shape == (20, 3, 32, 32) and arrays["train_x"].dtype == np.uint8
    assert arrays["test_x"].shape == (4, 3, 32, 32) and arrays["train_y"].dtype == np.int64
    # image i of the training set is image i % 4 of data_batch_{i // 4 + 1}; its 3072 bytes are the red,
    # green and blue 1024-byte planes, each 32 rows of 32 pixels
    for i, c, row, col in [(0, 0, 0, 0), (5, 1, 7, 30), (19, 2, 31, 31), (12, 0, 31, 0)]:
        batch = images[f"data_batch_{i // 4 + 1}"][i % 4]
        assert arrays["train_x"][i, c, row, col] == batch[c * 1024 + row * 32 + col]
    assert arrays["test_x"][3, 2, 10, 11] == images["test_batch"][3][2 * 1024 + 10 * 32 + 11]
    expected = sum((labels[f"data_batch_{b}"] for b in range(1, 6)), [])
    assert arrays["train_y"].tolist() == expected and arrays["test_y"].tolist() == labels["test_batch"]


def test_cifar10_dataset_is_normalized_with_training_statistics(tmp_path, monkeypatch):
    path, images, labels = make_cifar10(tmp_path)
    trust(monkeypatch, "cifar10", path)
    ds = data.load("CIFAR-10", data_dir=tmp_path, download=False)
    assert (ds.name, ds.num_classes, ds.in_channels, ds.augment, ds.crop_padding) == ("cifar10", 10, 3, True, 4)
    # oracle: float64 NumPy straight from the raw bytes
    train = np.concatenate([images[f"data_batch_{b}"] for b in range(1, 6)]).reshape(-1, 3, 1024).astype(np.float64)
    test = images["test_batch"].reshape(-1, 3, 1024).astype(np.float64)
    mean = train.mean(axis=(0, 2), keepdims=True)
    std = train.std(axis=(0, 2), ddof=1, keepdims=True)
    np.testing.assert_allclose(ds.train_x.reshape(-1, 3, 1024).numpy(), (train - mean) / std, atol=1e-5)
    np.testing.assert_allclose(ds.test_x.reshape(-1, 3, 1024).numpy(), (test - mean) / std, atol=1e-5)
    assert ds.train_x.dtype == torch.float32 and ds.test_y.tolist() == labels["test_batch"]


def test_cifar100_uses_the_fine_labels(tmp_path, monkeypatch):
    (tmp_path / "cifar").mkdir()
    path, images, fine = make_cifar100(tmp_path / "cifar")
    trust(monkeypatch, "cifar100", path)
    ds = data.load("cifar100", data_dir=tmp_path, download=False)  # found in <data_dir>/cifar/
    assert ds.num_classes == 100 and ds.source == str(path)
    assert ds.train_y.tolist() == fine["train"] and ds.test_y.tolist() == fine["test"]
    assert ds.train_x.shape == (6, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)


def test_loader_crops_cifar_with_four_pixels_of_padding(tmp_path, monkeypatch):
    path, _, _ = make_cifar10(tmp_path)
    trust(monkeypatch, "cifar10", path)
    ds = data.load("cifar10", data_dir=tmp_path, download=False)
    x = torch.ones(64, 3, 32, 32)
    xb, _ = next(iter(data.Loader(x, torch.zeros(64), 64, shuffle=False, augment="crop",
                                  crop_padding=ds.crop_padding)))
    # a crop shifted by s pixels shows s rows (or columns) of zero padding: 4 at most, and 4 occurs
    zero_rows = (xb.sum(dim=(1, 3)) == 0).sum(dim=1)
    assert zero_rows.max() == 4


# --------------------------------------------------------------------------------------------------
# broken and hostile archives
# --------------------------------------------------------------------------------------------------

def test_checksum_mismatch_names_the_archive(tmp_path):
    path, _, _ = make_cifar10(tmp_path)   # a well-formed archive, but not the published one
    with pytest.raises(UserError, match=f"{path}: checksum mismatch.*expected c58f30108f718f92721af3b95e74349a"
                                        ".*Delete it and download https://www.cs.toronto.edu/~kriz/"):
        data.load("cifar10", data_dir=tmp_path, download=False)


@pytest.mark.parametrize("keep", ["half", "all but the gzip trailer"])
def test_truncated_archive_is_a_clear_error(tmp_path, monkeypatch, keep):
    path, _, _ = make_cifar10(tmp_path)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2 if keep == "half" else size - 8])
    with pytest.raises(UserError, match="checksum mismatch"):     # what a user meets first
        cifar.load_arrays("cifar10", data_dir=tmp_path, download=False)
    trust(monkeypatch, "cifar10", path)                           # and past the checksum
    with pytest.raises(UserError, match=f"{path}: cannot read the archive.*truncated or corrupt"):
        cifar.load_arrays("cifar10", data_dir=tmp_path, download=False)


def test_missing_member_and_malformed_batches_are_named(tmp_path):
    rng = np.random.default_rng(0)
    good = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 2]}
    cases = {
        "missing": ({"cifar-10-batches-py/test_batch": py2_pickle(good)}, "missing cifar-10-batches-py/data_batch_1"),
        "shape": ({b"data": good[b"data"][:, :3000], b"labels": [1, 2]}, r"must be a uint8 array of shape \(N, 3072\)"),
        "labels": ({b"data": good[b"data"], b"labels": [1]}, "2 images but 1 labels"),
        "range": ({b"data": good[b"data"], b"labels": [1, 10]}, r"labels must lie in \[0, 10\)"),
        "keys": ({b"pixels": good[b"data"]}, "expected a dict with keys b'data' and b'labels'"),
    }
    for case, (content, message) in cases.items():
        directory = tmp_path / case
        directory.mkdir()
        members = content if case == "missing" else {
            f"cifar-10-batches-py/{b}": py2_pickle(content if b == "data_batch_3" else good)
            for b in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
        path = directory / "cifar-10-python.tar.gz"
        write_archive(path, members)
        where = "" if case == "missing" else ":cifar-10-batches-py/data_batch_3"
        with pytest.raises(UserError, match=f"{path}{where}: .*{message}"):
            cifar.read_archive(path, "cifar10", md5=md5(path))


def test_a_pickle_that_calls_code_is_refused_not_run(tmp_path):
    victim = tmp_path / "created-by-the-pickle"
    hostile = b"cos\nmkdir\n(" + _py2_str(str(victim).encode()) + b"tR."  # os.mkdir(victim) when unpickled
    members = {f"cifar-10-batches-py/{b}": hostile for b in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    path = tmp_path / "cifar-10-python.tar.gz"
    write_archive(path, members)
    with pytest.raises(UserError, match="data_batch_1: not a CIFAR batch.*refusing to load global os.mkdir"):
        cifar.read_archive(path, "cifar10", md5=md5(path))
    assert not victim.exists()


def test_not_found_without_download_says_where_it_looked(tmp_path):
    with pytest.raises(data.DatasetNotFoundError, match=f"cifar-100-python.tar.gz not found in {tmp_path}.*"
                                                         "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"):
        data.load("cifar100", data_dir=tmp_path, download=False)


def test_cifar_never_downloads_into_an_explicit_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "download_archive", lambda name: pytest.fail("downloaded"))
    with pytest.raises(UserError, match=f"--data-dir {tmp_path / 'none'} \\(no such directory\\): cifar10: "
                                        "cifar-10-python.tar.gz not found"):
        data.load("cifar10", data_dir=tmp_path / "none")


# --------------------------------------------------------------------------------------------------
# downloading, from a real HTTP server on this machine
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def server(tmp_path):
    """Serves ``tmp_path/served`` on 127.0.0.1; ``requests`` lists the paths asked for."""
    root = tmp_path / "served"
    root.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/", requests
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download_then_reuse_the_cache(tmp_path, monkeypatch, server):
    root, url, requests = server
    path, images, _ = make_cifar10(root)
    trust(monkeypatch, "cifar10", path)
    monkeypatch.setenv("BNLAB_CIFAR_URL", url)
    ds = data.load("cifar10")
    cached = tmp_path / "bnlab-data" / "cifar" / "cifar-10-python.tar.gz"   # $BNLAB_DATA/cifar
    assert requests == ["/cifar-10-python.tar.gz"] and ds.source == str(cached)
    assert cached.read_bytes() == path.read_bytes()
    assert [p.name for p in cached.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left
    monkeypatch.setattr(cifar, "_PARSED", {})    # a new process: found on disk, checked, parsed again
    again = data.load("cifar10")
    assert requests == ["/cifar-10-python.tar.gz"] and torch.equal(again.train_x, ds.train_x)


def test_concurrent_downloads_fetch_once(tmp_path, monkeypatch, server):
    root, url, requests = server
    path, _, _ = make_cifar10(root)
    trust(monkeypatch, "cifar10", path)
    barrier, results = threading.Barrier(3), []

    def fetch():  # as two ranks of one job would, each with its own lock on the same file
        barrier.wait()
        results.append(cifar.download_archive("cifar10", tmp_path / "cache", url=url.rstrip("/")))

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert requests == ["/cifar-10-python.tar.gz"] and len(set(results)) == 1 and len(results) == 3
    assert results[0].read_bytes() == path.read_bytes()


def test_a_corrupt_download_is_not_saved(tmp_path, monkeypatch, server):
    root, url, requests = server
    path, _, _ = make_cifar10(root)
    monkeypatch.setenv("BNLAB_CIFAR_URL", url)   # the served archive does not have the published MD5
    with pytest.raises(UserError, match=f"{url}cifar-10-python.tar.gz: checksum mismatch.*not saved"):
        data.load("cifar10")
    assert requests == ["/cifar-10-python.tar.gz"]
    left = sorted(p.name for p in (tmp_path / "bnlab-data" / "cifar").iterdir())
    assert left == ["cifar-10-python.tar.gz.lock"]   # neither the archive nor a temporary file


def test_a_failed_download_says_how_to_fetch_the_archive(monkeypatch, server):
    _, url, requests = server   # serves nothing: 404
    monkeypatch.setenv("BNLAB_CIFAR_URL", url)
    with pytest.raises(data.DatasetNotFoundError, match=f"download from {url} failed.*404.*put it in"):
        data.load("cifar100")
    assert requests == ["/cifar-100-python.tar.gz"]


def test_datasets_command_lists_cifar(tmp_path, monkeypatch, capsys):
    make_cifar10(tmp_path)
    assert cli.main(["datasets", "--json", "--data-dir", str(tmp_path)]) == 0
    rows = {row["name"]: row["source"] for row in json.loads(capsys.readouterr().out)}
    assert rows["cifar10"] == str(tmp_path / "cifar-10-python.tar.gz")
    # an explicit --data-dir is the only place looked in and is never downloaded into (as data.load does)
    assert rows["cifar100"] == f"not in {tmp_path} (--data-dir, the only place looked in)"
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert cli.main(["datasets", "--json"]) == 0
    rows = {row["name"]: row["source"] for row in json.loads(capsys.readouterr().out)}
    assert rows["cifar100"] == f"not found; will download into {tmp_path / 'cache' / 'bnlab' / 'cifar'}"
