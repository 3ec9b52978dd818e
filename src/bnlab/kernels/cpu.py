"""A fused CPU path for training-mode batch norm: one small C file, compiled at first use, loaded with ctypes.

:mod:`bnlab.functional` calls :func:`forward` and :func:`backward` from its training ``autograd.Function``
when :func:`usable` says yes: a CPU float32/float64 tensor, contiguous (``(N, C, *)``) or channels-last
(any layout whose ``(N, *, C)`` permutation is contiguous), outside ``torch.compile`` tracing and
``torch.func`` transforms. Everything else — half inputs, other strides, double backward — stays on the
composed PyTorch math, which computes the same statistics the same way (shifted data, see
:func:`bnlab.functional._shift`).

The C source (``bn_cpu.c`` beside this file) is built with ``$CC`` (default ``cc``) as
``-O3 -fPIC -shared -fopenmp`` into ``$BNLAB_CACHE_DIR`` (default ``~/.cache/bnlab``), under a name that
hashes the source, the compiler's identity and the flags; a file lock makes concurrent first builds safe
(one process compiles, the others wait and load its result). Building takes about a second. When there is
no compiler or the build fails, a warning is logged once and the composed math is used.

``BNLAB_CPU_KERNEL=0`` turns the path off (read at every call).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from bnlab.errors import UserError

__all__ = ["usable", "forward", "backward", "library", "load_error", "enabled", "build", "reset", "compiler"]

log = logging.getLogger(__name__)

_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


# --------------------------------------------------------------------------------------------------
# build, cache and load
# --------------------------------------------------------------------------------------------------

def _cache_dir() -> Path:
    if os.environ.get("BNLAB_CACHE_DIR"):
        return Path(os.environ["BNLAB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bnlab"


def _compiler_command(cc: str) -> tuple[list[str], str]:
    """``cc`` as a command (``$CC`` may carry arguments, e.g. ``ccache gcc``) with its program resolved, and
    its identity for the cache key (resolved path, arguments, ``--version`` banner). Raises OSError when
    the program is not there."""
    program, *args = shlex.split(cc) or [""]
    path = shutil.which(program)
    if path is None:
        raise OSError(f"C compiler {cc!r} not found (set CC to a C compiler with OpenMP, e.g. gcc)")
    command = [path, *args]
    banner = subprocess.run(command + ["--version"], capture_output=True, text=True, timeout=60).stdout
    return command, "\n".join([os.path.realpath(path), *args, banner])


def compiler() -> str:
    """The C compiler the kernel is built with: ``$CC``, else ``cc``."""
    return os.environ.get("CC") or "cc"


def build(cc: Optional[str] = None) -> Path:
    """The path of the compiled library in the cache, compiling it first with ``cc`` (default
    :func:`compiler`) if the cache lacks it. Raises ``OSError`` when there is no compiler or it fails."""
    cc = cc or compiler()
    from filelock import FileLock

    source = resources.files("bnlab.kernels").joinpath("bn_cpu.c").read_bytes()
    command, identity = _compiler_command(cc)
    key = hashlib.sha256(b"\0".join([source, identity.encode(), " ".join(_FLAGS).encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"bn_cpu-{key}.so"
    if target.exists():
        return target
    with FileLock(str(target) + ".lock", timeout=300):
        if target.exists():  # another process built it while we waited
            return target
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, out = Path(tmp) / "bn_cpu.c", Path(tmp) / "bn_cpu.so"
            src.write_bytes(source)
            proc = subprocess.run([*command, *_FLAGS, "-o", str(out), str(src), "-lm"],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise OSError(f"{cc} failed to compile bn_cpu.c (exit {proc.returncode}): "
                              f"{proc.stderr.strip()[-2000:]}")
            os.replace(out, target)  # atomic: a reader sees no library or the whole library
    return target


@dataclass
class _State:
    lib: Optional[ctypes.CDLL] = None
    error: Optional[str] = None
    tried: bool = False


_state = _State()
_state_lock = threading.Lock()  # one build per process; other threads wait for it instead of falling back


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    for suffix in _SUFFIX.values():
        getattr(lib, f"bn_forward_planar_{suffix}").argtypes = [ptr] * 7 + [i64] * 3 + [f64, i32]
        getattr(lib, f"bn_forward_rows_{suffix}").argtypes = [ptr] * 7 + [i64] * 3 + [f64, i32]
        getattr(lib, f"bn_backward_planar_{suffix}").argtypes = [ptr] * 9 + [i64] * 3 + [f64, i32]
        getattr(lib, f"bn_backward_rows_{suffix}").argtypes = [ptr] * 9 + [i64] * 2 + [f64, i32]


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, building it on first use; ``None`` (and one logged warning) when it
    cannot be built or loaded."""
    if not _state.tried:
        with _state_lock:
            if not _state.tried:
                try:
                    lib = ctypes.CDLL(str(build()))
                    _declare(lib)
                    _state.lib = lib
                except Exception as exc:  # no compiler, no OpenMP, read-only cache: the composed math works
                    _state.error = f"{type(exc).__name__}: {exc}"
                    log.warning("bnlab: the fused CPU batch-norm kernel is unavailable, using the composed "
                                "PyTorch math instead (%s)", _state.error)
                _state.tried = True
    return _state.lib


