"""
A real Redis Cluster for integration tests: N redis-server processes with
cluster-enabled on free loopback ports (each with its own directory), joined
with C{redis-cli --cluster create}, and the topology changes the scenarios
need: reshard, CLUSTER FAILOVER, add a master and rebalance, SIGKILL a master
and measure how long the cluster takes to promote its replica, and one slot
moved by hand (CLUSTER SETSLOT and MIGRATE) for the ASK and MOVED tests.  Every process
is stopped by L{Cluster.stop} (and by tests.support.processes' exit hook).

The nodes are told about each other by redis-cli and gossip; every wait here
polls the nodes themselves (CLUSTER INFO, CLUSTER NODES, INFO replication),
never sleeps a guessed time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

from tests.support import processes
from tests.support.resp import Connection, ErrorReply
from tests.support.workers import poll

HOST = processes.HOST
SLOTS = 16384


class ClusterError(Exception):
    """The cluster did not reach the state a helper waits for, or redis-cli failed."""


class Node:
    """One redis-server of the cluster: its client port, bus port, directory and process."""

    def __init__(self, directory: str, node_timeout: int):
        self.port = processes.free_port()
        self.bus_port = processes.free_port()
        while self.bus_port == self.port:
            self.bus_port = processes.free_port()
        self.directory = directory
        os.makedirs(directory)
        argv = [
            "redis-server", "--port", str(self.port), "--bind", HOST, "--protected-mode", "no",
            "--daemonize", "no", "--dir", directory, "--save", "", "--appendonly", "no",
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(self.bus_port), "--cluster-node-timeout", str(node_timeout),
            # A replica's first sync at once (the default waits 5 s for more replicas).
            "--repl-diskless-sync-delay", "0",
        ]
        self.process = processes.Process(argv, self.port, cwd=directory,
                                         log_path=os.path.join(directory, "redis.log"))
        self.id = self.call("CLUSTER", "MYID").decode()

    @property
    def address(self) -> str:
        return "%s:%d" % (HOST, self.port)

    def alive(self) -> bool:
        return self.process.alive()

    def call(self, *args):
        """One command on a fresh connection; its reply (errors as L{ErrorReply})."""
        with Connection(self.port, timeout=5.0) as conn:
            return conn.call(*args)

    def call_ok(self, *args) -> None:
        """One command whose reply must be OK; L{ClusterError} if it is anything else."""
        reply = self.call(*[str(a) for a in args])
        if reply != b"OK":
            raise ClusterError("%s on %r: %r" % (" ".join(str(a) for a in args), self, reply))

    def info(self, *section) -> dict:
        """INFO (or CLUSTER INFO with C{section} ("cluster",)) as a dict of strings."""
        text = self.call("CLUSTER", "INFO") if section == ("cluster",) else self.call("INFO", *section)
        if isinstance(text, ErrorReply):
            raise ClusterError("%s: %s" % (self.address, text.decode()))
        fields = {}
        for line in text.decode().splitlines():
            if ":" in line:
                name, value = line.split(":", 1)
                fields[name] = value
        return fields

    def role(self) -> str:
        """"master" or "slave", as the node itself says."""
        return self.info("replication")["role"]

    def __repr__(self):
        return "<Node %s %s>" % (self.address, self.id[:8])


def parse_nodes(text: bytes) -> dict:
    """
    CLUSTER NODES as {node id: {"port", "flags" (set), "master" (id or None),
    "slots" (set of slot numbers; importing/migrating entries left out)}}.
    """
    nodes = {}
    for line in text.decode().splitlines():
        fields = line.split()
        if not fields:
            continue
        node_id, address, flags, master = fields[0], fields[1], set(fields[2].split(",")), fields[3]
        slots = set()
        for spec in fields[8:]:
            if spec.startswith("["):
                continue
            first, _, last = spec.partition("-")
            slots.update(range(int(first), int(last or first) + 1))
        nodes[node_id] = {"port": int(address.split("@")[0].rsplit(":", 1)[1]), "flags": flags,
                          "master": None if master == "-" else master, "slots": slots}
    return nodes


def answered(predicate):
    """C{predicate}, with a node that does not answer right now (mid-change, or killed) read as false."""

    def check():
        try:
            return predicate()
        except (OSError, ConnectionError, ClusterError, KeyError):
            return False

    return check


class Cluster:
    """
    A Redis Cluster of C{masters} masters with C{replicas} replicas each, all on
    127.0.0.1.  L{start} creates it and waits until it is whole; the helpers
    change its topology and wait until every live node agrees on the result.
    """

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout: int = 2000):
        self.master_count = masters
        self.replicas = replicas
        self.node_timeout = node_timeout
        self.directory = tempfile.mkdtemp(prefix="tp-cluster-")
        self.nodes = []

    # -- life ------------------------------------------------------------------------

    def start(self) -> "Cluster":
        try:
            for _ in range(self.master_count * (1 + self.replicas)):
                self._new_node()
            self.redis_cli("create", *[n.address for n in self.nodes],
                           "--cluster-replicas", str(self.replicas), "--cluster-yes")
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.process.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _new_node(self) -> Node:
        node = Node(os.path.join(self.directory, "node%d" % (len(self.nodes),)), self.node_timeout)
        self.nodes.append(node)
        return node

    def redis_cli(self, subcommand: str, *args, timeout: float = 120.0) -> str:
        """C{redis-cli --cluster SUBCOMMAND ARGS}; its output, or L{ClusterError} if it fails."""
        argv = ["redis-cli", "--cluster", subcommand] + list(args)
        try:
            out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ClusterError("%s timed out after %ss" % (" ".join(argv), timeout))
        if out.returncode != 0 or "[ERR]" in out.stdout:
            raise ClusterError("%s exited %s:\n%s" % (" ".join(argv), out.returncode, out.stdout[-4000:]))
        return out.stdout

    # -- what the cluster looks like -------------------------------------------------

    @property
    def ports(self) -> list:
        return [n.port for n in self.nodes]

    def live_nodes(self) -> list:
        return [n for n in self.nodes if n.alive()]

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.id == node_id)

    def topology(self, via: Node = None) -> dict:
        """L{parse_nodes} of CLUSTER NODES as C{via} (default: the first live node) sees it."""
        return parse_nodes((via or self.live_nodes()[0]).call("CLUSTER", "NODES"))

    def masters(self) -> list:
        """The live masters that serve slots, by port."""
        topology = self.topology()
        return sorted((self.node(i) for i, n in topology.items()
                       if "master" in n["flags"] and n["slots"] and "fail" not in n["flags"]),
                      key=lambda n: n.port)

    def replicas_of(self, master: Node) -> list:
        topology = self.topology()
        return sorted((self.node(i) for i, n in topology.items()
                       if n["master"] == master.id and "fail" not in n["flags"]), key=lambda n: n.port)

    def slots_of(self, node: Node) -> set:
        return self.topology()[node.id]["slots"]

    def owner(self, slot: int) -> Node:
        """The master serving C{slot}."""
        for node_id, n in self.topology().items():
            if slot in n["slots"] and "fail" not in n["flags"]:
                return self.node(node_id)
        raise ClusterError("no node serves slot %d" % (slot,))

    # -- waiting ---------------------------------------------------------------------

    def is_ok(self) -> bool:
        """
        Whether the cluster is whole: every live node says cluster_state:ok with all
        slots assigned and ok, every live node sees the same masters serving the same
        slots and no slot half-migrated, and every replica's link to its master is up.
        """
        views = []
        for node in self.live_nodes():
            info = node.info("cluster")
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
                return False
            text = node.call("CLUSTER", "NODES")
            if b"[" in text:  # an importing or migrating slot
                return False
            topology = parse_nodes(text)
            live = {n.id for n in self.live_nodes()}
            if set(topology) & live != live:
                return False  # a node not yet known to this one
            views.append(sorted((i, n["master"], "master" in n["flags"], tuple(sorted(n["slots"])))
                                for i, n in topology.items() if i in live))
        if any(view != views[0] for view in views[1:]):
            return False
        for node in self.live_nodes():
            info = node.info("replication")
            if info["role"] == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def wait_ok(self, timeout: float = 30.0) -> None:
        poll(answered(self.is_ok), timeout, interval=0.05, message="the cluster to be whole and agreed")

    # -- topology changes --------------------------------------------------------------

    def reshard(self, source: Node, target: Node, slots: int) -> None:
        """Move C{slots} slots (and their keys) from C{source} to C{target} with redis-cli, online."""
        self.redis_cli("reshard", source.address, "--cluster-from", source.id, "--cluster-to", target.id,
                       "--cluster-slots", str(slots), "--cluster-yes")
        self.wait_ok()

    def failover(self, replica: Node) -> Node:
        """
        CLUSTER FAILOVER on C{replica} (a manual failover: its master stops taking
        writes until the replica has caught up, then they swap roles); returns the
        old master, once the cluster is whole again with the roles swapped.
        """
        old_master = self.node(self.topology()[replica.id]["master"])
        replica.call_ok("CLUSTER", "FAILOVER")
        poll(answered(lambda: replica.role() == "master" and old_master.role() == "slave"), 30.0,
             message="%r and %r to swap roles" % (replica, old_master))
        self.wait_ok()
        return old_master

    def begin_move(self, slot: int, source: Node, target: Node) -> None:
        """Mark C{slot} migrating from C{source} and importing at C{target} (ASK from now on)."""
        target.call_ok("CLUSTER", "SETSLOT", slot, "IMPORTING", source.id)
        source.call_ok("CLUSTER", "SETSLOT", slot, "MIGRATING", target.id)

    def migrate_key(self, key: str, source: Node, target: Node) -> None:
        """MIGRATE C{key} from C{source} to C{target} (a slot in the middle of a move)."""
        source.call_ok("MIGRATE", HOST, target.port, key, 0, 5000)

    def end_move(self, slot: int, target: Node) -> None:
        """Give C{slot} to C{target} on every node (MOVED from now on)."""
        for node in self.nodes:
            node.call_ok("CLUSTER", "SETSLOT", slot, "NODE", target.id)

    def add_master(self) -> Node:
        """A new empty master joined to the cluster (redis-cli --cluster add-node), not yet given slots."""
        node = self._new_node()
        self.redis_cli("add-node", node.address, self.live_nodes()[0].address)
        self.wait_ok()
        return node

    def rebalance(self) -> None:
        """redis-cli --cluster rebalance --cluster-use-empty-masters: slots spread over every master."""
        self.redis_cli("rebalance", self.live_nodes()[0].address, "--cluster-use-empty-masters")
        self.wait_ok()

    def kill_master(self, master: Node, timeout: float = 30.0) -> dict:
        """
        SIGKILL C{master} and wait until one of its replicas is promoted and every
        live node says the cluster is whole again.  Returns the times:
        {"killed": when the signal was sent, "promoted": when the cluster was whole
        again (time.time()), "window": the difference in seconds, "replica": the
        promoted node}.  The time is the first poll (every 10 ms) that saw it.
        """
        replicas = self.replicas_of(master)
        if not replicas:
            raise ClusterError("%r has no replica to promote" % (master,))
        killed = time.time()
        master.process.signal(signal.SIGKILL)
        master.process.proc.wait()

        def promoted():
            for replica in replicas:
                if replica.role() == "master" and self.is_ok():
                    return replica
            return None

        replica = poll(answered(promoted), timeout, interval=0.01,
                       message="a replica of %r to be promoted" % (master,))
        done = time.time()
        return {"killed": killed, "promoted": done, "window": done - killed, "replica": replica}
