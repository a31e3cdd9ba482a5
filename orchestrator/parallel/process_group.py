"""Joining ranks into one torch process group whose servers listen on one address only.

torch's env:// and tcp:// rendezvous start the store (an unauthenticated key-value server) on
every interface, whatever MASTER_ADDR says. Here rank 0 binds the store's socket itself and hands
it to the store, so it listens only on the address the other ranks use: 127.0.0.1 when all ranks
share a machine, and then gloo and NCCL are kept on the loopback interface too.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys

LOOPBACK = "127.0.0.1"
_listening: socket.socket | None = None  # rank 0's store socket, between listen() and join()


def listen(address: str, port: int = 0) -> int:
    """Rank 0: bind the store's socket on `address` (port 0: one the OS picks); returns the port."""
    global _listening
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    sock.bind((address, port))
    sock.listen(socket.SOMAXCONN)
    _listening = sock
    return sock.getsockname()[1]


def join(backend: str, rank: int, world_size: int, address: str, port: int,
         timeout: datetime.timedelta = datetime.timedelta(minutes=30)) -> None:
    """Every rank: join the group whose store rank 0 listens on at address:port."""
    import torch.distributed as dist  # here: Ray Train's controller loads this module, not torch

    global _listening
    if address == LOOPBACK:
        interface = "lo" if sys.platform.startswith("linux") else "lo0"
        for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(variable, interface)  # a user's own choice wins
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # fail, not hang, on timeout
    if rank == 0:
        # detach: the store now owns the descriptor and closes it with the group.
        assert _listening is not None, "rank 0 binds the store's socket (listen) before it joins"
        fd, _listening = _listening.detach(), None
        store = dist.TCPStore(address, port, world_size, True, timeout, master_listen_fd=fd)
    else:
        store = dist.TCPStore(address, port, world_size, False, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timeout)
