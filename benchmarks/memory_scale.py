"""Memory at scale: add and top-k search throughput of the slot store, exact flat vs the
approximate indexes (ivf, hnsw), with recall@k of each approximate index against flat,
measured in one process.

    python benchmarks/memory_scale.py                    # 10^4 and 10^5 slots, dimension 256
    python benchmarks/memory_scale.py --million          # also 10^6 (12 min with --threads 1 on a 2-core
                                                         # machine, most of it building HNSW; 2.9 GB RAM)
    python benchmarks/memory_scale.py --sizes 20000 --approx hnsw --threads 2

Keys are synthetic embeddings with cluster structure (like real sentence
embeddings, unlike i.i.d. Gaussians, on which no approximate index does
well): N // 100 cluster centres ~ N(0, I), each key a centre plus N(0, noise^2 I)
noise (--noise, default 1), cosine metric (the store's default). Queries are fresh draws from the
same clusters. Every index goes through `SlotStore.add` / `SlotStore.search`
(normalisation, slot-id mapping and the token-id values included), adding
in batches of --batch, as an agent would write episodes. IVF uses nlist =
4 sqrt(N) (at most N / 39) and trains once at 39 * nlist keys, the add
time includes that training; HNSW uses M = 32, efConstruction = 80.
Search is timed for all queries in one call (throughput, all threads) and
for --single queries one at a time on one thread (latency). Ratios are against flat at the
same size, measured in the same process.
"""

from __future__ import annotations

import argparse
import math
import time

import faiss
import numpy as np

from mempos.memory import SlotStore


def clustered(rng, n: int, dim: int, centres: np.ndarray, noise: float, chunk: int = 50_000) -> np.ndarray:
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        out[start : start + m] = centres[rng.integers(len(centres), size=m)]
        out[start : start + m] += noise * rng.standard_normal((m, dim), dtype=np.float32)
    return out


def build(kind: str, n: int, dim: int, keys: np.ndarray, tokens: list, batch: int) -> tuple[SlotStore, float]:
    if kind == "ivf":
        nlist = max(1, min(round(4 * math.sqrt(n)), n // 39))
        store = SlotStore(dim, "ivf", ivf_nlist=nlist, ivf_train_at=39 * nlist)
    elif kind == "hnsw":
        store = SlotStore(dim, "hnsw", hnsw_m=32, ef_construction=80)
    else:
        store = SlotStore(dim)
    start = time.perf_counter()
    for s in range(0, n, batch):
        store.add(keys[s : s + batch], tokens[s : s + batch], {"task": 0, "episode": s // batch})
    return store, time.perf_counter() - start


def set_search(store: SlotStore, kind: str, value: int) -> str:
    if kind == "ivf":
        store.set_search_params(ivf_nprobe=value)
        return f"nprobe={value}"
    if kind == "hnsw":
        store.set_search_params(ef_search=value)
        return f"efSearch={value}"
    return "exact"


def timed_search(store: SlotStore, queries: np.ndarray, k: int, single: int) -> tuple[np.ndarray, float, float]:
    start = time.perf_counter()
    _, ids = store.search(queries, k)
    batch_s = time.perf_counter() - start
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # one query has too little work to share; OpenMP waits dominate otherwise
    start = time.perf_counter()
    for q in queries[:single]:
        store.search(q, k)
    single_s = (time.perf_counter() - start) / single
    faiss.omp_set_num_threads(threads)
    return ids, batch_s, single_s


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found.tolist(), truth.tolist())]))


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated slot counts")
    parser.add_argument("--million", action="store_true", help="add 10^6 slots to --sizes (slow: 12 min and 2.9 GB with --threads 1 on 2 cores)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=100, help="queries timed one at a time")
    parser.add_argument("--batch", type=int, default=1000, help="keys per add call")
    parser.add_argument("--approx", default="ivf,hnsw", help="approximate kinds to compare with flat")
    parser.add_argument("--nprobe", default="8,32", help="IVF nprobe values to try")
    parser.add_argument("--ef", default="32,128", help="HNSW efSearch values to try")
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: leave the default)")
    parser.add_argument("--noise", type=float, default=1.0,
                        help="noise scale around cluster centres (larger: clusters overlap, recall drops)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.million and 1_000_000 not in sizes:
        sizes.append(1_000_000)
    sweeps = {"flat": [0], "ivf": [int(v) for v in args.nprobe.split(",")],
              "hnsw": [int(v) for v in args.ef.split(",")]}
    kinds = ["flat"] + [k for k in args.approx.split(",") if k]
    print(f"slot store, dim {args.dim}, cosine, top-{args.k}, {args.queries} queries, adds in batches of "
          f"{args.batch}, faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    header = (f"{'slots':>8} {'index':>5} {'search setting':>15} {'add s':>7} {'add/s':>9} {'add x':>6} "
              f"{'q/s batch':>10} {'search x':>8} {'ms/query':>8} {'recall@' + str(args.k):>9}")
    print(header)
    print("-" * len(header))
    total = {}
    for n in sizes:
        t0 = time.perf_counter()
        rng = np.random.default_rng(args.seed)
        centres = rng.standard_normal((max(10, n // 100), args.dim), dtype=np.float32)
        keys = clustered(rng, n, args.dim, centres, args.noise)
        queries = clustered(rng, args.queries, args.dim, centres, args.noise)
        tokens = [[i % 50257] * 8 for i in range(n)]
        base = {}
        truth = None
        for kind in kinds:
            store, add_s = build(kind, n, args.dim, keys, tokens, args.batch)
            for value in sweeps[kind]:
                setting = set_search(store, kind, value)
                ids, batch_s, single_s = timed_search(store, queries, args.k, args.single)
                if kind == "flat":
                    truth, base = ids, {"add": add_s, "search": batch_s}
                print(f"{n:>8} {kind:>5} {setting:>15} {add_s:>7.2f} {n / add_s:>9.0f} "
                      f"{base['add'] / add_s:>6.2f} {args.queries / batch_s:>10.0f} "
                      f"{base['search'] / batch_s:>8.2f} {1000 * single_s:>8.2f} {recall(ids, truth):>9.3f}",
                      flush=True)
            del store
        total[n] = time.perf_counter() - t0
    print("-" * len(header))
    print("add x / search x: throughput relative to flat at the same size (>1 = faster than flat).")
    print("total seconds per size: " + ", ".join(f"{n}: {s:.0f}" for n, s in total.items()))
    largest = max(total)
    if largest < 1_000_000:
        est = total[largest] * (1_000_000 / largest) * 1.2  # ~linear (flat search, IVF training) to N log N (HNSW)
        print(f"estimated time for --million from the {largest}-slot run: about {est / 60:.0f} min, "
              f"and about {4 * args.dim / 256:.0f} GB of memory")


if __name__ == "__main__":
    main()
