"""Run a test body on N local processes joined by a gloo process group.

    results = run_on_ranks(body, world_size=2, arg1, ...)   # body(rank, world_size, arg1, ...)

`body` must be a module-level function (children start from a fork server and import it by name).
Each process sets torch.set_num_threads(1), joins gloo on 127.0.0.1 at a free port, runs
`body`, and leaves the group. Return values (anything picklable, tensors included) come back as
a list indexed by rank, for the parent to assert on. An exception on any rank fails the call
with that rank's traceback; a rank that neither finishes nor fails within `timeout_s` (a hang in
a collective) fails it with the ranks still running, and every child is terminated.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing import forkserver
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List

_PORT_IN_USE = "address already in use"  # compared in lower case: torch writes it either way


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(body, rank, world_size, port, out_dir, args, kwargs, timeout_s) -> None:
    result_path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if sys.platform.startswith("linux"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        # Tests build several meshes in one process group (a run builds one); creating the second
        # mesh's flattened groups eagerly failed with "Connection reset by peer" on gloo. Lazy init
        # connects a group's pairs on first use instead.
        os.environ.setdefault("TORCH_GLOO_LAZY_INIT", "1")
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
        try:
            value = body(rank, world_size, *args, **kwargs)
            # Rank 0 hosts the store, and a lazily connected gloo pair needs it even inside the last
            # barrier: a rank that finished first gave the others "Broken pipe" in their last
            # collective, and rank 0 leaving the barrier first gave one "Connection reset by peer"
            # (CI, 4 ranks on a loaded machine). So rank 0 stays until every rank is out of it.
            dist.barrier()
            store.set(f"left-barrier-{rank}", "1")
            if rank == 0:
                store.wait([f"left-barrier-{r}" for r in range(world_size)], timeout)
        finally:
            dist.destroy_process_group()
        # Plain pickle to a file: a tensor is copied whole, not shared with a process about to exit.
        status, data = "ok", pickle.dumps(value)
    except BaseException:  # noqa: BLE001 - report anything, including KeyboardInterrupt
        status, data = "error", traceback.format_exc().encode()
    with open(result_path + ".tmp", "wb") as f:
        pickle.dump((status, data), f)
    os.replace(result_path + ".tmp", result_path)
    sys.exit(0 if status == "ok" else 1)


def run_on_ranks(
    body: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 60.0, **kwargs: Any
) -> List[Any]:
    """body(rank, world_size, *args, **kwargs) on `world_size` gloo processes; results by rank."""
    for attempt in range(3):
        try:
            return _run_once(body, world_size, args, kwargs, timeout_s)
        except _PortTaken:
            if attempt == 2:
                raise RuntimeError("no free port for the gloo store after 3 attempts") from None
    raise AssertionError("unreachable")


class _PortTaken(Exception):
    pass


def _context(body):
    """Children fork from a fork server that imported torch, paratrain and the body's module once.

    Plain spawn would re-import them in every child (seconds each; on 2 busy cores, most of a
    test's time); plain fork would copy a parent whose thread pools may already be running. The
    server starts at the first call of a session, with that call's preload list.
    """
    ctx = multiprocessing.get_context("forkserver")
    candidates = ["torch", "torch.distributed", "paratrain.strategies", __name__, body.__module__]
    # Only what this process imported without error: a module that fails in the server kills it.
    ctx.set_forkserver_preload([m for m in candidates if m in sys.modules])
    # Python 3.11's fork server ignores our sys.path (pytest put tests/ on it), so it could not
    # preload the test modules: hand the path over in PYTHONPATH while the server starts.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    return ctx


def _run_once(body, world_size, args, kwargs, timeout_s) -> List[Any]:
    ctx = _context(body)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="paratrain-dist-") as out_dir:
        procs = [
            ctx.Process(
                target=_child,
                args=(body, rank, world_size, port, out_dir, args, kwargs, timeout_s),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s + 30  # + start-up (imports) of the children
        try:
            while any(p.is_alive() for p in procs):
                if any(p.exitcode not in (None, 0) for p in procs):
                    time.sleep(0.5)  # let the other ranks report their own error if they can
                    break
                if time.monotonic() > deadline:
                    alive = [r for r, p in enumerate(procs) if p.is_alive()]
                    raise TimeoutError(
                        f"ranks {alive} of {world_size} still running after {timeout_s:.0f} s "
                        f"(a collective that not every rank joined?)"
                    )
                time.sleep(0.02)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(5)

        results, errors = [], []
        for rank, p in enumerate(procs):
            path = os.path.join(out_dir, f"rank{rank}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {rank}: exited with code {p.exitcode} and no result")
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, data = pickle.load(f)
            if status == "ok":
                results.append(pickle.loads(data))
            else:
                errors.append(f"rank {rank} raised:\n{data.decode()}")
                results.append(None)
        if errors:
            text = "\n".join(errors)
            if _PORT_IN_USE in text.lower():
                raise _PortTaken(text)
            raise RuntimeError(f"{len(errors)} of {world_size} ranks failed:\n{text}")
        return results
