"""The registry (bnlab.data.registry): names, errors, and shapes and sizes that match what load returns."""

import pytest

from bnlab import data
from bnlab.errors import UserError


def test_unknown_dataset_and_subset_are_user_errors():
    with pytest.raises(UserError, match="unknown dataset 'imagenet'"):
        data.load("imagenet")
    with pytest.raises(UserError, match="subset must be between 1 and the training-set size 512"):
        data.load("synthetic", subset=10_000)


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
