"""bnlab.nn.sync: synchronized batch norm over gloo with 2–3 CPU processes equals single-process batch
norm (torch.nn.BatchNorm, an independent implementation) on the concatenated batch — outputs, input
gradients, γ/β gradients summed over processes, running statistics — uneven and empty shards included."""

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bnlab import nn as bnn
from bnlab.nn import variants as V
from bnlab.tools import freeze as FZ
from bnlab.tools.accumulate import accumulate_bn_stats
from bnlab.nn.sync import SyncBatchNorm, SyncBatchRenorm, convert_sync_batchnorm

# (name, per-process batch sizes, per-sample shape after C, channels, layer kind)
SCENARIOS_3 = [
    ("uneven_2d", [4, 0, 3], (5, 4), 3, "bn"),
    ("one_each_1d", [1, 1, 1], (), 4, "bn"),
    ("uneven_seq", [2, 5, 1], (6,), 2, "bn"),
    ("renorm_2d", [3, 2, 0], (3, 3), 3, "renorm"),
]
STEPS = 2
# gradient accumulation under sync: per micro-batch, the batch size of each of the 3 processes
ACCUMULATE_SIZES = [[3, 0, 2], [1, 4, 2]]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(sizes, tail, channels, step):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(sum(sizes), channels, *tail, generator=gen, dtype=torch.float64) * 2 + 0.5
    upstream = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return x, upstream


def _make_layer(kind, channels, sync):
    if kind == "bn":
        layer = SyncBatchNorm(channels)
    if kind == "renorm":
        cls = SyncBatchRenorm if sync else V.BatchRenorm1d
        layer = cls(channels, rmax=1.5, dmax=0.5, warmup_steps=0, ramp_steps=0, momentum=0.3)
    layer = layer.double()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
        if kind == "renorm":   # running statistics far enough from the batch ones that r and d clip
            layer.running_mean.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
            layer.running_var.copy_(torch.rand(channels, generator=gen, dtype=torch.float64) * 4 + 0.2)
    return layer


def _worker(rank, world, port, out_dir, scenarios):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for name, sizes, tail, channels, kind in scenarios:
            layer = _make_layer(kind, channels, sync=True)
            start = sum(sizes[:rank])
            steps = []
            for step in range(STEPS):
                x, upstream = _data(sizes, tail, channels, step)
                x = x[start:start + sizes[rank]].clone().requires_grad_(True)
                layer.weight.grad = layer.bias.grad = None
                y = layer(x)
                (y * upstream[start:start + sizes[rank]]).sum().backward()
                steps.append({"y": y.detach(), "dx": x.grad, "dw": layer.weight.grad.clone(),
                              "db": layer.bias.grad.clone(), "rm": layer.running_mean.clone(),
                              "rv": layer.running_var.clone(), "nbt": int(layer.num_batches_tracked)})
            layer.eval()
            x, _ = _data(sizes, tail, channels, 99)
            steps.append({"eval": layer(x[:2]).detach()})
            results[name] = steps
        if world == 3:
            layer = _make_layer("bn", 3, sync=True)
            with accumulate_bn_stats(layer):
                for micro, sizes in enumerate(ACCUMULATE_SIZES):
                    x, _ = _data(sizes, (2, 2), 3, 10 + micro)
                    start = sum(sizes[:rank])
                    layer(x[start:start + sizes[rank]])
            results["accumulate"] = {"rm": layer.running_mean.clone(), "rv": layer.running_var.clone(),
                                     "nbt": int(layer.num_batches_tracked)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(world, scenarios, tmp_path, timeout=120.0):
    ctx = mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path), scenarios), nprocs=world,
                             join=False, start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while not ctx.join(timeout=5):
            if datetime.datetime.now() > deadline:
                pytest.fail(f"the {world} gloo processes did not finish within {timeout} s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _reference(sizes, tail, channels, kind):
    """Single-process layer on the concatenated batch: torch.nn.BatchNorm for BN, BatchRenorm1d for renorm."""
    if kind == "bn":
        cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[len(tail)]
        layer = cls(channels).double()
        src = _make_layer(kind, channels, sync=True)
        layer.load_state_dict(src.state_dict())
    else:
        layer = _make_layer(kind, channels, sync=False)
    steps = []
    for step in range(STEPS):
        x, upstream = _data(sizes, tail, channels, step)
        x.requires_grad_(True)
        layer.weight.grad = layer.bias.grad = None
        y = layer(x.view(x.shape[0], channels, -1) if kind == "renorm" and tail else x)
        y = y.view(x.shape)
        (y * upstream).sum().backward()
        steps.append({"y": y.detach(), "dx": x.grad, "dw": layer.weight.grad.clone(), "db": layer.bias.grad.clone(),
                      "rm": layer.running_mean.clone(), "rv": layer.running_var.clone(),
                      "nbt": int(layer.num_batches_tracked)})
    layer.eval()
    x, _ = _data(sizes, tail, channels, 99)
    x = x[:2]
    steps.append({"eval": layer(x.view(2, channels, -1) if kind == "renorm" and tail else x).view(x.shape).detach()})
    return steps


@pytest.fixture(scope="module")
def three_process_results(tmp_path_factory):
    return _run(3, SCENARIOS_3, tmp_path_factory.mktemp("sync3"))


@pytest.mark.parametrize("scenario", SCENARIOS_3, ids=[s[0] for s in SCENARIOS_3])
def test_sync_equals_single_process_on_the_union(three_process_results, scenario):
    name, sizes, tail, channels, kind = scenario
    expected = _reference(sizes, tail, channels, kind)
    for step in range(STEPS):
        ranks = [r[name][step] for r in three_process_results]
        exp = expected[step]
        torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), exp["y"])
        torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), exp["dx"])
        torch.testing.assert_close(sum(r["dw"] for r in ranks), exp["dw"])   # DDP sums/averages these
        torch.testing.assert_close(sum(r["db"] for r in ranks), exp["db"])
        for r in ranks:
            torch.testing.assert_close(r["rm"], exp["rm"])
            torch.testing.assert_close(r["rv"], exp["rv"])
            assert r["nbt"] == exp["nbt"]
    for r in three_process_results:
        torch.testing.assert_close(r[name][STEPS]["eval"], expected[STEPS]["eval"])


