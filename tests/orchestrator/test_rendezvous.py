"""The data plane's address choice (interface named by the cluster file, else the node's Ray address), the
handover of rank 0's rendezvous port to torch's TCPStore, and the preflight that names an unreachable host."""

from __future__ import annotations

import errno
import socket
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from v4train.orchestrator.control import rendezvous
from v4train.orchestrator.control.rendezvous import PreflightError, RendezvousListener
from v4train.orchestrator.spec import ClusterSpec


def _loopback_name() -> str:
    found = rendezvous.interface_of("127.0.0.1")
    assert found is not None, "this host has no interface holding 127.0.0.1"
    return found


def test_named_interface_gives_its_address_whatever_ray_says():
    lo = _loopback_name()
    assert rendezvous.data_plane(lo, "198.51.100.7") == ("127.0.0.1", lo)
    assert rendezvous.interface_address(lo) == "127.0.0.1"


def test_without_interface_the_node_address_and_the_interface_holding_it():
    lo = _loopback_name()
    assert rendezvous.data_plane(None, "127.0.0.1") == ("127.0.0.1", lo)
    # an address no local interface holds (NAT): kept, and gloo/NCCL keep their own interface choice
    assert rendezvous.data_plane(None, "198.51.100.7") == ("198.51.100.7", None)
    assert rendezvous.socket_env(None) == {}


def test_missing_interface_is_named_with_the_host_and_the_present_ones():
    with pytest.raises(ValueError, match=r"'nosuch0' has no IPv4 address on host .*interfaces with one: .*lo"):
        rendezvous.data_plane("nosuch0", "127.0.0.1")


def test_socket_env_points_gloo_and_nccl_at_the_interface():
    assert rendezvous.socket_env("eth1") == {"GLOO_SOCKET_IFNAME": "eth1", "NCCL_SOCKET_IFNAME": "eth1"}


def test_tcp_url_brackets_ipv6():
    assert rendezvous.tcp_url("10.213.0.1", 29500) == "tcp://10.213.0.1:29500"
    assert rendezvous.tcp_url("fd00::1", 29500) == "tcp://[fd00::1]:29500"


def test_cluster_file_field():
    spec = ClusterSpec(name="two", nodes=2, devices_per_node=4, interface="v4eth")
    assert spec.interface == "v4eth"
    assert ClusterSpec(name="one", devices_per_node=4).interface is None


def test_the_store_serves_on_the_listeners_socket_after_probes_and_the_port_is_never_free(tmp_path):
    listener = RendezvousListener("127.0.0.1")
    rendezvous.preflight("127.0.0.1", (listener.address, listener.port), str(tmp_path / "ckpt"), 2.0)
    sock = listener.hand_over()
    listener.release()  # a no-op once handed over: the store's socket stays open
    with socket.socket() as other, pytest.raises(OSError) as exc:
        other.bind(("127.0.0.2", listener.port))  # between the probes and the store: still held
    assert exc.value.errno == errno.EADDRINUSE
    store = dist.TCPStore("127.0.0.1", listener.port, 2, is_master=True, wait_for_workers=False,
                          master_listen_fd=sock.fileno())
    sock.detach()
    client = dist.TCPStore("127.0.0.1", listener.port, 2, is_master=False)
    client.set("k", "v")  # the probe's closed connection in the backlog did not disturb the store
    assert store.get("k") == b"v"
    assert list((tmp_path / "ckpt").iterdir()) == []  # the probe file is gone
    del client, store  # the store owns the descriptor: the port is free once it is gone
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("0.0.0.0", listener.port))


def test_listener_holds_its_port_on_every_local_address():
    # the store listens on *:port: a port free on the data-plane address but held on another local address
    # would fail the store's bind with EADDRINUSE, so the listener must keep every address's port free
    listener = RendezvousListener("127.0.0.1")
    try:
        for other in ("127.0.0.2", "0.0.0.0"):
            with socket.socket() as s, pytest.raises(OSError) as exc:
                s.bind((other, listener.port))
            assert exc.value.errno == errno.EADDRINUSE, other
        with socket.create_connection(("127.0.0.2", listener.port), timeout=2.0):
            pass  # and it answers probes on any of them
    finally:
        listener.release()


def test_unreachable_rendezvous_fails_within_the_timeout_naming_the_host(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    expected = rf"host 10\.213\.9\.2 \(.*\) cannot reach the rendezvous 127\.0\.0\.1:{port}"
    with pytest.raises(PreflightError, match=expected):
        rendezvous.preflight("10.213.9.2", ("127.0.0.1", port), str(tmp_path), 2.0)
    assert time.monotonic() - started < 3.0


def test_unwritable_checkpoint_root_names_the_host(tmp_path):
    listener = RendezvousListener("127.0.0.1")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    try:
        with pytest.raises(PreflightError, match=r"host 127\.0\.0\.1 \(.*\) cannot write the checkpoint root"):
            rendezvous.preflight("127.0.0.1", (listener.address, listener.port), str(blocker / "ckpt"), 2.0)
    finally:
        listener.release()


def test_reach_host_passes_a_refused_port_and_names_the_host_it_cannot_reach():
    """Under torchrun or srun rank 0's store may not listen yet: a refusal means the host answered."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
        rendezvous.reach_host("127.0.0.1", closed.getsockname()[1], 2.0)
    with pytest.raises(PreflightError, match=rf"host {socket.gethostname()} cannot reach the rendezvous "
                                             r"nosuch\.invalid:29500"):
        rendezvous.reach_host("nosuch.invalid", 29500, 2.0)


def test_a_rendezvous_port_is_free_and_below_the_ephemeral_range():
    """The kernel hands outgoing connections local ports from its ephemeral range; a rendezvous port found free
    there could be taken by one (gloo's, Ray's) before torchrun or rank 0 binds it (EADDRINUSE)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(20):
        port = rendezvous.free_port()
        assert 20000 <= port < low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("0.0.0.0", port))  # free on every address, as the store's wildcard bind needs
        listener = RendezvousListener("127.0.0.1")
        listener.release()
        assert 20000 <= listener.port < low
