"""Time to accuracy on Fashion-MNIST: bnlab's training stack against a plain-PyTorch loop, same process.

GPU (the real benchmark): train a preset to a fixed number of epochs over several seeds and print, per
seed and as a mean, the seconds of training (CUDA events; evaluation excluded), the first epoch whose test
accuracy reached --target (94.0% by default), and the final test accuracy; then the same for the
plain-PyTorch baseline (torch.nn.BatchNorm2d, eager, a DataLoader over CPU tensors with per-example
augmentation, torch's OneCycleLR: the textbook loop, no tricks).

    python benchmarks/time_to_accuracy.py --preset airbench --seeds 5
    python benchmarks/time_to_accuracy.py --preset resnet20w2 --seeds 3 --compile
    python benchmarks/time_to_accuracy.py --preset resnet20 --cuda-graphs --no-baseline

CPU (--cpu-quick): seconds per epoch of a ResNet-20 on a Fashion-MNIST subset for the baseline loop and
for bnlab's stack (device-resident data and augmentation, bnlab.train, with PyTorch's batch norm and with
bnlab's), alternating so that all see the same machine load, and the ratios baseline / ours (> 1: ours
is faster).

    python benchmarks/time_to_accuracy.py --cpu-quick
    python benchmarks/time_to_accuracy.py --cpu-quick --subset 4096 --epochs 3 --threads 2

Reference points (one H200, plain PyTorch with bf16 autocast, channels_last, batch 512, SGD-Nesterov,
one-cycle, crop+flip): ResNet-20 width 16: 93.1% after 12 epochs (15.7 s); width 32 with flip TTA: 94.0%
at 14.4 s; airbench-style net, label smoothing 0.2, 8 epochs, flip TTA: 94.27% mean of 3 seeds in 4.1 s.
Goal: 94.0% mean over 5 seeds in <= 1.5 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

import bnlab
from bnlab import data, models
from bnlab.train import TrainConfig, set_seed, train

# -------------------------------------------------------------------------------------------------
# presets (learning rates are per batch of `batch_size` examples; epochs are full passes over 60k)
# -------------------------------------------------------------------------------------------------

PRESETS = {
    "resnet20": dict(model="resnet20", width=1.0, epochs=12, batch_size=512, lr=0.4, momentum=0.9,
                     weight_decay=5e-4, label_smoothing=0.0, tta=False, warmup_fraction=0.2),
    "resnet20w2": dict(model="resnet20", width=2.0, epochs=12, batch_size=512, lr=0.4, momentum=0.9,
                       weight_decay=5e-4, label_smoothing=0.0, tta=True, warmup_fraction=0.2),
    # airbench-style: conv -> max-pool -> BN -> GELU groups 96/192/384, BN gamma frozen, whitened stem
    "airbench": dict(model="airbench", width=1.0, epochs=8, batch_size=512, lr=0.2, momentum=0.85,
                     weight_decay=5e-4, label_smoothing=0.2, tta=True, warmup_fraction=0.25),
}


# -------------------------------------------------------------------------------------------------
# the plain-PyTorch baseline
# -------------------------------------------------------------------------------------------------

class _PerExampleAugment(TorchDataset):
    """What a plain loop does: index one example at a time, pad-crop and flip it in Python."""

    def __init__(self, x, y, augment: bool, padding: int = 2):
        self.x, self.y, self.augment, self.padding = x, y, augment, padding

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        image = self.x[i]
        if self.augment:
            p = self.padding
            padded = F.pad(image, [p, p, p, p])
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            image = padded[:, top:top + image.shape[1], left:left + image.shape[2]]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return image, self.y[i]


def baseline_run(ds, hp: dict, device: torch.device, seed: int, epochs: int, amp: bool,
                 channels_last: bool, evaluate_every_epoch: bool = True) -> dict:
    """Train with the textbook loop; return per-epoch seconds (training only) and test accuracies."""
    torch.manual_seed(seed)
    model = models.create(hp["model"], norm="torch_bn", in_channels=ds.in_channels, num_classes=ds.num_classes,
                          width=hp["width"], fused=False).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(_PerExampleAugment(ds.train_x.cpu(), ds.train_y.cpu(), ds.augment),
                        batch_size=hp["batch_size"], shuffle=True, drop_last=True,
                        pin_memory=device.type == "cuda")
    decay = [p for p in model.parameters() if p.ndim > 1 and p.requires_grad]
    exempt = [p for p in model.parameters() if p.ndim <= 1 and p.requires_grad]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": hp["weight_decay"]},
                                 {"params": exempt, "weight_decay": 0.0}], lr=hp["lr"],
                                momentum=hp["momentum"], nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp["lr"], total_steps=epochs * len(loader),
                                                    pct_start=hp["warmup_fraction"], anneal_strategy="linear")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")
    times, accs = [], []
    for _ in range(epochs):
        model.train()
        timer = _Timer(device)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                loss = F.cross_entropy(model(x).float(), y, label_smoothing=hp["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        times.append(timer.seconds())
        accs.append(_plain_accuracy(model, ds, device, hp["tta"]) if evaluate_every_epoch or
                    len(times) == epochs else None)
    return {"epoch_times": times, "test_accs": accs}


@torch.no_grad()
def _plain_accuracy(model, ds, device, tta: bool) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(ds.test_x), 1000):
        x, y = ds.test_x[i:i + 1000].to(device), ds.test_y[i:i + 1000].to(device)
        logits = model(x) + (model(x.flip(-1)) if tta else 0)
        correct += int((logits.argmax(1) == y).sum())
    return correct / len(ds.test_x)


class _Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def seconds(self) -> float:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        return time.perf_counter() - self.t0


# -------------------------------------------------------------------------------------------------
# bnlab's stack
# -------------------------------------------------------------------------------------------------

def ours_run(ds, hp: dict, device: torch.device, seed: int, epochs: int, norm: str, amp: bool,
             channels_last: bool, compile_mode, eval_every: int = 1) -> dict:
    set_seed(seed)
    model = models.create(hp["model"], norm=norm, in_channels=ds.in_channels, num_classes=ds.num_classes,
                          width=hp["width"])
    if hp["model"] == "airbench":
        model.init_whitening(ds.train_x[:5000].cpu())
    config = TrainConfig(epochs=epochs, batch_size=hp["batch_size"], lr=hp["lr"], momentum=hp["momentum"],
                         weight_decay=hp["weight_decay"], label_smoothing=hp["label_smoothing"],
                         warmup_fraction=hp["warmup_fraction"], seed=seed, device=str(device), tta=hp["tta"],
                         amp=amp, channels_last=channels_last, compile=compile_mode is not None, eval_every=eval_every,
                         compile_mode=compile_mode if compile_mode not in (None, "default") else None)
    history = train(model, ds, config, progress=False)
    return {"epoch_times": [e["epoch_time"] for e in history.epochs],
            "test_accs": [e["test_acc"] for e in history.epochs], "status": history.status}


def _summary(run: dict, target: float) -> dict:
    reached = [i + 1 for i, acc in enumerate(run["test_accs"]) if acc is not None and acc >= target]
    epochs_to_target = reached[0] if reached else None
    seconds = sum(run["epoch_times"])
    to_target = sum(run["epoch_times"][:epochs_to_target]) if epochs_to_target else None
    return {"seconds": seconds, "epochs_to_target": epochs_to_target, "seconds_to_target": to_target,
            "final_acc": run["test_accs"][-1]}


def _environment(device: torch.device) -> str:
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"bnlab {bnlab.__version__}, torch {torch.__version__}, python {platform.python_version()}, {hardware}"


# -------------------------------------------------------------------------------------------------
# entry points
# -------------------------------------------------------------------------------------------------

def gpu_benchmark(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        print("note: no CUDA device; this runs the GPU benchmark on CPU (slow). Use --cpu-quick for the CPU check.")
    hp = dict(PRESETS[args.preset])
    epochs = args.epochs or hp["epochs"]
    ds = data.load("fashion-mnist", data_dir=args.data_dir, subset=args.subset, device=device)
    compile_mode = "reduce-overhead" if args.cuda_graphs else ("default" if args.compile else None)
    print(f"# {args.preset}: {hp}, epochs {epochs}, target {args.target:.3f}; {_environment(device)}")
    print(f"# ours: bf16={not args.no_amp}, channels_last={not args.no_channels_last}, compile={compile_mode}")
    results = {"preset": args.preset, "epochs": epochs, "environment": _environment(device), "ours": [], "baseline": []}
    print(f"{'run':>9} {'seed':>4} {'seconds':>8} {'ep→target':>9} {'s→target':>9} {'final_acc':>9}")
    for seed in range(args.seeds):
        runs = [("ours", lambda: ours_run(ds, hp, device, seed, epochs, args.norm, not args.no_amp,
                                          not args.no_channels_last, compile_mode))]
        if not args.no_baseline:
            runs.append(("baseline", lambda: baseline_run(ds, hp, device, seed, epochs, not args.no_amp,
                                                          not args.no_channels_last)))
        for name, fn in runs:
            s = _summary(fn(), args.target)
            results[name].append(s)
            to_target = "-" if s["seconds_to_target"] is None else f"{s['seconds_to_target']:.2f}"
            print(f"{name:>9} {seed:>4} {s['seconds']:>8.2f} {str(s['epochs_to_target'] or '-'):>9} "
                  f"{to_target:>9} {s['final_acc']:>9.4f}", flush=True)
    for name in ("ours", "baseline"):
        if results[name]:
            accs = [r["final_acc"] for r in results[name]]
            secs = [r["seconds"] for r in results[name]]
            print(f"{name:>9} mean over {len(accs)} seeds: {statistics.mean(secs):.2f} s, "
                  f"final accuracy {statistics.mean(accs):.4f} (min {min(accs):.4f})")
    if results["baseline"]:
        ratio = statistics.mean(r["seconds"] for r in results["baseline"]) / statistics.mean(r["seconds"] for r in results["ours"])
        print(f"speed-up baseline/ours: {ratio:.2f}x")
    return results


def cpu_quick(args) -> dict:
    device = torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    hp = dict(PRESETS["resnet20"], batch_size=args.batch_size or 128, lr=0.2)
    args.subset = args.subset or 2048
    epochs = args.epochs or 2
    ds = data.load("fashion-mnist", data_dir=args.data_dir, subset=args.subset, seed=0)
    # the comparison is about training speed: evaluate on 1000 test images only, outside the timing
    ds = dataclasses.replace(ds, test_x=ds.test_x[:1000], test_y=ds.test_y[:1000])
    print(f"# CPU quick: ResNet-20 (width 1), Fashion-MNIST subset {args.subset}, batch {hp['batch_size']}, "
          f"{epochs} epochs per run, crop+flip, {args.repeats} alternating repeats; {_environment(device)}")
    variants = {
        "baseline (torch BN, DataLoader)": lambda s: baseline_run(ds, hp, device, s, epochs, False, False, False),
        "ours (bnlab stack, torch BN)": lambda s: ours_run(ds, hp, device, s, epochs, "torch_bn", False, False, None, epochs),
        "ours (bnlab stack, bnlab BN)": lambda s: ours_run(ds, hp, device, s, epochs, "bn", False, False, None, epochs),
    }
    per_epoch = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, fn in variants.items():
            times = fn(repeat)["epoch_times"]
            per_epoch[name] += times
            print(f"  repeat {repeat}: {name:<34} s/epoch {' '.join(f'{t:.3f}' for t in times)}", flush=True)
    base = min(per_epoch["baseline (torch BN, DataLoader)"])
    print(f"{'variant':<34} {'best s/epoch':>12} {'median':>8} {'baseline/this':>13}")
    rows = {}
    for name, times in per_epoch.items():
        best = min(times)
        rows[name] = {"best": best, "median": statistics.median(times), "speedup": base / best}
        print(f"{name:<34} {best:>12.3f} {statistics.median(times):>8.3f} {base / best:>12.2f}x")
    return {"cpu_quick": rows, "environment": _environment(device), "subset": args.subset, "epochs": epochs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="airbench")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--target", type=float, default=0.94)
    parser.add_argument("--norm", default="bn", help="norm of our runs (default bn)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir")
    parser.add_argument("--no-amp", action="store_true", help="no bf16 autocast")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model")
    parser.add_argument("--cuda-graphs", action="store_true", help="torch.compile mode reduce-overhead (CUDA graphs)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--cpu-quick", action="store_true", help="the CPU per-epoch comparison")
    parser.add_argument("--subset", type=int, help="train on this many examples (--cpu-quick default 2048)")
    parser.add_argument("--batch-size", type=int, help="--cpu-quick: batch size (default 128)")
    parser.add_argument("--repeats", type=int, default=2, help="--cpu-quick: alternating repeats")
    parser.add_argument("--threads", type=int, help="--cpu-quick: torch threads")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    results = cpu_quick(args) if args.cpu_quick else gpu_benchmark(args)
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "argv": sys.argv}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
