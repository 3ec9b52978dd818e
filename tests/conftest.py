"""Test settings shared by every module.

* One intra-op thread per process: `make test` runs two pytest workers on two cores.
* Triton kernels run under the interpreter when there is no GPU (must be set before triton is imported).
* Hypothesis: no deadlines (shared machines have noisy timing); derandomized under CI so a run is
  reproducible; `BNLAB_HYPOTHESIS=stress` draws 500 examples per property for a deeper local search.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)

try:
    from hypothesis import HealthCheck, settings

    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("bnlab", max_examples=30, derandomize=bool(os.environ.get("CI")), **common)
    settings.register_profile("stress", max_examples=500, **common)
    settings.load_profile("stress" if os.environ.get("BNLAB_HYPOTHESIS") == "stress" else "bnlab")
except ImportError:  # hypothesis is a dev dependency
    pass
