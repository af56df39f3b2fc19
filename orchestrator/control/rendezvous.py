"""The data plane's addresses: where the torch.distributed rendezvous listens and which interface the
collectives use, chosen on the node of the rank that owns it (docs/architecture.md section 3).

Rank 0's process hosts the rendezvous store, so rank 0 picks the address and a free port on its own node
and every rank, on every node, is given that address. The address is the one of the interface the cluster
file names (``interface``: gloo's ``GLOO_SOCKET_IFNAME``, NCCL's ``NCCL_SOCKET_IFNAME``), else the address
Ray uses for the node. Each rank also points gloo and NCCL at its own node's interface: without it gloo
binds to what the host name resolves to, which on a multi-homed host or a network namespace is not an
address the other nodes reach (gloo then falls back to loopback).

Before setup every rank runs :func:`preflight`: it must reach rank 0's rendezvous listener and the
checkpoint root. A node that cannot is a deterministic fault (:class:`PreflightError`, naming the host),
never a stall retried against the restart budget.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import uuid
from pathlib import Path

import psutil

__all__ = ["PreflightError", "interface_address", "interface_of", "data_plane", "socket_env", "tcp_url",
           "RendezvousListener", "free_port", "preflight", "reach_host"]

# The environment variables gloo and NCCL read for the interface their sockets bind to.
SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


class PreflightError(RuntimeError):
    """A node cannot reach the rendezvous or the checkpoint root; the message names the host."""


def _ipv4_addresses() -> dict[str, list[str]]:
    """Interface name -> its IPv4 addresses on this host (its network namespace)."""
    return {name: [a.address for a in addrs if a.family == socket.AF_INET]
            for name, addrs in psutil.net_if_addrs().items()}


def interface_address(ifname: str) -> str:
    """The first IPv4 address of interface ``ifname`` on this host.

    Raises ValueError naming the interface and the ones this host has, when it is missing or has no IPv4
    address.
    """
    table = _ipv4_addresses()
    if not table.get(ifname):
        present = ", ".join(sorted(n for n, a in table.items() if a)) or "none"
        raise ValueError(f"interface {ifname!r} has no IPv4 address on host {socket.gethostname()} "
                         f"(interfaces with one: {present})")
    return table[ifname][0]


def interface_of(address: str) -> str | None:
    """The interface of this host that holds ``address``, or None."""
    return next((name for name, addrs in _ipv4_addresses().items() if address in addrs), None)


def data_plane(interface: str | None, node_address: str) -> tuple[str, str | None]:
    """(address, interface) of this node's data plane.

    ``interface`` (the cluster file's) wins; else ``node_address`` (the address Ray uses for the node) and
    the interface holding it (None when no local interface does, e.g. a NAT'd address: then gloo and NCCL
    keep their own choice).
    """
    if interface is not None:
        return interface_address(interface), interface
    return node_address, interface_of(node_address)


def socket_env(interface: str | None) -> dict[str, str]:
    """Environment pointing gloo and NCCL at ``interface`` (empty when None)."""
    return {var: interface for var in SOCKET_IFNAME_VARS} if interface else {}


def tcp_url(address: str, port: int) -> str:
    """The ``tcp://`` init method of torch.distributed for ``address:port`` (IPv6 in brackets)."""
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    return f"tcp://{host}:{port}"


# Where a rendezvous port is taken: below the kernel's ephemeral range (``ip_local_port_range``, 32768-60999 by
# default), from which the kernel gives every outgoing connection (gloo's, Ray's) its local port and ``bind(0)``
# its answer, so that no other socket takes the port between its release and the store's bind.
_PORT_RANGE = (20000, 32768)


class RendezvousListener:
    """A listening socket holding a free port until rank 0's store takes the socket over; ``address`` is the
    data-plane address the other ranks are given.

    The port is held on every local address, not only ``address``, as torch's TCPStore listens on the wildcard
    (``*:port``). Other nodes probe it in :func:`preflight`. Rank 0's store then serves on this very socket
    (:meth:`hand_over`, TCPStore's ``master_listen_fd``): the port is never free between the probes and the
    store, so no other socket (an outgoing connection of Ray or gloo) can take it and fail the store's bind.
    """

    def __init__(self, address: str) -> None:
        self.sock = _hold_port(ipaddress.ip_address(address).version)
        self.address = address
        self.port = self.sock.getsockname()[1]

    def hand_over(self) -> socket.socket:
        """The listening socket, for a store to serve on (``master_listen_fd=sock.fileno()``, then
        ``sock.detach()`` once the store owns the descriptor); the listener no longer holds it."""
        sock, self.sock = self.sock, None
        return sock

    def release(self) -> None:
        """Close the socket (the port is free again), unless it was handed over."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def free_port() -> int:
    """A TCP port free now on every local address, below the ephemeral range where that range leaves room
    (for a store or server bound to it next: a torchrun rendezvous, a test's endpoint)."""
    with _hold_port(4) as sock:
        return sock.getsockname()[1]


def _hold_port(version: int) -> socket.socket:
    """A socket listening on a free TCP port of every local address: one of 64 random ports below the
    ephemeral range, else (a host whose ephemeral range starts low, or all 64 taken) the kernel's choice.
    Raises OSError when none is free, or for IPv6 (``version``) on a host without IPv6."""
    high = min(_PORT_RANGE[1], _ephemeral_low())
    candidates = random.Random().sample(range(_PORT_RANGE[0], high), 64) if high - _PORT_RANGE[0] >= 64 else []
    for port in [*candidates, 0]:
        sock, wildcard = _wildcard_socket(version)
        try:
            sock.bind((wildcard, port))
            sock.listen(256)
        except OSError:
            sock.close()
            continue
        return sock
    raise OSError("no free TCP port on this host")


def _wildcard_socket(version: int) -> tuple[socket.socket, str]:
    """A TCP socket (SO_REUSEADDR, as the store's) and the wildcard address that covers every local address:
    dual-stack ``::`` where the host has IPv6 (what the store binds first), else ``0.0.0.0``."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        wildcard = "::"
    except OSError:
        if version == 6:
            raise
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        wildcard = "0.0.0.0"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock, wildcard


def _ephemeral_low(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _PORT_RANGE[1]


def _host() -> str:
    return socket.gethostname()


def preflight(node_address: str, rendezvous: tuple[str, int], checkpoint_root: str | None, timeout_s: float,
              storage_kwargs: dict | None = None) -> None:
    """Check from this node that the rendezvous ``(address, port)`` accepts a TCP connection within
    ``timeout_s`` and that ``checkpoint_root`` (a directory or ``s3://``) can be written and read back.

    Raises PreflightError naming the host (``node_address``) and what it cannot reach.
    """
    who = f"host {node_address} ({_host()})"
    address, port = rendezvous
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise PreflightError(f"{who} cannot reach the rendezvous {address}:{port}: {exc.strerror or exc}") from None
    if checkpoint_root is None:
        return
    from v4train.orchestrator.checkpoint.storage import Storage

    probe = f".preflight-{node_address}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        storage = Storage(checkpoint_root, **(storage_kwargs or {}))
        storage.write_text(probe, node_address)
        ok = storage.read_text(probe) == node_address
        storage.remove(probe)
    except Exception as exc:  # OSError, botocore errors: one line naming the host
        raise PreflightError(f"{who} cannot write the checkpoint root {checkpoint_root}: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not ok:
        raise PreflightError(f"{who} reads back something else than it wrote under {checkpoint_root}")


def reach_host(address: str, port: int, timeout_s: float) -> None:
    """Check from this node that the host of a rendezvous that may not listen yet (``MASTER_ADDR:MASTER_PORT``
    under torchrun or srun, where rank 0 opens the store when it joins) answers: a connection accepted or
    refused passes (the host is reached; the store comes later, and torch retries); a name that does not
    resolve, no route, or no answer within ``timeout_s`` raises PreflightError naming this host."""
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            pass
    except ConnectionRefusedError:
        return
    except OSError as exc:
        raise PreflightError(f"host {_host()} cannot reach the rendezvous {address}:{port}: "
                             f"{exc.strerror or exc}") from None
