"""Test settings shared by every module.

* One intra-op thread per process: `make test` runs two pytest workers on two cores.
* Triton kernels run under the interpreter when there is no GPU (must be set before triton is imported).
* Hypothesis: a CI profile without deadlines (shared machines have noisy timing).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("bnlab", deadline=None, max_examples=30,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("bnlab")
except ImportError:  # hypothesis is a dev dependency
    pass