def test_accumulated_sync_statistics_equal_one_full_batch(three_process_results):
    full = nn.BatchNorm2d(3).double()
    full(torch.cat([_data(sizes, (2, 2), 3, 10 + micro)[0] for micro, sizes in enumerate(ACCUMULATE_SIZES)]))
    for r in three_process_results:
        torch.testing.assert_close(r["accumulate"]["rm"], full.running_mean)
        torch.testing.assert_close(r["accumulate"]["rv"], full.running_var)
        assert r["accumulate"]["nbt"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("world,scenarios", [
    (2, [("two", [5, 2], (3,), 4, "bn"), ("two_empty", [0, 4], (2, 2), 2, "bn")]),
    (4, [("four", [3, 0, 1, 6], (2, 3), 2, "bn"), ("four_renorm", [2, 2, 0, 5], (4,), 3, "renorm")]),
])
def test_sync_with_two_and_four_processes(tmp_path, world, scenarios):
    results = _run(world, scenarios, tmp_path)
    for name, sizes, tail, channels, kind in scenarios:
        expected = _reference(sizes, tail, channels, kind)
        for step in range(STEPS):
            torch.testing.assert_close(torch.cat([r[name][step]["y"] for r in results]), expected[step]["y"])
            torch.testing.assert_close(torch.cat([r[name][step]["dx"] for r in results]), expected[step]["dx"])
            torch.testing.assert_close(sum(r[name][step]["dw"] for r in results), expected[step]["dw"])
            for r in results:
                torch.testing.assert_close(r[name][step]["rv"], expected[step]["rv"])


# --------------------------------------------------------------------------------------------------
# single process: conversion and fallback
# --------------------------------------------------------------------------------------------------

class _Custom(bnn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_convert_keeps_state_switches_and_variants():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), bnn.BatchNorm2d(4), V.GhostBatchNorm2d(4, 2),
                          V.BatchRenorm2d(4, rmax=2.0, warmup_steps=3), nn.Flatten(), nn.Linear(4, 3),
                          bnn.BatchNorm1d(3), nn.SyncBatchNorm(3))
    model(torch.randn(4, 3, 1, 1))
    FZ.freeze_stats(model[2])
    model[7].weight.requires_grad_(False)
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    convert_sync_batchnorm(model)
    assert [type(m) for m in model] == [nn.Conv2d, SyncBatchNorm, SyncBatchNorm, V.GhostBatchNorm2d, SyncBatchRenorm,
                                        nn.Flatten, nn.Linear, SyncBatchNorm, nn.SyncBatchNorm]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])
    assert model[2].use_batch_stats is False and model[2].update_running_stats is False
    assert model[1].use_batch_stats is None and not model[1].training
    assert (model[4].rmax, model[4].warmup_steps) == (2.0, 3)
    assert not model[7].weight.requires_grad
    with pytest.raises(TypeError, match="layer 1 is a _Custom"):
        convert_sync_batchnorm(nn.Sequential(nn.Identity(), _Custom(3)))


def test_sync_layers_without_process_group_are_plain_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    sync, plain = SyncBatchNorm(3).double(), nn.BatchNorm2d(3).double()
    torch.testing.assert_close(sync(x), plain(x))
    torch.testing.assert_close(sync.running_var, plain.running_var)
    with pytest.raises(ValueError, match="SyncBatchNorm\\(3\\): expected 2D or 3D or 4D or 5D input \\(got 6D"):
        sync(torch.randn(2, 3, 1, 1, 1, 1))
