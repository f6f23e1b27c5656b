"""What a test world's ranks import, imported once: the preload of the server process the
ranks are forked from (see ``distributed.ProcessWorld``).

Importing torch, megatron-core and the trainer costs a spawned process about 2 s alone on a
2-core machine (several times that when the cores are busy); a rank forked from a process
that has imported them starts in a fraction of a second. ``import tst`` comes first: it arms
megatron-core's first import (``tst.megatron_import``: its fusions not compiled without CUDA,
the module graph kept out of the collector's reach), which the ranks would otherwise inherit
done the other way. The server starts with the environment of the test session's process
(``OMP_NUM_THREADS=1`` from ``tests/conftest.py``).
Nothing here starts a thread, a process group or a device: what a rank sets up it sets up
after the fork (``tst.cpu_compat.apply``, ``init_process_group``).
"""

from __future__ import annotations

import warnings

# megatron-core warns at import about every optional GPU package it cannot find.
warnings.filterwarnings("ignore", module="megatron")

import tst  # noqa: E402,F401  (first: see above)
from tst.megatron_import import settled_imports  # noqa: E402

with settled_imports():
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401

    import pretrain_tst  # noqa: F401
    import tst.checkpointing  # noqa: F401
    import tst.cpu_compat  # noqa: F401
    import tst.dry_run  # noqa: F401
    import tst.platform  # noqa: F401
    import tst.trainer  # noqa: F401
