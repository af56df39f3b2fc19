"""A multi-host simulated cluster on one machine: N network namespaces joined by veth links to one bridge,
each running a Ray node with its own address (``v4train sim-cluster up|down|exec``; needs root).

Host ``i`` is the namespace ``v4sim-TAG-i`` with one interface ``v4eth`` at ``10.213.S.(i+1)/24`` (``S``
drawn from the tag) whose peer is enslaved to the bridge ``v4b-TAG``; host 0 runs the Ray head (GCS on port
6379), the others ``ray start --address`` with ``--node-ip-address``. The namespaces have no route out and
the bridge carries no address, so the cluster's traffic stays on the bridge. The filesystem is shared, so
a run directory, a data set and a checkpoint root are seen by every host at the same path, as on a
cluster with a shared filesystem.

Every Ray process lives in its host's namespace, so teardown kills exactly the processes
``ip netns pids`` lists for the namespaces this cluster created, then deletes them and the bridge.
:class:`SimCluster` is a context manager that tears down on exit and at interpreter exit, even after a
failure; the CLI keeps the names in a state file between ``up`` and ``down``.

The node-loss drills use the same handles: :meth:`SimCluster.kill_host` (every process of a host at
once) and :meth:`SimCluster.cut_link` (the host's link down).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["SimCluster", "SimHost", "SimClusterError", "can_create", "add_cli_arguments", "run_cli"]

GCS_PORT = 6379
NS_IFNAME = "v4eth"  # the data-plane interface inside every host (GLOO_SOCKET_IFNAME)
DEFAULT_STATE = "/tmp/v4train-sim-cluster.json"
START_ATTEMPTS = 5
AGENT_PORTS = {"dashboard-agent-grpc-port": 52366, "dashboard-agent-listen-port": 52365,
               "metrics-export-port": 52367, "runtime-env-agent-port": 52368}


RAY_START = "v4train.orchestrator.tools.ray_start"  # ``ray start`` that waits for a slow node to register


class SimClusterError(RuntimeError):
    """A namespace, link or Ray node could not be created or did not come up; the message names it."""


def can_create() -> str | None:
    """None when this process can build a simulated cluster, else the reason it cannot (for skips)."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SimClusterError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


@dataclass
class SimHost:
    """One simulated host: its namespace, address, host-side veth and the pid of its ``ray start``."""

    index: int
    netns: str
    address: str
    veth: str
    ray_pid: int | None = None


