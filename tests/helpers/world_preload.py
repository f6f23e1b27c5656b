"""What every test-world rank imports, imported once by the forkserver the ranks are forked
from (tests/helpers/distributed.py): a freshly spawned rank spent about 7 s of CPU on these
imports, about a fifth of the suite's CPU time, and a forked one starts in well under a
second. Importing starts no thread that a fork could leave holding a lock."""

import warnings

# megatron-core warns at import about every optional GPU package it cannot find.
warnings.filterwarnings("ignore", module="megatron")

import torch  # noqa: E402, F401
import torch.distributed  # noqa: E402, F401

import tst.checkpointing  # noqa: E402, F401
import tst.cpu_compat  # noqa: E402, F401
import tst.platform  # noqa: E402, F401
import tst.trainer  # noqa: E402, F401
