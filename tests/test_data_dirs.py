"""Where data live (bnlab.data.dirs): the cache, explicit directories and the search order, written out by hand."""

from pathlib import Path

import pytest

from bnlab.data import cifar, dirs, fashion_mnist
from bnlab.errors import UserError


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private home; neither $BNLAB_DATA nor $XDG_CACHE_HOME set."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return tmp_path / "home"


def test_cache_is_bnlab_data_then_xdg_then_home(tmp_path, monkeypatch, home):
    assert dirs.cache_dir() == home / ".cache" / "bnlab"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dirs.cache_dir() == tmp_path / "xdg" / "bnlab"
    monkeypatch.setenv("BNLAB_DATA", "~/data")
    assert dirs.cache_dir() == home / "data"
    assert dirs.cache_path("cifar") == home / "data" / "cifar"
    monkeypatch.setenv("BNLAB_DATA", "")  # set but empty: as if unset
    assert dirs.cache_dir() == tmp_path / "xdg" / "bnlab" and dirs.explicit_data_dir() is None


def test_explicit_dir_is_data_dir_then_bnlab_data(tmp_path, monkeypatch, home):
    assert dirs.explicit_data_dir() is None and dirs.explicit_data_dir("") is None
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "env"))
    assert dirs.explicit_data_dir() == (tmp_path / "env", "$BNLAB_DATA")
    assert dirs.explicit_data_dir("~/given") == (home / "given", "--data-dir")


def test_search_order_data_dir_then_bnlab_data_then_cache_then_system(tmp_path, monkeypatch, home):
    system = [Path("/usr/share/datasets/example")]
    cache = home / ".cache" / "bnlab"
    assert dirs.search_dirs(None, ("example", ""), system) == [cache / "example", cache, system[0]]
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "env"))     # authoritative: no cache, no system directory
    assert dirs.search_dirs(None, ("example", ""), system) == [tmp_path / "env" / "example", tmp_path / "env"]
    given = tmp_path / "given"
    assert dirs.search_dirs(given, ("example", ""), system) == [given / "example", given]
    assert dirs.within(given, ("", ".", "a")) == [given, given / "a"]  # each directory once


def test_each_source_searches_in_its_own_layouts(tmp_path, monkeypatch, home):
    cache = home / ".cache" / "bnlab"
    assert fashion_mnist.search_dirs() == [cache / "fashion-mnist", cache / "FashionMNIST" / "raw", cache,
                                           Path("/usr/share/datasets/fashion-mnist")]
    assert cifar.search_dirs() == [cache, cache / "cifar"]
    assert cifar.search_dirs(tmp_path) == [tmp_path, tmp_path / "cifar"]


def test_not_found_is_a_user_error_and_a_file_not_found_error():
    assert issubclass(dirs.DatasetNotFoundError, UserError) and issubclass(dirs.DatasetNotFoundError,
                                                                           FileNotFoundError)
