"""A faiss-backed slot store: embedding keys in, token ids and metadata out.

Each `add` appends slots. A slot's id is its insertion order (0, 1, 2, ...),
never reused or renumbered; it is the memory-slot address that the agent
later turns into a rotary position axis. A slot holds

- a key: a float32 embedding of dimension `dim` (kept only inside the faiss index),
- a value: a variable-length list of token ids,
- metadata: `task`, `episode`, `step` (the agent's time step), `pc` (program-counter
  step) and `module`, all non-negative integers.

Metric. `metric="cosine"` (the default) normalises keys and queries to unit
length and indexes them by squared L2; search returns the cosine distance
``1 - cos = ||a - b||^2 / 2`` (0 = same direction, 2 = opposite), clipped
at 0 against rounding. `metric="l2"` indexes raw vectors and returns
squared L2 distances. Either way smaller means nearer, and the router uses
the same units for its threshold.

Index kinds (all map faiss ids to slot ids exactly):

- ``flat`` (default): exact search, `IndexIDMap(IndexFlatL2)`.
- ``hnsw``: approximate, `IndexIDMap(IndexHNSWFlat)` with `hnsw_m` links per
  node, `ef_construction` and `ef_search`. Needs no training; better than
  ivf when keys drift over time, as they do in continual learning.
- ``ivf``: approximate, `IndexIVFFlat` (ids given with `add_with_ids`). An IVF
  index must be trained before it can hold vectors, so until the store
  holds `ivf_train_at` slots (default 10000) keys live in an exact flat
  index and searches are exact; the add that reaches the threshold trains
  the coarse quantizer once on every key held so far and moves them all
  into the IVF index. The lists are never retrained: keys that arrive much
  later from a new distribution still land in the nearest existing list,
  which lowers recall (raise `ivf_nprobe`, or use hnsw). `ivf_nlist`
  defaults to min(4 sqrt(n), n / 39) for the n keys present at training (39
  training points per list is faiss's minimum).

Search of a store with fewer than k slots pads with slot id -1 and distance +inf.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from mempos.errors import UsageError

METRICS = ("cosine", "l2")
INDEX_KINDS = ("flat", "ivf", "hnsw")
META_FIELDS = ("task", "episode", "step", "pc", "module")


@dataclass(frozen=True)
class Slot:
    """One stored slot, as `SlotStore.get` returns it."""

    slot: int
    tokens: list[int]
    task: int
    episode: int
    step: int
    pc: int
    module: int


class _Grow:
    """A 1-D numpy array with amortised O(1) append (capacity doubles)."""

    def __init__(self, dtype, values=None):
        values = np.zeros(0, dtype) if values is None else np.ascontiguousarray(values, dtype)
        self._buf = values.copy()
        self._n = len(values)

    def __len__(self) -> int:
        return self._n

    def extend(self, values: np.ndarray) -> None:
        need = self._n + len(values)
        if need > len(self._buf):
            buf = np.zeros(max(need, 2 * len(self._buf), 16), self._buf.dtype)
            buf[: self._n] = self._buf[: self._n]
            self._buf = buf
        self._buf[self._n : need] = values
        self._n = need

    @property
    def view(self) -> np.ndarray:
        return self._buf[: self._n]


def as_keys(x, dim: int, name: str = "keys", allow_vector: bool = False) -> np.ndarray:
    """Check and convert to a C-contiguous float32 (n, dim) array."""
    try:
        arr = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{name} must be a numeric array of shape (n, {dim}): {exc}") from None
    if allow_vector and arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise UsageError(f"{name} must have shape (n, {dim}), got {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise UsageError(f"{name} contain NaN or infinite values")
    return np.ascontiguousarray(arr)


def normalise(x: np.ndarray, name: str) -> np.ndarray:
    """Unit-length rows (float32); a zero row has no direction and is refused."""
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    if (norms == 0).any():
        raise UsageError(f"{name} include a zero vector, which has no direction for the cosine metric")
    return np.ascontiguousarray((x / norms).astype(np.float32))


class SlotStore:
    """Keys in a faiss index, token ids and metadata beside it; slot id = insertion order."""

    def __init__(
        self,
        dim: int,
        index: str = "flat",
        metric: str = "cosine",
        *,
        ivf_train_at: int = 10_000,
        ivf_nlist: int | None = None,
        ivf_nprobe: int = 16,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 64,
    ):
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise UsageError(f"dim must be a positive integer, got {dim!r}")
        if index not in INDEX_KINDS:
            raise UsageError(f"index must be one of {', '.join(INDEX_KINDS)}, got {index!r}")
        if metric not in METRICS:
            raise UsageError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        for name, value in (("ivf_train_at", ivf_train_at), ("ivf_nprobe", ivf_nprobe),
                            ("hnsw_m", hnsw_m), ("ef_construction", ef_construction),
                            ("ef_search", ef_search)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if ivf_nlist is not None and (not isinstance(ivf_nlist, (int, np.integer)) or ivf_nlist < 1):
            raise UsageError(f"ivf_nlist must be a positive integer or None, got {ivf_nlist!r}")
        if ivf_nlist is not None and ivf_nlist > ivf_train_at:
            raise UsageError(f"ivf_nlist {ivf_nlist} needs at least as many training keys; ivf_train_at is {ivf_train_at}")
        self.dim = int(dim)
        self.kind = index
        self.metric = metric
        self.params = dict(ivf_train_at=int(ivf_train_at), ivf_nlist=None if ivf_nlist is None else int(ivf_nlist),
                           ivf_nprobe=int(ivf_nprobe), hnsw_m=int(hnsw_m),
                           ef_construction=int(ef_construction), ef_search=int(ef_search))
        self.trained = index != "ivf"  # ivf: False while keys are buffered in a flat index
        self._index = self._new_index()
        self._tokens = _Grow(np.int64)
        self._offsets = _Grow(np.int64, [0])
        self._meta = {f: _Grow(np.int64) for f in META_FIELDS}

    # -- faiss -------------------------------------------------------------

    def _new_index(self):
        if self.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.params["hnsw_m"])
            inner.hnsw.efConstruction = self.params["ef_construction"]
            inner.hnsw.efSearch = self.params["ef_search"]
            return faiss.IndexIDMap(inner)
        return faiss.IndexIDMap(faiss.IndexFlatL2(self.dim))  # flat, or ivf's buffer

    def _train_ivf(self) -> None:
        """Train the IVF lists on every key held so far and move the keys into them."""
        n = self._index.ntotal
        keys = faiss.downcast_index(self._index.index).reconstruct_n(0, n)  # buffer order = slot order
        nlist = self.params["ivf_nlist"] or max(1, min(int(4 * math.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatL2(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist)
        ivf.train(keys)
        ivf.nprobe = min(self.params["ivf_nprobe"], nlist)
        ivf.add_with_ids(keys, np.arange(n, dtype=np.int64))
        self._index = ivf
        self._quantizer = quantizer  # keep the Python object alive beside the index
        self.params["ivf_nlist"] = nlist
        self.trained = True

    # -- public ------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @property
    def n_slots(self) -> int:
        return len(self)

    def __repr__(self) -> str:
        phase = "" if self.trained else f", buffering until {self.params['ivf_train_at']}"
        return f"SlotStore(dim={self.dim}, index={self.kind!r}{phase}, metric={self.metric!r}, n_slots={len(self)})"

    def add(self, keys, values: Sequence[Sequence[int]], meta: Mapping) -> np.ndarray:
        """Append n slots; return their slot ids (int64, consecutive, in input order).

        `keys` (n, dim) floats; `values` n token-id lists; `meta` maps `task`
        (required), `episode`, `step`, `pc`, `module` (default 0) to one
        integer for all n slots or a sequence of n integers.
        """
        keys = as_keys(keys, self.dim)
        n = len(keys)
        if len(values) != n:
            raise UsageError(f"got {n} keys but {len(values)} token-id lists")
        meta_arrays = self._check_meta(meta, n)
        try:
            lengths = np.fromiter((len(v) for v in values), np.int64, count=n)
            flat = (np.concatenate([np.asarray(v, dtype=np.int64).reshape(-1) for v in values])
                    if n else np.zeros(0, np.int64))
        except (TypeError, ValueError, OverflowError) as exc:
            raise UsageError(f"token ids must be lists of integers: {exc}") from None
        if len(flat) != lengths.sum():
            raise UsageError("token ids must be flat lists of integers, one list per key")
        if n == 0:
            return np.zeros(0, np.int64)
        if self.metric == "cosine":
            keys = normalise(keys, "keys")
        start = len(self)
        ids = np.arange(start, start + n, dtype=np.int64)
        self._index.add_with_ids(keys, ids)
        self._tokens.extend(flat)
        self._offsets.extend(len(self._tokens) - flat.size + np.cumsum(lengths))
        for f in META_FIELDS:
            self._meta[f].extend(meta_arrays[f])
        if not self.trained and len(self) >= self.params["ivf_train_at"]:
            self._train_ivf()
        return ids

    def _check_meta(self, meta: Mapping, n: int) -> dict[str, np.ndarray]:
        if not isinstance(meta, Mapping):
            raise UsageError(f"meta must be a mapping with keys {', '.join(META_FIELDS)}, got {type(meta).__name__}")
        unknown = sorted(set(meta) - set(META_FIELDS))
        if unknown:
            raise UsageError(f"unknown metadata field {unknown[0]!r}; known: {', '.join(META_FIELDS)}")
        if "task" not in meta:
            raise UsageError("meta must give 'task' (an integer task id)")
        out = {}
        for f in META_FIELDS:
            value = np.asarray(meta.get(f, 0))
            if value.ndim == 0:
                value = np.full(n, value)
            if value.shape != (n,):
                raise UsageError(f"meta[{f!r}] must be one integer or {n} integers, got shape {value.shape}")
            if n and (value.dtype.kind not in "iub" or (value < 0).any()):
                raise UsageError(f"meta[{f!r}] must hold non-negative integers")
            out[f] = value.astype(np.int64)
        return out

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k per query: (distances float32 (m, k), slot ids int64 (m, k)), nearest first.

        `queries` is (m, dim) or one (dim,) vector (read as m = 1). Missing
        neighbours (k larger than the store) come back as id -1, distance +inf.
        """
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise UsageError(f"k must be a positive integer, got {k!r}")
        queries = as_keys(queries, self.dim, "queries", allow_vector=True)
        if self.metric == "cosine":
            queries = normalise(queries, "queries")
        if len(queries) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        dist, ids = self._index.search(queries, int(k))
        dist = np.asarray(dist, np.float32)
        if self.metric == "cosine":
            dist = np.maximum(dist * np.float32(0.5), np.float32(0))
        dist[ids < 0] = np.inf
        return dist, ids.astype(np.int64)

    def _check_ids(self, slot_ids) -> np.ndarray:
        ids = np.asarray(slot_ids)
        if ids.size and ids.dtype.kind not in "iu":
            raise UsageError(f"slot ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            bad = ids[(ids < 0) | (ids >= len(self))].flat[0]
            raise UsageError(f"slot {bad} does not exist (the store holds slots 0..{len(self) - 1})")
        return ids

    def tokens(self, slot_ids) -> list[np.ndarray]:
        """Token ids of each slot (int64 arrays), in the order asked."""
        ids = self._check_ids(slot_ids).reshape(-1)
        offsets, flat = self._offsets.view, self._tokens.view
        return [flat[offsets[i] : offsets[i + 1]].copy() for i in ids]

    def meta(self, slot_ids) -> dict[str, np.ndarray]:
        """Metadata arrays, each shaped like `slot_ids`."""
        ids = self._check_ids(slot_ids)
        return {f: self._meta[f].view[ids] for f in META_FIELDS}

    def get(self, slot_ids) -> list[Slot]:
        """Full records for a 1-D sequence of slot ids."""
        ids = self._check_ids(slot_ids).reshape(-1)
        meta = self.meta(ids)
        return [Slot(int(s), t.tolist(), *(int(meta[f][i]) for f in META_FIELDS))
                for i, (s, t) in enumerate(zip(ids, self.tokens(ids)))]

    def set_search_params(self, ivf_nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the approximate search effort (IVF lists probed, HNSW candidate list size); kept on save."""
        for name, value in (("ivf_nprobe", ivf_nprobe), ("ef_search", ef_search)):
            if value is not None:
                if not isinstance(value, (int, np.integer)) or value < 1:
                    raise UsageError(f"{name} must be a positive integer, got {value!r}")
                self.params[name] = int(value)
        if self.kind == "ivf" and self.trained:
            self._index.nprobe = min(self.params["ivf_nprobe"], self._index.nlist)
        elif self.kind == "hnsw":
            faiss.downcast_index(self._index.index).hnsw.efSearch = self.params["ef_search"]

    def set_module(self, slot_ids, module: int) -> None:
        ids = self._check_ids(slot_ids)
        self._meta["module"].view[ids] = int(module)

    # -- state for saving (the bank owns the folder format) -----------------

    def state(self) -> tuple[dict, bytes, dict[str, np.ndarray]]:
        """(settings JSON, faiss index bytes, arrays) that `from_state` turns back into this store."""
        settings = dict(dim=self.dim, index=self.kind, metric=self.metric, trained=self.trained,
                        n_slots=len(self), params=dict(self.params))
        arrays = {"tokens": self._tokens.view, "offsets": self._offsets.view}
        arrays.update({f: self._meta[f].view for f in META_FIELDS})
        return settings, faiss.serialize_index(self._index).tobytes(), arrays

    @classmethod
    def from_state(cls, settings: Mapping, index_bytes: bytes, arrays: Mapping[str, np.ndarray],
                   where: str = "memory bank") -> SlotStore:
        """Rebuild a store; any inconsistency raises UsageError naming `where`."""
        try:
            params = dict(settings["params"])
            nlist = params.pop("ivf_nlist")  # may exceed ivf_train_at when one add crossed it by far
            store = cls(settings["dim"], settings["index"], settings["metric"], **params)
            store.params["ivf_nlist"] = nlist
            trained, n = bool(settings["trained"]), int(settings["n_slots"])
        except KeyError as exc:
            raise UsageError(f"{where}: store settings lack {exc.args[0]!r}") from None
        except TypeError as exc:
            raise UsageError(f"{where}: store settings are malformed ({exc})") from None
        try:
            index = faiss.deserialize_index(np.frombuffer(index_bytes, np.uint8))
        except Exception as exc:  # faiss raises RuntimeError with a C++ message
            text = " ".join(str(exc).split())
            detail = text.rsplit("Error: ", 1)[-1][:120] if text else type(exc).__name__
            raise UsageError(f"{where}: faiss could not read the index ({detail})") from None
        want = faiss.IndexIVFFlat if (store.kind == "ivf" and trained) else faiss.IndexIDMap
        if not isinstance(index, want):
            raise UsageError(f"{where}: index is a {type(index).__name__}, expected {want.__name__} for kind {store.kind!r}")
        if index.d != store.dim:
            raise UsageError(f"{where}: index has dimension {index.d}, the manifest says {store.dim}")
        if index.ntotal != n:
            raise UsageError(f"{where}: index holds {index.ntotal} keys, the manifest says {n} slots")
        for name in ("tokens", "offsets", *META_FIELDS):
            if name not in arrays:
                raise UsageError(f"{where}: slot arrays lack {name!r}")
        offsets = np.asarray(arrays["offsets"])
        if offsets.shape != (n + 1,) or offsets[0] != 0 or (np.diff(offsets) < 0).any() \
                or offsets[-1] != len(arrays["tokens"]):
            raise UsageError(f"{where}: token offsets do not match {n} slots")
        for f in META_FIELDS:
            if np.asarray(arrays[f]).shape != (n,):
                raise UsageError(f"{where}: metadata {f!r} has shape {np.asarray(arrays[f]).shape}, expected ({n},)")
        store._index = index
        store.trained = trained
        if store.kind == "ivf" and trained:
            store.params["ivf_nlist"] = index.nlist
        store.set_search_params()
        store._tokens = _Grow(np.int64, arrays["tokens"])
        store._offsets = _Grow(np.int64, offsets)
        store._meta = {f: _Grow(np.int64, arrays[f]) for f in META_FIELDS}
        return store
