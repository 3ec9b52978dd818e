"""GPU benchmark: bnlab's Triton batch-norm kernels vs PyTorch eager, torch.compile and the bandwidth floor.

Batch norm is memory-bound, so every figure is set against a floor measured in the same run: the time to
move the tensor's bytes at this device's copy bandwidth (read + write, measured first). With S the tensor's
size in bytes, training forward needs 3S (read for the statistics, read again, write), forward+backward 8S
(backward: read x and dy for the two reductions, read them again and write dx), BN+ReLU 9S (the mask) and
BN+add+ReLU 10S (the residual and the mask).

Sections, in order:

1. device and copy bandwidth;
2. correctness, before any timing: for every case, ours and native eager against float64 (relative error
   max|a − ref| / max|ref| of y, dx, dγ, dβ, dresidual); if ours is off the timings still run, for
   diagnosis, and the script exits with status 1;
3. kernels: shapes × {bf16, fp32} × {channels_last, contiguous} × {BN fwd, BN fwd+bwd, BN+ReLU fwd+bwd,
   BN+add+ReLU fwd+bwd}: ours, native eager, torch.compile (``--compile``), the floor, and the ratios;
4. dispatch: bnlab.functional fwd+bwd on the Triton vs the PyTorch backend from tiny tensors up, to set
   ``bnlab.kernels.AUTO_MIN_NUMEL`` (where ``backend="auto"`` stays on PyTorch);
5. end to end: one SGD training step of ResNet-20 (CIFAR, 32×32) and ResNet-50 (224×224), bf16 autocast,
   channels_last, with bnlab batch norm on the Triton kernels and the fused BN+add+ReLU vs
   ``torch.nn.BatchNorm2d`` (needs :mod:`bnlab.models`; skipped with a note when it is absent).

Timing: ``triton.testing.do_bench`` (CUDA events, median of repeated runs, L2 flushed between runs). Runs in
about two to four minutes on an H100/H200 (torch.compile's compilations take most of it).

    python benchmarks/bn_gpu.py                  # everything
    python benchmarks/bn_gpu.py --compile none   # skip torch.compile
    python benchmarks/bn_gpu.py --quick          # two shapes, no end-to-end
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
import torch.nn.functional as torch_F

# (N, C, H, W): ResNet-50's first stage, CIFAR ResNet-20's first stage at batch 512, ResNet-50's third stage
SHAPES = [(128, 64, 56, 56), (512, 16, 32, 32), (256, 256, 14, 14)]
QUICK_SHAPES = [(128, 64, 56, 56), (256, 256, 14, 14)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = ("channels_last", "contiguous")
OPS = {  # name: passes over the tensor at the floor
    "BN fwd": 3,
    "BN fwd+bwd": 8,
    "BN+ReLU fwd+bwd": 9,
    "BN+add+ReLU fwd+bwd": 10,
}
EPS = 1e-5


# --------------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------------

def _require_cuda():
    if not torch.cuda.is_available():
        sys.exit("bn_gpu.py: no CUDA device found; this benchmark times GPU kernels and needs one "
                 "(the kernels' correctness on CPU is covered by tests/test_kernels.py under TRITON_INTERPRET=1)")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("bn_gpu.py: Triton is not installed (pip install triton)")


def _bench(fn) -> float:
    """Median milliseconds of ``fn`` (CUDA events, L2 flushed between runs)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in bytes/s, counting the read and the write."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def _make(shape, dtype, layout, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, device="cuda", generator=g).mul_(2).add_(0.5).to(dtype)
    r = torch.randn(shape, device="cuda", generator=g).to(dtype)
    dy = torch.randn(shape, device="cuda", generator=g).to(dtype)
    if layout == "channels_last":
        x, r, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, r, dy))
    C = shape[1]
    w = (torch.rand(C, device="cuda", generator=g) + 0.5).requires_grad_()
    b = (torch.randn(C, device="cuda", generator=g) * 0.1).requires_grad_()
    return x, r, dy, w, b


# --------------------------------------------------------------------------------------------------
# the implementations: each op as (forward, backward-inputs) for ours, native eager and compiled
# --------------------------------------------------------------------------------------------------

