"""A multi-node Ray cluster on one machine: each node a `ray start` on its own loopback address.

The recipe (docs/contributing.md, "Ray on one machine"): no node on 127.0.0.1 (head 127.0.0.11, workers 127.0.0.12,
127.0.0.13, ...), a separate temp dir and port set per node (two nodes sharing one temp dir
race on the plasma socket), and per worker node its own Serve proxy/HAProxy ports. Each node
is a `RayStack`, stopped by its own PIDs, so a node can leave (and another join) mid-test.

Used by tests/test_multinode.py; a Serve app on it must use http_options.host 0.0.0.0
(replicas bind it; ray#62522), which `replicas.serve_app deploy --host 0.0.0.0` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.stacks.ray import RayStack


@dataclass
class RayCluster:
    ips: tuple[str, ...] = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
    num_cpus: int = 1
    draining_s: float = 2.0
    extra_env: dict[str, str] = field(default_factory=dict)
    nodes: list[RayStack] = field(default_factory=list)

    @property
    def head(self) -> RayStack:
        return self.nodes[0]

    @property
    def address(self) -> str:
        return self.head.address

    def start(self) -> RayCluster:
        head = RayStack(num_cpus=self.num_cpus, draining_s=self.draining_s, node_ip=self.ips[0],
                        extra_env=self.extra_env)
        self.nodes.append(head)
        head.start()
        for ip in self.ips[1:]:
            self.add_node(ip)
        return self

    def add_node(self, ip: str) -> RayStack:
        node = RayStack(num_cpus=self.num_cpus, draining_s=self.draining_s, node_ip=ip, join=self.address,
                        extra_env=self.extra_env)
        self.nodes.append(node)
        node.start()
        return node

    def remove_node(self, node: RayStack) -> None:
        node.stop()
        node.cleanup()
        self.nodes.remove(node)

    def node(self, ip: str) -> RayStack:
        return next(node for node in self.nodes if node.node_ip == ip)

    def deploy(self, *args: str, timeout_s: float = 180.0) -> dict:
        """Deploy the project's Serve app (a driver process) with the multi-node host."""
        return self.head.deploy("--host", "0.0.0.0", *args, timeout_s=timeout_s)

    def stop(self) -> None:
        for node in reversed(self.nodes):  # workers first: the head leaves last
            node.stop()
            node.cleanup()
        self.nodes.clear()
