"""No import cycles: the module graph of the project's packages is acyclic.

The graph is grimp's (https://github.com/seddonym/grimp): every `import` / `from ... import` statement in a
module, function-level imports included (a lazy import inside a function still ties the two modules together).
A cycle is reported as the module chain that closes it, e.g. `cluster.cli -> cluster.commands.train ->
cluster.train -> cluster.cli`.
"""

from __future__ import annotations

from collections import deque
from functools import cache
from pathlib import Path

import grimp  # the dev extra (pyproject.toml)

from tests.support.paths import REPO

PACKAGES = ("protos", "runtime", "actors", "reward_service", "learner", "cluster")
HOW_TO_BREAK = (
    "(break a cycle by handing the class or function in from the caller, the way cluster/launch.py hands "
    "cluster/pools/topology.py the worker classes, instead of importing it)"
)


@cache
def _import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports directly (function-level imports included)."""
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False, cache_dir=None)  # reads every file
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative: the components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges[node]:
                    found.append(component)
    return found


def _shortest_cycle(edges: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """The shortest import chain within `component` that starts and ends at `start` (BFS)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(edges[node] & component):
            if child == start:
                back = [node]  # node, its parent, ..., start
                while back[-1] != start:
                    back.append(parent[back[-1]])
                return [*reversed(back), start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def _cycles(edges: dict[str, set[str]]) -> list[str]:
    """One chain per distinct shortest cycle through each module of each cycle, starting at its smallest name."""
    found: list[str] = []
    for component in _strongly_connected(edges):
        for start in sorted(component):
            cycle = _shortest_cycle(edges, component, start)[:-1]
            first = cycle.index(min(cycle))
            chain = " -> ".join([*cycle[first:], *cycle[:first], min(cycle)])
            if chain not in found:
                found.append(chain)
    return found


def test_the_graph_is_built_from_this_checkout():
    """grimp reads the files the tests import (the checkout, not another install), every package included."""
    import cluster

    assert Path(cluster.__file__).resolve().parent == REPO / "cluster", (
        f"cluster is imported from {cluster.__file__}, not from {REPO}: run pytest from the repository root"
    )
    edges = _import_graph()
    for package in PACKAGES:
        assert package in edges, f"package {package} is missing from the import graph"
    # `segr1 train` imports cluster.config only inside run(): the graph must see function-level imports.
    assert "cluster.config" in edges["cluster.commands.train"], (
        "grimp no longer reports function-level imports: cluster.commands.train -> cluster.config is missing"
    )


def test_the_cycle_finder_reports_a_cycle():
    """The finder itself: a three-module ring is reported as its chain; a diamond is not a cycle."""
    ring = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(ring) == ["a -> b -> c -> a"]
    two_through_hub = {"hub": {"x", "y"}, "x": {"hub"}, "y": {"hub"}}
    assert _cycles(two_through_hub) == ["hub -> x -> hub", "hub -> y -> hub"]
    diamond = {"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}
    assert _cycles(diamond) == []
    assert _cycles({"a": {"a"}}) == ["a -> a"]


def test_no_import_cycle_in_cluster():
    edges = _import_graph()
    ours = {m for m in edges if m == "cluster" or m.startswith("cluster.")}
    cycles = _cycles({m: edges[m] & ours for m in ours})
    assert not cycles, f"import cycles among cluster's modules:\n{HOW_TO_BREAK}\n" + "\n".join(cycles)


def test_no_import_cycle_anywhere():
    cycles = _cycles(_import_graph())
    assert not cycles, f"import cycles among {', '.join(PACKAGES)}:\n{HOW_TO_BREAK}\n" + "\n".join(cycles)


def test_topology_is_handed_the_classes_it_runs():
    """cluster/pools/topology.py places actors; the classes come from its callers (cluster/launch.py, the evaluation
    job), so it imports no worker package, no driver and no evaluation module."""
    imported = _import_graph()["cluster.pools.topology"]
    forbidden = {
        m
        for m in imported
        if m.split(".")[0] in {"actors", "reward_service", "learner"}
        or m in {"cluster.driver.loop", "cluster.launch", "cluster.eval_job", "cluster.evaluation"}
    }
    assert not forbidden, (
        f"cluster.pools.topology imports {sorted(forbidden)}: take the class from the caller instead"
    )