_RUNNING = {}


def _running_stats(w):
    """Running statistics for native batch norm, allocated once per shape (not inside the timed call)."""
    key = (w.shape[0], w.dtype, w.device)
    if key not in _RUNNING:
        _RUNNING[key] = (torch.zeros_like(w.detach()), torch.ones_like(w.detach()))
    return _RUNNING[key]


def _native(x, w, b, r, op):
    rm, rv = _running_stats(w)
    y = torch_F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=EPS)
    if op == "BN+add+ReLU fwd+bwd":
        y = torch.relu(y + r)
    elif op == "BN+ReLU fwd+bwd":
        y = torch.relu(y)
    return y


def _ours(x, w, b, r, op):
    from bnlab import kernels
    if op == "BN+add+ReLU fwd+bwd":
        return kernels.batch_norm_add_relu(x, r, w, b, EPS)[0]
    if op == "BN+ReLU fwd+bwd":
        return kernels.batch_norm_relu(x, w, b, EPS)[0]
    return kernels.batch_norm_train(x, w, b, EPS)[0]


def _step(impl, x, r, dy, w, b, op):
    """A closure running ``op`` once: forward only, or forward and backward w.r.t. every input."""
    if op == "BN fwd":
        def run():
            with torch.no_grad():
                impl(x, w, b, r, op)
        return run
    xg = x.detach().requires_grad_()
    rg = r.detach().requires_grad_()
    inputs = [xg, w, b] + ([rg] if op == "BN+add+ReLU fwd+bwd" else [])

    def run():
        y = impl(xg, w, b, rg, op)
        torch.autograd.grad(y, inputs, dy)
    return run


