"""Makes torchruns slow to leave (put on PYTHONPATH by some cluster tests).

Python imports ``sitecustomize`` at start-up. With ``TST_SLOW_LEAVERS`` set, in every torchrun
agent that does not serve the rendezvous store itself, this delays the exit barrier as a
loaded node would: the agent checks in ``TST_SLOW_LEAVERS`` seconds late, then waits as long
again before waiting for the others. Where a torchrun serves the store, it leaves as soon as
the last one has checked in and takes the store with it: the slow one then ends a good run
with a c10d ``recvValueWithTimeout ... Connection was likely closed`` traceback. Where the
store outlives every torchrun (the launch scripts' way), nothing shows.
"""

import os
import sys
import time


def _serves_rendezvous_store() -> bool:
    import psutil

    argv = sys.orig_argv
    at = [i for i, a in enumerate(argv[:-1]) if a in ("--rdzv-endpoint", "--rdzv_endpoint")]
    if not at:  # --standalone: the only torchrun serves it
        return True
    port = int(argv[at[-1] + 1].rsplit(":", 1)[1])
    return any(
        c.status == psutil.CONN_LISTEN and c.laddr.port == port
        for c in psutil.Process().net_connections(kind="tcp")
    )


def _slow_exit_barrier(delay: float) -> None:
    from torch.distributed.elastic.utils import store as store_util

    check_in = store_util._barrier_nonblocking
    barrier = store_util.barrier

    def slow_check_in(*args, **kwargs):
        key = check_in(*args, **kwargs)
        time.sleep(delay)  # between checking in and waiting for the others
        return key

    def slow_barrier(*args, **kwargs):  # torchrun's agent calls it for its exit barrier only
        if _serves_rendezvous_store():
            return barrier(*args, **kwargs)
        time.sleep(delay)  # checks in after the others
        store_util._barrier_nonblocking = slow_check_in
        try:
            return barrier(*args, **kwargs)
        finally:
            store_util._barrier_nonblocking = check_in

    store_util.barrier = slow_barrier


if (
    os.environ.get("TST_SLOW_LEAVERS")
    and "LOCAL_RANK" not in os.environ  # a torchrun agent, not one of its workers
    and any(a.endswith(("torch.distributed.run", "torchrun")) for a in sys.orig_argv)
):
    _slow_exit_barrier(float(os.environ["TST_SLOW_LEAVERS"]))
