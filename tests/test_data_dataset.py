"""The dataset record's transforms (bnlab.data.dataset): downsampling against float64 NumPy, validation splits."""

import numpy as np
import pytest
import torch

from bnlab import data


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
