"""The loader (bnlab.data.loader): shuffling, batching, augmentation, sharding."""

import pytest
import torch

from bnlab import data


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
