"""Multi-process test harness: run a function on N CPU ranks with gloo and megatron parallel state.

`run_ranks(fn, world_size, tp=..., pp=..., vpp=...)` spawns `world_size` processes, initialises
torch.distributed (gloo) and megatron-core's parallel state (with the CPU workarounds of
`mora_dist.compat.mcore_cpu`, applied first in each rank), calls `fn(rank, *args)` and returns every rank's return value.
A failure on any rank raises in the test process with that rank's full traceback.
`fn` must be importable (a module-level function of a test module), since ranks are spawned; its
return value travels back serialised with torch.save (tensors welcome).
"""
from __future__ import annotations

import io
import os
import socket
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, tp, pp, vpp, fn, args, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        from mora_dist.compat import mcore_cpu
        from mora_dist.parallel.state import destroy_distributed, init_distributed

        mcore_cpu.apply()

        init_distributed(tp=tp, pp=pp, timeout_s=300, vpp=vpp)
        out = fn(rank, *args)
        buf = io.BytesIO()  # by value: tensors must not travel through an exiting process's shm
        torch.save(out, buf)
        queue.put((rank, "ok", buf.getvalue()))
        destroy_distributed()
    except BaseException:  # report every failure with its traceback
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(fn, world_size: int, *args, tp: int = 1, pp: int = 1, vpp: int = 1, timeout: float = 600.0):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, tp, pp, vpp, fn, args, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, []
    import time

    deadline = time.time() + timeout
    while len(results) + len(errors) < world_size:
        if not queue.empty():
            rank, status, payload = queue.get()
            if status == "ok":
                import torch

                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break  # peers may now hang in a collective; stop them below
        elif time.time() > deadline:
            errors.append(f"timed out after {timeout:.0f}s; finished ranks: {sorted(results)}")
            break
        elif all(not p.is_alive() for p in procs) and queue.empty():
            codes = [p.exitcode for p in procs]
            errors.append(f"ranks exited without a result, exit codes {codes}")
            break
        else:
            time.sleep(0.05)
    for p in procs:
        p.join(timeout=5 if not errors else 0.5)
        if p.is_alive():
            p.terminate()
    if errors:
        raise RuntimeError("distributed test failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
