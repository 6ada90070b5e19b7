"""
A small real Redis Cluster for the cluster pool's integration tests: three
masters, no replicas (or one replica each), cluster-enabled redis-server
processes on free loopback ports joined with C{redis-cli --cluster create},
and the slot moves the redirect tests make by hand (CLUSTER SETSLOT and
MIGRATE).  Every process is stopped by L{SmallCluster.stop}.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time

from tests.support import processes

HOST = processes.HOST


class SmallCluster:
    """C{masters} masters (and C{replicas} replicas each), their slots dealt by redis-cli."""

    def __init__(self, masters: int = 3, replicas: int = 0, node_timeout: int = 2000):
        self.directory = tempfile.mkdtemp(prefix="tp-cluster-")
        self.nodes = []
        self.replica_count = masters * replicas
        try:
            for number in range(masters * (1 + replicas)):
                self.nodes.append(self._start(number, node_timeout))
            addresses = ["%s:%d" % (HOST, node.port) for node in self.nodes]
            subprocess.run(["redis-cli", "--cluster", "create"] + addresses
                           + ["--cluster-replicas", str(replicas), "--cluster-yes"],
                           check=True, capture_output=True, timeout=60)
            self.wait_ok()
        except Exception:
            self.stop()
            raise

    def _start(self, number: int, node_timeout: int):
        port = processes.free_port()
        bus_port = processes.free_port()  # given: the default (port + 10000) may be past 65535
        while bus_port == port:
            bus_port = processes.free_port()
        directory = os.path.join(self.directory, str(number))
        os.makedirs(directory)
        argv = [
            "redis-server", "--port", str(port), "--bind", HOST, "--protected-mode", "no", "--daemonize", "no",
            "--dir", directory, "--save", "", "--appendonly", "no", "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf", "--cluster-port", str(bus_port), "--cluster-node-timeout", str(node_timeout),
            "--repl-diskless-sync-delay", "0",
        ]
        return processes.Process(argv, port, cwd=directory, log_path=os.path.join(directory, "redis.log"))

    @property
    def ports(self) -> list:
        return [node.port for node in self.nodes]

    def cli(self, port: int, *args) -> str:
        """One command with redis-cli on the node at C{port}; its output."""
        result = subprocess.run(["redis-cli", "-h", HOST, "-p", str(port)] + [str(a) for a in args],
                                check=True, capture_output=True, timeout=30)
        return result.stdout.decode().strip()

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node says cluster_state:ok and sees every node, and every replica is in sync."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(self._node_ok(port) for port in self.ports):
                return
            time.sleep(0.05)
        raise RuntimeError("the cluster is not ok after %ss" % timeout)

    def _node_ok(self, port: int) -> bool:
        info = self.cli(port, "CLUSTER", "INFO")
        if "cluster_state:ok" not in info or "cluster_known_nodes:%d" % len(self.nodes) not in info:
            return False
        replication = self.cli(port, "INFO", "replication")
        if "role:master" not in replication and "master_link_status:up" not in replication:
            return False
        # Every replica known as one by this node too (gossip takes a moment).
        lines = self.cli(port, "CLUSTER", "NODES").splitlines()
        return sum(1 for line in lines if "slave" in line.split()[2]) == self.replica_count

    def node_id(self, port: int) -> str:
        return self.cli(port, "CLUSTER", "MYID")

    def owner(self, slot: int) -> int:
        """The port of the master that serves C{slot}, as the first node sees it."""
        for line in self.cli(self.ports[0], "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2]:
                continue
            for span in fields[8:]:
                if span.startswith("["):
                    continue
                first, _, last = span.partition("-")
                if int(first) <= slot <= int(last or first):
                    return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise RuntimeError("no master serves slot %d" % slot)

    def replica_of(self, master: int) -> int:
        """The port of a replica of the master at C{master}."""
        master_id = self.node_id(master)
        for line in self.cli(master, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if fields[3] == master_id and "slave" in fields[2]:
                return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise RuntimeError("no replica of %d" % master)

    def fail_over(self, replica: int, timeout: float = 20.0) -> None:
        """CLUSTER FAILOVER on C{replica}; returns once it is a master that every node sees as one."""
        self.cli(replica, "CLUSTER", "FAILOVER")
        deadline = time.time() + timeout
        while time.time() < deadline:
            if "role:master" in self.cli(replica, "INFO", "replication"):
                break
            time.sleep(0.02)
        else:
            raise RuntimeError("%d did not become a master" % replica)
        self.wait_ok()

    def begin_move(self, slot: int, source: int, target: int) -> None:
        """Mark C{slot} migrating from C{source} and importing at C{target} (ASK from now on)."""
        self.cli(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        self.cli(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target))

    def migrate_key(self, key: str, source: int, target: int) -> None:
        self.cli(source, "MIGRATE", HOST, target, key, 0, 5000)

    def end_move(self, slot: int, target: int) -> None:
        """Give C{slot} to C{target} on every node (MOVED from now on)."""
        target_id = self.node_id(target)
        for port in self.ports:
            self.cli(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
