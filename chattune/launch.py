"""Rank discovery for `mpirun` launches (OpenMPI, MPICH, Intel MPI) through mpi4py.

torchrun and the DeepSpeed launcher set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT themselves. Under
`mpirun -np N python finetune.py ...` nobody does, so before the process group starts we read rank, size and the
node-local rank from MPI and broadcast the first rank's address as the rendezvous point.
"""

from __future__ import annotations

import os
import socket

MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "MPI_LOCALNRANKS")


def launched_by_mpi(env: dict | None = None) -> bool:
    env = os.environ if env is None else env
    return "RANK" not in env and any(marker in env for marker in MPI_MARKERS)


def init_from_mpi() -> bool:
    """Fill torch.distributed's environment from MPI; returns whether it did (False outside mpirun)."""
    if not launched_by_mpi():
        return False
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    address = None
    if comm.Get_rank() == 0:
        address = os.environ.get("MASTER_ADDR") or _own_address()
    address = comm.bcast(address, root=0)
    os.environ.update(
        RANK=str(comm.Get_rank()),
        WORLD_SIZE=str(comm.Get_size()),
        LOCAL_RANK=str(node.Get_rank()),
        LOCAL_WORLD_SIZE=str(node.Get_size()),
        MASTER_ADDR=address,
        MASTER_PORT=os.environ.get("MASTER_PORT", "29500"),
    )
    node.Free()
    return True


def _own_address() -> str:
    host = socket.gethostname()
    try:
        return socket.gethostbyname(host)
    except OSError:
        return "127.0.0.1"


def torch_extensions_root() -> str:
    """Where torch (and so DeepSpeed) builds its just-in-time ops: $TORCH_EXTENSIONS_DIR, or its default."""
    from torch.utils.cpp_extension import get_default_build_root

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


def _builders() -> set[str]:
    """Directories some live process is working in, or names on its command line (a build runs ninja there)."""
    found: set[str] = set()
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not pid.isdigit():
            continue
        try:
            found.add(os.readlink(f"/proc/{pid}/cwd"))
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found.update(part.decode(errors="replace") for part in f.read().split(b"\0") if part)
        except OSError:  # gone, or not ours to read
            continue
    return found


def stale_build_locks(min_age: float = 60.0) -> list[str]:
    """Lock files of torch's op builds (DeepSpeed's shm_comm, fused_adam, ...) that no live process holds: a build
    killed midway (a preempted job) leaves one, and every later build of that op waits for it forever, silently.
    A lock is stale when it is older than `min_age` seconds and no process works in, or names, its directory."""
    import glob
    import time

    locks = [p for p in glob.glob(os.path.join(torch_extensions_root(), "*", "*", "lock")) +
             glob.glob(os.path.join(torch_extensions_root(), "*", "lock"))
             if time.time() - os.path.getmtime(p) > min_age]
    if not locks:
        return []
    live = _builders()
    return sorted(lock for lock in locks
                  if not any(item.startswith(os.path.dirname(lock)) for item in live))
