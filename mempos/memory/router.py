"""Modules and routing: episodes go to the nearest module, or open a new one.

A module is a group of memory slots with a centroid: the running mean of
the episode embeddings routed to it (for the cosine metric, the mean of
the unit-normalised embeddings; its direction is what is compared).
`Router.route(embedding)` picks the module whose centroid is nearest in the
store's metric (cosine distance ``1 - cos``, or squared L2) and opens a new
module when there is none yet or the nearest is strictly farther than
`threshold` (same units), unless `max_modules` are open, in which case the
nearest takes it. Ties go to the lower module id. Module ids are 0, 1, 2, ...
in order of opening.

The module graph is a networkx DiGraph:

- nodes = modules, with attributes `n_slots` (slots written to it),
  `n_episodes` (episodes routed to it), `tasks` (sorted task ids seen) and
  `program_steps` (sorted program-counter steps seen);
- edges = routing transitions between consecutive routed episodes
  (a -> b, self-loops included), with attribute `count`.

`export(path)` writes it as GraphML (``.graphml``; list attributes become
JSON strings, since GraphML holds only scalars) or node-link JSON
(``.json``).
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping
from pathlib import Path

import networkx as nx
import numpy as np

from mempos.errors import UsageError
from mempos.io import atomic_path, write_json

from .store import METRICS, as_keys


def _ints(values) -> list[int]:
    if values is None:
        return []
    arr = np.asarray(values).reshape(-1)
    if arr.size and arr.dtype.kind not in "iu":
        raise UsageError(f"task ids and program steps must be integers, got {arr.dtype}")
    return sorted({int(v) for v in arr})


class Router:
    """Nearest-centroid routing of episode embeddings to modules, with the module graph."""

    def __init__(self, dim: int, metric: str = "cosine", threshold: float = 0.3,
                 max_modules: int | None = None):
        if metric not in METRICS:
            raise UsageError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if not isinstance(threshold, numbers.Real) or not np.isfinite(threshold) or threshold < 0:
            raise UsageError(f"threshold must be a non-negative number, got {threshold!r}")
        if max_modules is not None and (not isinstance(max_modules, numbers.Integral) or max_modules < 1):
            raise UsageError(f"max_modules must be a positive integer or None, got {max_modules!r}")
        self.dim = int(dim)
        self.metric = metric
        self.threshold = float(threshold)
        self.max_modules = None if max_modules is None else int(max_modules)
        self._sums = np.zeros((0, self.dim), np.float64)  # sum of (normalised) embeddings per module
        self._counts = np.zeros(0, np.int64)
        self.last_module: int | None = None
        self.graph = nx.DiGraph()

    @property
    def n_modules(self) -> int:
        return len(self._counts)

    def __repr__(self) -> str:
        return (f"Router(metric={self.metric!r}, threshold={self.threshold}, n_modules={self.n_modules}, "
                f"transitions={self.graph.number_of_edges()})")

    def _embedding(self, embedding) -> np.ndarray:
        x = as_keys(embedding, self.dim, "embedding", allow_vector=True)
        if len(x) != 1:
            raise UsageError(f"route one embedding at a time, got {len(x)}")
        x = x[0].astype(np.float64)
        if self.metric == "cosine":
            norm = np.linalg.norm(x)
            if norm == 0:
                raise UsageError("embedding is a zero vector, which has no direction for the cosine metric")
            x = x / norm
        return x

    @property
    def centroids(self) -> np.ndarray:
        """(n_modules, dim) running means of the routed embeddings (normalised ones for cosine)."""
        return self._sums / self._counts[:, None] if self.n_modules else self._sums.copy()

    def distances(self, embedding) -> np.ndarray:
        """Distance from `embedding` to every module centroid, in the metric's units."""
        return self._distances(self._embedding(embedding))

    def _distances(self, x: np.ndarray) -> np.ndarray:
        if not self.n_modules:
            return np.zeros(0)
        if self.metric == "cosine":
            norms = np.linalg.norm(self._sums, axis=1)
            cos = np.divide(self._sums @ x, norms, out=np.zeros(self.n_modules), where=norms > 0)
            return np.maximum(1.0 - cos, 0.0)
        diff = self.centroids - x
        return np.einsum("md,md->m", diff, diff)

    def nearest(self, embedding) -> tuple[int | None, float]:
        """(nearest module id, its distance); (None, inf) when there are no modules. Changes nothing."""
        d = self.distances(embedding)
        if not len(d):
            return None, float("inf")
        m = int(np.argmin(d))
        return m, float(d[m])

    def route(self, embedding, task=None, pc=None) -> int:
        """Assign one episode to a module (opening one if needed), update its centroid and the graph.

        `task` and `pc` (an integer or integers, optional) are recorded on the module's node.
        """
        x = self._embedding(embedding)
        d = self._distances(x)
        tasks, steps = _ints(task), _ints(pc)
        if len(d) and (d.min() <= self.threshold or self.n_modules == self.max_modules):
            module = int(np.argmin(d))
        else:
            module = self.n_modules
            self._sums = np.vstack([self._sums, np.zeros((1, self.dim))])
            self._counts = np.append(self._counts, 0)
            self.graph.add_node(module, n_slots=0, n_episodes=0, tasks=[], program_steps=[])
        self._sums[module] += x
        self._counts[module] += 1
        node = self.graph.nodes[module]
        node["n_episodes"] += 1
        node["tasks"] = sorted(set(node["tasks"]) | set(tasks))
        node["program_steps"] = sorted(set(node["program_steps"]) | set(steps))
        if self.last_module is not None:
            prev = self.last_module
            if self.graph.has_edge(prev, module):
                self.graph.edges[prev, module]["count"] += 1
            else:
                self.graph.add_edge(prev, module, count=1)
        self.last_module = module
        return module

    def add_slots(self, module: int, n: int) -> None:
        """Count n slots written to `module`."""
        if module not in self.graph:
            raise UsageError(f"module {module} does not exist (there are {self.n_modules})")
        self.graph.nodes[module]["n_slots"] += int(n)

    def export(self, path) -> Path:
        """Write the module graph to `path`: GraphML for .graphml, node-link JSON for .json."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            write_json(path, graph_to_json(self.graph))
        elif suffix == ".graphml":
            flat = self.graph.copy()
            for _, attrs in flat.nodes(data=True):
                for key, value in attrs.items():
                    if isinstance(value, list):
                        attrs[key] = json.dumps(value)
            with atomic_path(path) as tmp:
                nx.write_graphml(flat, tmp)
        else:
            raise UsageError(f"export the module graph to a .graphml or .json file, got {path.name!r}")
        return path

    # -- state for saving --------------------------------------------------

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        settings = dict(metric=self.metric, threshold=self.threshold, max_modules=self.max_modules,
                        last_module=self.last_module, n_modules=self.n_modules,
                        graph=graph_to_json(self.graph))
        return settings, {"sums": self._sums, "counts": self._counts}

    @classmethod
    def from_state(cls, dim: int, settings: Mapping, arrays: Mapping[str, np.ndarray],
                   where: str = "memory bank") -> Router:
        try:
            router = cls(dim, settings["metric"], settings["threshold"], settings["max_modules"])
            n, last = int(settings["n_modules"]), settings["last_module"]
            graph = graph_from_json(settings["graph"])
        except KeyError as exc:
            raise UsageError(f"{where}: router settings lack {exc.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError, nx.NetworkXError) as exc:
            raise UsageError(f"{where}: router settings are malformed ({exc})") from None
        sums, counts = np.asarray(arrays.get("sums")), np.asarray(arrays.get("counts"))
        if sums.shape != (n, router.dim) or counts.shape != (n,):
            raise UsageError(f"{where}: router arrays do not match {n} modules of dimension {router.dim}")
        if sorted(graph.nodes) != list(range(n)):
            raise UsageError(f"{where}: module graph nodes do not match {n} modules")
        if last is not None and not (isinstance(last, int) and 0 <= last < n):
            raise UsageError(f"{where}: last module {last!r} does not exist")
        router._sums, router._counts = sums.astype(np.float64), counts.astype(np.int64)
        router.last_module, router.graph = last, graph
        return router


def graph_to_json(graph: nx.DiGraph) -> dict:
    """Node-link data (networkx's JSON form), edges under the key "edges"."""
    try:
        return nx.node_link_data(graph, edges="edges")
    except TypeError:  # networkx < 3.4 names the keyword `link`
        return nx.node_link_data(graph, link="edges")


def graph_from_json(data: Mapping) -> nx.DiGraph:
    """Inverse of `graph_to_json`."""
    try:
        return nx.node_link_graph(data, directed=True, edges="edges")
    except TypeError:  # networkx < 3.4
        return nx.node_link_graph(data, directed=True, link="edges")
