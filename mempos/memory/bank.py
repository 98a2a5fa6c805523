"""The memory bank: slot store + router + module graph, saved to and loaded from a folder.

Typical agent use, per episode::

    module = bank.route(episode_embedding, task=t, pc=p)   # before training
    first = bank.n_slots          # the slots this episode's exemplars will get: first, first + 1, ...
    ... train, using bank.fingerprints(replayed) and (first + i, module, pc) for new tokens ...
    module, slots = bank.write(None, keys, token_ids, {"task": t, "episode": e, "step": s, "pc": p},
                               module=module)

or `bank.write(episode_embedding, keys, token_ids, meta)` to route and write in one call.

Replay (`sample`) draws without replacement from a seeded numpy Generator:
`balance="uniform"` gives every eligible slot the same chance;
`balance="module"` gives every module the same total chance, shared
equally among its eligible slots (numpy's weighted draw without
replacement, so large draws approach but do not exactly equal an even
split). Asking for more slots than are eligible returns all of them, in
random order.

Folder layout (format "mempos-memory-bank", `FORMAT_VERSION`):
``manifest.json`` (format, version, store and router settings, each file's
size and sha256), ``index.faiss`` (faiss.serialize_index bytes),
``slots.npz`` (token ids as one flat array plus offsets, and the
metadata arrays), ``router.npz`` (centroid sums and counts, float64) and
``graph.json`` (node-link module graph). Saves are atomic (see
`mempos.memory.persist`); a reload gives bit-identical search results.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mempos.errors import UsageError

from . import persist
from .router import Router
from .store import Slot, SlotStore

FORMAT = "mempos-memory-bank"
FORMAT_VERSION = 1
FILES = ("index.faiss", "slots.npz", "router.npz", "graph.json")
BALANCES = ("uniform", "module")


class MemoryBank:
    """Store + router: episodes are routed to modules and their exemplars written as slots."""

    def __init__(self, dim: int, index: str = "flat", metric: str = "cosine", *, threshold: float = 0.3,
                 max_modules: int | None = None, **index_params):
        self.store = SlotStore(dim, index, metric, **index_params)
        self.router = Router(dim, metric, threshold, max_modules)

    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def n_slots(self) -> int:
        """Number of slots; also the slot id the next written exemplar will get."""
        return len(self.store)

    @property
    def n_modules(self) -> int:
        return self.router.n_modules

    @property
    def graph(self):
        return self.router.graph

    def __repr__(self) -> str:
        return f"MemoryBank({self.store!r}, {self.router!r})"

    def route(self, episode_embedding, task=None, pc=None) -> int:
        """Route one episode to a module (see `Router.route`); returns the module id."""
        return self.router.route(episode_embedding, task=task, pc=pc)

    def write(self, episode_embedding, keys, token_ids: Sequence[Sequence[int]], meta: Mapping,
              module: int | None = None) -> tuple[int, np.ndarray]:
        """Store an episode's exemplars; returns (module id, slot ids).

        Routes `episode_embedding` first unless `module` (from an earlier
        `route` of the same episode) is given, in which case the embedding may
        be None. `meta` as for `SlotStore.add`, without "module" (routing sets it).
        """
        if isinstance(meta, Mapping) and "module" in meta:
            raise UsageError("meta must not give 'module': the router assigns it")
        if module is None:
            if episode_embedding is None:
                raise UsageError("write needs an episode embedding to route, or the module from an earlier route()")
            module = self.route(episode_embedding, task=meta.get("task") if isinstance(meta, Mapping) else None,
                                pc=meta.get("pc") if isinstance(meta, Mapping) else None)
        elif not isinstance(module, (int, np.integer)) or not 0 <= module < self.n_modules:
            raise UsageError(f"module {module!r} does not exist (there are {self.n_modules})")
        slots = self.store.add(keys, token_ids, {**meta, "module": int(module)})
        self.router.add_slots(int(module), len(slots))
        return int(module), slots

    def read(self, query, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest k slots: for a (dim,) query (k,) distances and slot ids; for (m, dim), (m, k) each."""
        one = np.ndim(query) == 1
        dist, ids = self.store.search(query, k)
        return (dist[0], ids[0]) if one else (dist, ids)

    def get(self, slot_ids) -> list[Slot]:
        return self.store.get(slot_ids)

    def tokens(self, slot_ids) -> list[np.ndarray]:
        return self.store.tokens(slot_ids)

    def sample(self, n: int, rng: np.random.Generator, exclude_task=None, balance: str = "uniform") -> np.ndarray:
        """Up to n distinct slot ids for replay, drawn with `rng`; slots of `exclude_task`
        (an id or ids) are never drawn. See the module docstring for `balance`."""
        if not isinstance(rng, np.random.Generator):
            raise UsageError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise UsageError(f"n must be a non-negative integer, got {n!r}")
        if balance not in BALANCES:
            raise UsageError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}")
        everything = np.arange(self.n_slots)
        meta = self.store.meta(everything)
        if exclude_task is None:
            excluded = np.zeros(0, np.int64)
        elif isinstance(exclude_task, (int, np.integer)):
            excluded = np.array([exclude_task], np.int64)
        else:
            excluded = np.fromiter((int(t) for t in exclude_task), np.int64)
        eligible = everything[~np.isin(meta["task"], excluded)]
        n = min(int(n), len(eligible))
        if n == 0:
            return np.zeros(0, np.int64)
        if balance == "uniform":
            picks = rng.choice(eligible, size=n, replace=False)
        else:
            _, inverse, counts = np.unique(meta["module"][eligible], return_inverse=True, return_counts=True)
            p = 1.0 / (counts[inverse] * len(counts))
            picks = rng.choice(eligible, size=n, replace=False, p=p / p.sum())
        return picks.astype(np.int64)

    def fingerprints(self, slot_ids) -> dict[str, np.ndarray]:
        """Integer axis values for slots: {"slot", "module", "pc"}, each int64 shaped like `slot_ids`."""
        ids = np.asarray(slot_ids)
        meta = self.store.meta(ids)
        return {"slot": ids.astype(np.int64), "module": meta["module"], "pc": meta["pc"]}

    def export_graph(self, path) -> Path:
        return self.router.export(path)

    # -- folder ------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the bank to folder `path` atomically (replacing an earlier bank there)."""
        store_settings, index_bytes, slot_arrays = self.store.state()
        router_settings, router_arrays = self.router.state()
        graph = router_settings.pop("graph")
        files = {
            "index.faiss": index_bytes,
            "slots.npz": persist.npz_bytes(slot_arrays),
            "router.npz": persist.npz_bytes(router_arrays),
            "graph.json": json.dumps(graph, sort_keys=True).encode("utf-8"),
        }
        manifest = {"format_version": FORMAT_VERSION, "dim": self.dim, "n_slots": self.n_slots,
                    "n_modules": self.n_modules, "store": store_settings, "router": router_settings}
        return persist.write_folder(path, files, manifest, FORMAT)

    @classmethod
    def load(cls, path, dim: int | None = None) -> MemoryBank:
        """Read a bank saved by `save`; `dim`, if given, must match. Any problem raises UsageError."""
        path = Path(path)
        manifest, data = persist.read_folder(path, FORMAT, FORMAT_VERSION, FILES)
        where = str(path)
        try:
            bank_dim, store_settings, router_settings = manifest["dim"], manifest["store"], manifest["router"]
        except KeyError as exc:
            raise UsageError(f"{where}: manifest lacks {exc.args[0]!r}") from None
        if dim is not None and bank_dim != dim:
            raise UsageError(f"{where}: the bank has dimension {bank_dim}, expected {dim}")
        if not isinstance(store_settings, dict) or store_settings.get("dim") != bank_dim:
            raise UsageError(f"{where}: store settings do not match dimension {bank_dim}")
        try:
            graph = json.loads(data["graph.json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"{where}/graph.json: not valid JSON ({exc})") from None
        bank = cls.__new__(cls)
        bank.store = SlotStore.from_state(store_settings, data["index.faiss"],
                                          persist.read_npz(data["slots.npz"], f"{where}/slots.npz"), where)
        if not isinstance(router_settings, dict):
            raise UsageError(f"{where}: router settings are malformed")
        bank.router = Router.from_state(bank_dim, {**router_settings, "graph": graph},
                                        persist.read_npz(data["router.npz"], f"{where}/router.npz"), where)
        if router_settings.get("metric") != bank.store.metric:
            raise UsageError(f"{where}: router metric {router_settings.get('metric')!r} differs from the store's")
        modules = bank.store.meta(np.arange(bank.n_slots))["module"]
        if modules.size and modules.max() >= bank.n_modules:
            raise UsageError(f"{where}: slots refer to module {modules.max()} but there are {bank.n_modules} modules")
        return bank