def _graphed(run):
    """``run`` captured in a CUDA graph: the GPU time alone, without Python and launch overhead (shows
    whether a case is launch-bound). ``None`` when capture fails."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        return graph.replay
    except Exception as error:  # noqa: BLE001 - any capture failure just drops the column
        print(f"  (CUDA graph capture failed: {type(error).__name__}: {error})")
        return None


def _compiled(op):
    fn = torch.compile(lambda x, w, b, r: _native(x, w, b, r, op), dynamic=False)
    return lambda x, w, b, r, _op: fn(x, w, b, r)


# --------------------------------------------------------------------------------------------------
# correctness before timing
# --------------------------------------------------------------------------------------------------

def _outputs(impl, x, r, dy, w, b, op):
    xg = x.detach().requires_grad_()
    rg = r.detach().requires_grad_()
    wg, bg = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y = impl(xg, wg, bg, rg, op)
    inputs = [xg, wg, bg] + ([rg] if op == "BN+add+ReLU fwd+bwd" else [])
    return [y] + list(torch.autograd.grad(y, inputs, dy.to(y.dtype)))


def _rel_err(a, ref) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_correctness(shapes) -> bool:
    """Ours and native eager against float64; ours must be within a small factor of native (or of the
    storage dtype's precision). Returns whether every case passed."""
    print("\ncorrectness: max relative error against float64 (y, dx, dγ, dβ[, dresidual])")
    print(f"{'shape':<18}{'dtype':<6}{'layout':<15}{'op':<21}{'ours':>10}{'native':>10}  ok")
    ok_all = True
    for shape in shapes:
        for dname, dtype in DTYPES.items():
            for layout in LAYOUTS:
                x, r, dy, w, b = _make(shape, dtype, layout)
                for op in OPS:
                    if op == "BN fwd":
                        continue  # the forward is part of every fwd+bwd check
                    ref = _outputs(_native, x.double(), r.double(), dy.double(), w.double(), b.double(), op)
                    ours = max(_rel_err(a, t) for a, t in zip(_outputs(_ours, x, r, dy, w, b, op), ref))
                    native = max(_rel_err(a, t) for a, t in zip(_outputs(_native, x, r, dy, w, b, op), ref))
                    # ours may differ from native in rounding, not in kind: a small factor, or a few ulps
                    limit = max(4 * native, 2 * torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5)
                    ok = ours <= limit
                    ok_all &= ok
                    print(f"{str(shape):<18}{dname:<6}{layout:<15}{op:<21}{ours:>10.2e}{native:>10.2e}  "
                          f"{'yes' if ok else 'NO'}")
                del x, r, dy
    return ok_all


# --------------------------------------------------------------------------------------------------
# kernel timings
# --------------------------------------------------------------------------------------------------

def time_kernels(shapes, bandwidth: float, compile_mode: str) -> list[float]:
    print(f"\nkernels: median ms; floor = passes × tensor bytes / {bandwidth / 1e12:.2f} TB/s; "
          f"'×floor' = time / floor, 'speed-up' = other / ours")
    print("'graph' = ours captured in a CUDA graph (GPU time without launch overhead)")
    header = (f"{'shape':<18}{'dtype':<6}{'layout':<15}{'op':<21}{'ours':>8}{'graph':>8}{'native':>8}{'compile':>9}"
              f"{'floor':>8}{'ours×floor':>11}{'nat×floor':>10}{'vs native':>10}{'vs compile':>11}")
    print(header)
    print("-" * len(header))
    ratios = []
    for shape in shapes:
        for dname, dtype in DTYPES.items():
            for layout in LAYOUTS:
                x, r, dy, w, b = _make(shape, dtype, layout)
                nbytes = x.numel() * x.element_size()
                for op, passes in OPS.items():
                    floor = passes * nbytes / bandwidth * 1e3
                    t_ours = _bench(_step(_ours, x, r, dy, w, b, op))
                    replay = _graphed(_step(_ours, x, r, dy, w, b, op))
                    t_graph = _bench(replay) if replay is not None else None
                    t_native = _bench(_step(_native, x, r, dy, w, b, op))
                    want_compile = compile_mode == "all" or (
                        compile_mode == "some" and dname == "bf16" and layout == "channels_last"
                        and op in ("BN fwd+bwd", "BN+add+ReLU fwd+bwd"))
                    t_compile = _bench(_step(_compiled(op), x, r, dy, w, b, op)) if want_compile else None
                    ratios.append(t_native / t_ours)
                    comp = f"{t_compile:>9.3f}" if t_compile else f"{'—':>9}"
                    vs_comp = f"{t_compile / t_ours:>10.2f}×" if t_compile else f"{'—':>11}"
                    graph = f"{t_graph:>8.3f}" if t_graph else f"{'—':>8}"
                    print(f"{str(shape):<18}{dname:<6}{layout:<15}{op:<21}{t_ours:>8.3f}{graph}{t_native:>8.3f}{comp}"
                          f"{floor:>8.3f}{t_ours / floor:>10.2f}×{t_native / floor:>9.2f}×"
                          f"{t_native / t_ours:>9.2f}×{vs_comp}", flush=True)
                del x, r, dy
                torch.cuda.empty_cache()
    return ratios


# --------------------------------------------------------------------------------------------------
# dispatch: where backend="auto" should use the kernels
# --------------------------------------------------------------------------------------------------

DISPATCH_SHAPES = [(32, 64), (256, 512), (64, 16, 8, 8), (128, 16, 32, 32), (128, 64, 56, 56)]


def time_dispatch() -> None:
    """bnlab.functional.batch_norm fwd+bwd with running statistics, backend="triton" vs "torch", from tiny
    tensors (all launch overhead) up; a loss marks a shape ``auto`` should keep on PyTorch
    (``bnlab.kernels.AUTO_MIN_NUMEL``)."""
    from bnlab import functional as bn_F
    print("\ndispatch: bnlab.functional.batch_norm fwd+bwd, median ms (bf16, channels_last where 4-D)")
    print(f"{'shape':<20}{'numel':>11}{'triton':>9}{'torch':>9}{'speed-up':>10}")
    losing = []
    for shape in DISPATCH_SHAPES:
        x, r, dy, w, b = _make(shape, torch.bfloat16, "channels_last" if len(shape) == 4 else "contiguous")
        rm, rv = torch.zeros_like(w.detach()), torch.ones_like(w.detach())
        times = {}
        for backend in ("triton", "torch"):
            xg = x.detach().requires_grad_()

            def run():
                y = bn_F.batch_norm(xg, rm, rv, w, b, training=True, backend=backend)
                torch.autograd.grad(y, [xg, w, b], dy)
            times[backend] = _bench(run)
        if times["triton"] > 1.05 * times["torch"]:
            losing.append(x.numel())
        print(f"{str(shape):<20}{x.numel():>11}{times['triton']:>9.3f}{times['torch']:>9.3f}"
              f"{times['torch'] / times['triton']:>9.2f}×", flush=True)
    if losing:
        print(f"the kernels lose by > 5% up to {max(losing)} elements: set bnlab.kernels.AUTO_MIN_NUMEL "
              f"above that")
    else:
        print("the kernels win at every size: AUTO_MIN_NUMEL = 0 is right for this device")


# --------------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------------

def time_training_steps(steps: int = 20) -> None:
    try:
        from bnlab import models, nn as bnn
    except ImportError as error:
        print(f"\nend to end: skipped, bnlab.models is not available ({error})")
        return
    print("\nend to end: one SGD training step (forward, loss, backward, update), bf16 autocast, channels_last")
    print(f"{'model':<11}{'batch':>6}{'image':>7}{'bnlab+triton ms':>17}{'torch BN ms':>13}{'speed-up':>10}")
    for name, batch, size in (("resnet20", 128, 32), ("resnet50", 64, 224)):
        times = {}
        for variant in ("bnlab", "torch"):
            torch.manual_seed(0)
            kw = dict(stem="imagenet") if size > 64 else {}
            if variant == "bnlab":
                net = models.create(name, norm="bn", num_classes=10, fused=True, **kw)
                for m in net.modules():
                    if isinstance(m, bnn._BatchNorm):
                        m.backend = "triton"
                        m.warn_nonfinite = False  # no host synchronisation per layer
            else:
                net = models.create(name, norm="torch_bn", num_classes=10, fused=False, **kw)
            net = net.cuda().to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
            x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
            target = torch.randint(0, 10, (batch,), device="cuda")

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = torch_F.cross_entropy(net(x), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            for _ in range(5):
                step()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            torch.cuda.synchronize()
            times[variant] = start.elapsed_time(end) / steps
            del net, opt
            torch.cuda.empty_cache()
        print(f"{name:<11}{batch:>6}{size:>7}{times['bnlab']:>17.2f}{times['torch']:>13.2f}"
              f"{times['torch'] / times['bnlab']:>9.2f}×", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", choices=("none", "some", "all"), default="some",
                        help="torch.compile column: none, bf16 channels_last fwd+bwd rows only (default), or all")
    parser.add_argument("--quick", action="store_true", help="two shapes, no end-to-end steps")
    args = parser.parse_args()
    _require_cuda()

    import triton

    import bnlab
    from bnlab import kernels
    if not kernels.supports(torch.empty(2, 2, device="cuda")):
        sys.exit("bn_gpu.py: bnlab.kernels does not support this device")
    started = time.time()
    props = torch.cuda.get_device_properties(0)
    print(f"bnlab {bnlab.__version__}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB), "
          f"CUDA {torch.version.cuda}, {platform.node()}")
    torch._dynamo.config.cache_size_limit = 256
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bandwidth / 1e12:.2f} TB/s")

    shapes = QUICK_SHAPES if args.quick else SHAPES
    section = time.time()
    correct = check_correctness(shapes)
    print(f"({time.time() - section:.0f} s, including the kernels' compilation)")
    if not correct:
        print("\nWARNING: our kernels are less accurate than expected in the rows marked NO; timings follow "
              "for diagnosis, and the run ends with exit status 1")
    section = time.time()
    ratios = time_kernels(shapes, bandwidth, args.compile)
    print(f"({time.time() - section:.0f} s)")
    worst = min(ratios)
    print(f"\nslowest case relative to native eager: {worst:.2f}× "
          f"({'never slower' if worst >= 0.95 else 'SLOWER than native there: tighten bnlab.kernels.supports'})")
    if not args.quick:
        time_dispatch()
        time_training_steps()
    print(f"\ntotal {time.time() - started:.0f} s")
    if not correct:
        sys.exit("bn_gpu.py: correctness check failed (see the rows marked NO above)")


if __name__ == "__main__":
    main()