@dataclass
class SimCluster:
    """N hosts in network namespaces, each a Ray node with ``cpus`` logical CPUs.

    Args:
        hosts: number of hosts (>= 1; host 0 runs the Ray head).
        cpus: logical CPUs each Ray node offers (one rank actor takes one).
        tag: 4 hex characters naming the namespaces, links and bridge (default: random).
        python: the interpreter whose ``ray`` starts the nodes (the one v4train is installed in).
    """

    hosts: int
    cpus: int = 2
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    python: str = sys.executable
    members: list[SimHost] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.hosts < 1:
            raise ValueError(f"hosts={self.hosts}: at least one host")
        if self.hosts > 250:
            raise ValueError(f"hosts={self.hosts}: at most 250 hosts in one /24")
        self.subnet = f"10.213.{int(self.tag, 16) % 250}"
        self.bridge = f"v4b-{self.tag}"
        self.temp_dir = f"/tmp/v4sim-{self.tag}"

    # ------------------------------------------------------------------ addresses
    @property
    def head_address(self) -> str:
        """The Ray GCS address of the head (``HOST:PORT``), what ``RAY_ADDRESS`` names inside a host."""
        return f"{self.subnet}.1:{GCS_PORT}"

    def exec_prefix(self, host: int = 0) -> list[str]:
        """Command prefix running a program inside host ``host``'s namespace with ``RAY_ADDRESS`` set."""
        return ["ip", "netns", "exec", self.members[host].netns, "env", f"RAY_ADDRESS={self.head_address}"]

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> SimCluster:
        atexit.register(self.down)
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()
        atexit.unregister(self.down)

    def up(self, timeout_s: float = 120.0) -> None:
        """Create the bridge, the namespaces and their links, start the Ray nodes and wait until every
        node is alive. Raises SimClusterError naming what failed (the caller tears down)."""
        reason = can_create()
        if reason:
            raise SimClusterError(reason)
        _ip("link", "add", self.bridge, "type", "bridge")
        self.members = []  # filled host by host, so that down() removes what exists after a failure
        _ip("link", "set", self.bridge, "up")
        for i in range(self.hosts):
            host = SimHost(i, f"v4sim-{self.tag}-{i}", f"{self.subnet}.{i + 1}", f"v4h{self.tag}{i}")
            _ip("netns", "add", host.netns)
            self.members.append(host)
            _ip("link", "add", host.veth, "type", "veth", "peer", "name", NS_IFNAME, "netns", host.netns)
            _ip("link", "set", host.veth, "master", self.bridge, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", NS_IFNAME)
            _ip("-n", host.netns, "link", "set", NS_IFNAME, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
        Path(self.temp_dir).mkdir(parents=True, exist_ok=True)
        # One node at a time, each tried up to START_ATTEMPTS times: a raylet gives its dashboard agent (a
        # Python process) a fixed ~15 s to start and aborts after it, which a loaded machine can exceed.
        for host in self.members:
            for attempt in range(START_ATTEMPTS):
                self._start_ray(host)
                try:
                    self.wait_nodes(host.index + 1, timeout_s)
                    break
                except SimClusterError:
                    if attempt == START_ATTEMPTS - 1:
                        raise
                    _kill_namespace(host.netns, signal.SIGKILL)

    def _start_ray(self, host: SimHost) -> None:
        role = (["--head", f"--port={GCS_PORT}", "--include-dashboard=false", f"--temp-dir={self.temp_dir}"]
                if host.index == 0 else [f"--address={self.head_address}"])
        # Fixed agent ports (each host has its own namespace, so they never collide): with dynamic ones the
        # raylet waits for the agents to write their port files, which a loaded machine can time out.
        ports = [f"--{name}={port}" for name, port in AGENT_PORTS.items()]
        cmd = ["ip", "netns", "exec", host.netns, self.python, "-m", RAY_START, "--block",
               f"--node-ip-address={host.address}", f"--num-cpus={self.cpus}", "--num-gpus=0", "--disable-usage-stats",
               *ports, *role]
        env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_agent_register_timeout_ms="300000")
        env.pop("RAY_ADDRESS", None)
        log = open(Path(self.temp_dir) / f"host{host.index}.log", "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        host.ray_pid = proc.pid

    def alive_nodes(self) -> int:
        """Number of Ray nodes the head's GCS reports alive (asked from inside host 0)."""
        code = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
                "print(sum(n['Alive'] for n in ray.nodes()))")
        try:
            proc = subprocess.run([*self.exec_prefix(0), self.python, "-c", code, self.head_address],
                                  capture_output=True, text=True, timeout=120,
                                  env=dict(os.environ, RAY_AUTH_MODE="disabled"))
        except subprocess.TimeoutExpired:
            # a head still starting on a loaded machine holds ray.init: none alive yet, the caller waits on
            return 0
        lines = proc.stdout.strip().splitlines()
        return int(lines[-1]) if proc.returncode == 0 and lines and lines[-1].isdigit() else 0

    def wait_nodes(self, count: int, timeout_s: float) -> None:
        """Block until ``count`` Ray nodes are alive; raises SimClusterError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            alive = self.alive_nodes()
            if alive == count:
                return
            dead = [h.netns for h in self.members if h.ray_pid and not _running(h.ray_pid)]
            if dead or time.monotonic() > deadline:
                logs = ", ".join(str(Path(self.temp_dir) / f"host{h.index}.log") for h in self.members)
                raise SimClusterError(f"{alive} of {count} Ray nodes alive after {timeout_s:.0f} s "
                                      f"(ray start exited in {dead or 'none'}; logs {logs})")
            time.sleep(1.0)

    # ------------------------------------------------------------------ drills
    def kill_host(self, host: int) -> list[int]:
        """SIGKILL every process of host ``host`` at once (a lost machine); returns their pids."""
        return _kill_namespace(self.members[host].netns, signal.SIGKILL)

    def cut_link(self, host: int) -> None:
        """Take host ``host``'s link down: its processes live on but reach no other host."""
        _ip("link", "set", self.members[host].veth, "down")

    def link_up(self, host: int) -> bool:
        """Whether host ``host``'s interface is up (a ``partition`` drill takes it down from inside)."""
        proc = _ip("-n", self.members[host].netns, "-o", "link", "show", NS_IFNAME, check=False)
        return proc.returncode == 0 and "state UP" in proc.stdout

    # ------------------------------------------------------------------ teardown
    def down(self) -> None:
        """Kill every process in this cluster's namespaces, delete them and the bridge (idempotent)."""
        for host in self.members:
            _kill_namespace(host.netns, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(_netns_pids(h.netns) for h in self.members):
            time.sleep(0.2)
        for host in self.members:
            _kill_namespace(host.netns, signal.SIGKILL)
            _ip("netns", "del", host.netns, check=False)
            _ip("link", "del", host.veth, check=False)
        self.members = []
        _ip("link", "del", self.bridge, check=False)

    # ------------------------------------------------------------------ CLI state
    def save(self, path: str) -> None:
        state = {"hosts": self.hosts, "cpus": self.cpus, "tag": self.tag, "python": self.python,
                 "members": [asdict(h) for h in self.members]}
        Path(path).write_text(json.dumps(state, indent=1) + "\n")

    @classmethod
    def load(cls, path: str) -> SimCluster:
        state = json.loads(Path(path).read_text())
        members = [SimHost(**h) for h in state.pop("members")]
        return cls(**state, members=members)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _netns_pids(netns: str) -> list[int]:
    proc = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def _kill_namespace(netns: str, sig: int) -> list[int]:
    pids = _netns_pids(netns)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


# ---------------------------------------------------------------------- command line
def add_cli_arguments(sub) -> None:
    """``v4train sim-cluster up|down|exec``."""
    sim = sub.add_parser("sim-cluster", help="a multi-host Ray cluster in network namespaces on this machine (root)")
    sim_sub = sim.add_subparsers(dest="sim_command", required=True)
    up = sim_sub.add_parser("up", help="create N hosts, each a Ray node; prints how to run commands inside")
    up.add_argument("--hosts", type=int, required=True, help="number of hosts (host 0 runs the Ray head)")
    up.add_argument("--cpus", type=int, default=2, help="logical CPUs per Ray node (one per rank)")
    down = sim_sub.add_parser("down", help="kill every process of the hosts and delete them")
    ex = sim_sub.add_parser("exec", help="run a command inside a host with RAY_ADDRESS set")
    ex.add_argument("--host", type=int, default=0, help="the host to run in (default 0, the head)")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    for p in (up, down, ex):
        p.add_argument("--state", default=DEFAULT_STATE, help=f"state file (default {DEFAULT_STATE})")


def run_cli(args) -> int:
    """Run ``v4train sim-cluster``; returns the exit code."""
    if args.sim_command == "up":
        if Path(args.state).exists():
            print(f"v4train: error: {args.state} exists: a simulated cluster is up (`v4train sim-cluster down`)",
                  file=sys.stderr)
            return 2
        cluster = SimCluster(args.hosts, cpus=args.cpus)
        try:
            cluster.up()
        except BaseException as exc:
            cluster.down()
            print(f"v4train: error: {exc}", file=sys.stderr)
            return 1
        cluster.save(args.state)
        print(f"{args.hosts} hosts up: {', '.join(f'{h.netns}={h.address}' for h in cluster.members)}; "
              f"Ray head {cluster.head_address}")
        print("run a job: v4train sim-cluster exec -- v4train submit JOB --cluster CLUSTER "
              f"(the cluster file with nodes: {args.hosts}, interface: {NS_IFNAME})")
        return 0
    if not Path(args.state).exists():
        print(f"v4train: error: {args.state}: no simulated cluster is up", file=sys.stderr)
        return 2
    cluster = SimCluster.load(args.state)
    if args.sim_command == "down":
        cluster.down()
        Path(args.state).unlink()
        return 0
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return subprocess.call([*cluster.exec_prefix(args.host), *cmd])