def load_error() -> Optional[str]:
    """Why :func:`library` returned ``None``, or ``None``."""
    return _state.error


def reset() -> None:
    """Forget the loaded library and any failure: the next :func:`library` call builds or loads it again."""
    with _state_lock:
        _state.lib, _state.error, _state.tried = None, None, False


# --------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------

_SWITCH = {"": True, "1": True, "true": True, "yes": True, "on": True,
           "0": False, "false": False, "no": False, "off": False}


def enabled() -> bool:
    """Whether the path is switched on: ``BNLAB_CPU_KERNEL`` unset or ``1`` (also true/yes/on); ``0``
    (also false/no/off) turns it off; anything else is a :class:`~bnlab.errors.UserError`."""
    value = os.environ.get("BNLAB_CPU_KERNEL", "1")
    try:
        return _SWITCH[value.strip().lower()]
    except KeyError:
        raise UserError(f"BNLAB_CPU_KERNEL={value!r}: expected 1 (use the fused CPU batch-norm kernel) or 0 "
                        f"(use the composed PyTorch math)") from None


def _layout(x: Tensor) -> Optional[str]:
    """``"planar"`` for (N, C, S) contiguous, ``"rows"`` for (M, C) contiguous (channels last, or 2-D), else
    ``None``."""
    shape, strides = x.shape, x.stride()
    if x.is_contiguous():
        return "rows" if math.prod(shape[2:]) == 1 else "planar"
    expected = 1  # rows: dense in the order (N, *spatial, C), read from the strides (no tensor op)
    for dim in [1, *range(x.dim() - 1, 1, -1), 0]:
        if shape[dim] != 1 and strides[dim] != expected:
            return None
        expected *= shape[dim]
    return "rows"


# (shape, strides) -> _geometry's answer, or None for a layout the kernels do not take: a pure function of
# the key (no data pointer, dtype or device is involved), kept for the few shapes a training loop repeats
_GEOMETRY: dict[tuple, Optional[tuple[str, int, int, int]]] = {}
_GEOMETRY_LIMIT = 4096


def _geometry(x: Tensor) -> Optional[tuple[str, int, int, int]]:
    """Layout, N (or M rows), C, S (values per channel per sample); ``None`` when :func:`_layout` is."""
    key = (x.shape, x.stride())
    try:
        return _GEOMETRY[key]
    except KeyError:
        pass
    layout = _layout(x)
    n, c, s = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    geometry = None if layout is None else (layout, n, c, s) if layout == "planar" else (layout, n * s, c, s)
    if len(_GEOMETRY) >= _GEOMETRY_LIMIT:
        _GEOMETRY.clear()
    _GEOMETRY[key] = geometry
    return geometry


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _plain(t: Optional[Tensor]) -> bool:
    return t is None or (type(t) in _PLAIN_TYPES and not _is_wrapped(t))


