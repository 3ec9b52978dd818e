"""Datasets as whole tensors on the training device, and a loader that never leaves that device.

``load(name)`` returns a :class:`Dataset` whose ``train_x``/``test_x`` are float32 tensors normalized with
the training set's per-channel mean and standard deviation, and whose labels are int64:

=================  ===========================  ==================================================
``fashion-mnist``  60k/10k, (1, 28, 28), 10      Xiao et al. 2017, https://arxiv.org/abs/1708.07747
``mnist1d``        4k/1k, (1, 40), 10            Greydanus 2020, https://arxiv.org/abs/2011.14439
``digits``         1437/360, (1, 8, 8), 10       scikit-learn's copy of the UCI handwritten digits
``synthetic``      512/256, (1, 8, 8), 4         class templates plus noise, for tests
``cifar10``        50k/10k, (3, 32, 32), 10      Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html
``cifar100``       50k/10k, (3, 32, 32), 100     the same, fine labels (:mod:`bnlab.data.cifar` reads both)
=================  ===========================  ==================================================

Fashion-MNIST is read from IDX files (gzip or raw). A directory named explicitly, ``data_dir`` or else
``$BNLAB_DATA``, is authoritative: no other copy is used. The files must be in ``data_dir`` (in it, or
in its ``fashion-mnist/`` or ``FashionMNIST/raw/``), and a missing one is an error naming the directory
and the file; ``$BNLAB_DATA`` is also the cache, so there a missing copy is downloaded unless
``download=False``. Without either, the files are looked for in the user cache
(``$XDG_CACHE_HOME/bnlab``, default ``~/.cache/bnlab``) and in Debian's
``/usr/share/datasets/fashion-mnist/`` (package ``dataset-fashion-mnist``), and otherwise downloaded
from the official address into the cache with its published MD5 checked. Every copy's decompressed
content is checked against SHA-256 sums, so a corrupt file is named rather than trained on. CIFAR's
archives are looked for in the same order (:mod:`bnlab.data.dirs` holds it for every source).

:class:`Loader` shuffles, batches and augments (random crop with zero padding, horizontal flip) with
tensor operations on the data's device: no per-sample Python, no worker processes.

The package, one module per concern: :mod:`~bnlab.data.dirs` (where data live), the sources
:mod:`~bnlab.data.fashion_mnist`, :mod:`~bnlab.data.cifar` and :mod:`~bnlab.data.generated`,
:mod:`~bnlab.data.dataset` (the record, subsets, validation split, downsampling),
:mod:`~bnlab.data.registry` (the datasets by name, :func:`load`) and :mod:`~bnlab.data.loader`.

Example::

    >>> from bnlab import data
    >>> ds = data.load("fashion-mnist", subset=5000)       # seeded, class-balanced 5k training subset
    >>> for x, y in data.Loader(ds.train_x, ds.train_y, batch_size=256, augment=ds.augment):
    ...     pass
"""

from bnlab.data.dirs import DatasetNotFoundError, PathLike, cache_dir, cache_path, explicit_data_dir
from bnlab.data.dataset import Dataset, balanced_subset, downsample, split_validation
from bnlab.data.fashion_mnist import read_idx
from bnlab.data.registry import (available, canonical_name, check_data_dir, example_shape, from_files, is_image,
                                 load, locate, num_classes, split_sizes)
from bnlab.data.loader import Loader, random_crop, random_flip

__all__ = ["Dataset", "Loader", "load", "available", "locate", "read_idx", "cache_dir", "balanced_subset",
           "DatasetNotFoundError", "explicit_data_dir", "split_validation", "canonical_name", "from_files",
           "example_shape", "split_sizes", "num_classes", "is_image", "downsample", "cache_path", "random_crop",
           "random_flip", "check_data_dir"]
