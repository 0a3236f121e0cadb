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