def usable(x: Tensor, *others: Optional[Tensor]) -> bool:
    """Whether :func:`forward`/:func:`backward` can take ``x`` (and the other tensors of the call)."""
    # the cheap attribute checks first; then the tracing/transform state, the layout, the switch
    if not x.is_cpu or x.dtype not in _SUFFIX or x.dim() < 2 or x.numel() == 0:
        return False
    if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return False
    if not _plain(x) or _geometry(x) is None:
        return False
    for t in others:
        if not _plain(t):
            return False
    return enabled() and library() is not None


def _vector(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``t`` as a contiguous vector of ``dtype`` (itself when it already is: only its pointer is used)."""
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.detach().to(dtype).contiguous()


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
            eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training forward: ``(y, shift, δ, σ²)`` as :class:`bnlab.functional._BatchNormTrain` returns them
    (batch mean = shift + δ; σ² biased), all in x's dtype; y in x's memory format."""
    lib, dtype, suffix = library(), x.dtype, _SUFFIX[x.dtype]
    layout, rows, channels, spatial = _geometry(x)
    # the per-channel vectors first: a large buffer allocated last is the one glibc hands back next call,
    # instead of trimming the heap and faulting fresh pages in (measured: ~1000 page faults per call)
    shift, delta, var = (torch.empty(channels, dtype=dtype) for _ in range(3))
    y = torch.empty_like(x)
    weight, bias = _vector(weight, dtype), _vector(bias, dtype)
    fn = getattr(lib, f"bn_forward_{layout}_{suffix}")
    status = fn(x.data_ptr(), y.data_ptr(), _ptr(weight), _ptr(bias), shift.data_ptr(), delta.data_ptr(),
                var.data_ptr(), rows, channels, spatial, float(eps), torch.get_num_threads())
    if status != 0:
        raise MemoryError("bnlab batch_norm (CPU kernel): out of memory for the per-thread sums")
    return y, shift, delta, var


def backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], shift: Tensor, delta: Tensor, var: Tensor,
             eps: float, needs_input_grad: tuple[bool, ...], has_weight: bool,
             has_bias: bool) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Training backward (single, not differentiable): ``(dx, dγ, dβ)`` from the closed form, each
    ``None`` when not needed; dx in x's memory format."""
    lib, dtype, suffix = library(), x.dtype, _SUFFIX[x.dtype]
    layout, rows, channels, spatial = _geometry(x)
    if dy.dtype != dtype:
        dy = dy.to(dtype)
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)  # e.g. an expanded gradient from .sum().backward()
    dweight, dbias = torch.empty(channels, dtype=dtype), torch.empty(channels, dtype=dtype)
    dx = torch.empty_like(x) if needs_input_grad[0] else None
    w = _vector(weight, dtype) if has_weight else None
    shift, delta, var = _vector(shift, dtype), _vector(delta, dtype), _vector(var, dtype)
    vectors = (_ptr(w), shift.data_ptr(), delta.data_ptr(), var.data_ptr(), dweight.data_ptr(), dbias.data_ptr())
    sizes = (rows, channels, spatial) if layout == "planar" else (rows, channels)
    status = getattr(lib, f"bn_backward_{layout}_{suffix}")(x.data_ptr(), dy.data_ptr(), _ptr(dx), *vectors,
                                                            *sizes, float(eps), torch.get_num_threads())
    if status != 0:
        raise MemoryError("bnlab batch_norm (CPU kernel): out of memory for the per-thread sums")
    dweight = _cast(dweight, weight.dtype) if has_weight and needs_input_grad[1] else None
    dbias = (_cast(dbias, dy.dtype if weight is None else weight.dtype)
             if has_bias and needs_input_grad[2] else None)
    return dx, dweight, dbias


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, skipping the call (a dispatch) when it would return ``t`` itself."""
    return t if t.dtype == dtype else t.to(dtype)
