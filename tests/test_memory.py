"""Memory: slot store, router and module graph, bank folder round trip and corruption."""

import json
import os

import networkx as nx
import numpy as np
import pytest

from mempos.errors import UsageError
from mempos.memory import MemoryBank, Router, SlotStore
from mempos.memory import persist
from mempos.memory.router import graph_from_json

E = np.eye(4, dtype=np.float32)


# -- store ------------------------------------------------------------------


def test_add_search_hand_vectors_cosine():
    store = SlotStore(4)
    keys = np.stack([E[0], E[1], E[2], E[0] + E[1]])
    ids = store.add(keys, [[1], [2, 2], [3, 3, 3], [4]], {"task": [0, 0, 1, 1], "episode": 7})
    assert ids.tolist() == [0, 1, 2, 3]
    dist, got = store.search(np.array([2.0, 0.0, 0.0, 0.0]), 3)  # scale does not matter for cosine
    assert got.tolist() == [[0, 3, 1]]
    np.testing.assert_allclose(dist[0], [0.0, 1 - 1 / np.sqrt(2), 1.0], atol=1e-6)
    # ids are stable: later adds continue the numbering and earlier slots keep theirs
    assert store.add(E[3:4] * 5, [[9, 9]], {"task": 2}).tolist() == [4]
    _, got = store.search(E[3], 1)
    assert got.tolist() == [[4]]
    slot = store.get([2])[0]
    assert (slot.slot, slot.tokens, slot.task, slot.episode, slot.module) == (2, [3, 3, 3], 1, 7, 0)
    assert [t.tolist() for t in store.tokens([4, 0])] == [[9, 9], [1]]
    # more neighbours asked than slots: padded with -1 / inf
    dist, got = store.search(E[0], 7)
    assert got[0, 5:].tolist() == [-1, -1] and np.isinf(dist[0, 5:]).all()


def test_l2_metric_returns_squared_distances():
    store = SlotStore(2, metric="l2")
    store.add([[0, 0], [3, 4], [1, 0]], [[0], [1], [2]], {"task": 0})
    dist, got = store.search([[0.0, 1.0]], 3)
    assert got.tolist() == [[0, 2, 1]]
    np.testing.assert_allclose(dist[0], [1.0, 2.0, 18.0])


def test_store_refuses_bad_input():
    store = SlotStore(4)
    with pytest.raises(UsageError, match=r"shape \(n, 4\)"):
        store.add(np.ones((2, 3)), [[1], [2]], {"task": 0})
    with pytest.raises(UsageError, match="zero vector"):
        store.add(np.zeros((1, 4)), [[1]], {"task": 0})
    with pytest.raises(UsageError, match="unknown metadata field 'colour'"):
        store.add(E[:1], [[1]], {"task": 0, "colour": 3})
    with pytest.raises(UsageError, match="2 keys but 1 token-id lists"):
        store.add(E[:2], [[1]], {"task": 0})
    with pytest.raises(UsageError, match="index must be one of"):
        SlotStore(4, index="lsh")
    store.add(E[:1], [[1]], {"task": 0})
    with pytest.raises(UsageError, match="slot 5 does not exist"):
        store.get([5])


def test_ivf_buffers_exactly_until_trained():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(300, 8)).astype(np.float32)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    flat, ivf = SlotStore(8), SlotStore(8, "ivf", ivf_train_at=200, ivf_nlist=4, ivf_nprobe=4)
    for store in (flat, ivf):
        store.add(keys[:150], [[i] for i in range(150)], {"task": 0})
    assert not ivf.trained
    for a, b in zip(flat.search(queries, 5), ivf.search(queries, 5)):
        np.testing.assert_array_equal(a, b)  # buffered phase is an exact flat search
    for store in (flat, ivf):
        store.add(keys[150:], [[i] for i in range(150, 300)], {"task": 0})
    assert ivf.trained and ivf.params["ivf_nlist"] == 4 and ivf._index.nprobe == 4
    # nprobe = nlist visits every list: same neighbours as flat
    np.testing.assert_array_equal(flat.search(queries, 5)[1], ivf.search(queries, 5)[1])
    ivf.set_search_params(ivf_nprobe=1)
    assert ivf._index.nprobe == 1 and ivf.params["ivf_nprobe"] == 1


# -- router -----------------------------------------------------------------


def test_router_opens_module_for_distant_episode_only():
    router = Router(4, threshold=0.2)
    assert router.route(E[0], task=0) == 0
    assert router.route(E[0] + 0.1 * E[1], task=0) == 0  # cos 0.995: near
    assert router.route(E[2], task=1, pc=3) == 1          # orthogonal: new module
    assert router.route(E[0], task=2) == 0
    assert router.n_modules == 2
    np.testing.assert_allclose(router.centroids[1], E[2])
    g = router.graph
    assert g.nodes[0]["n_episodes"] == 3 and g.nodes[0]["tasks"] == [0, 2]
    assert g.nodes[1]["tasks"] == [1] and g.nodes[1]["program_steps"] == [3]
    assert {(a, b): d["count"] for a, b, d in g.edges(data=True)} == {(0, 0): 1, (0, 1): 1, (1, 0): 1}
    # nearest() looks without changing anything
    assert router.nearest(E[2] + 0.05 * E[3])[0] == 1 and router.n_modules == 2


def test_router_max_modules_and_l2_threshold():
    router = Router(2, metric="l2", threshold=1.0, max_modules=2)
    assert [router.route(p) for p in ([0, 0], [0.5, 0.5], [10, 0])] == [0, 0, 1]
    # l2 threshold is on squared distance; module 0's centroid is (0.25, 0.25), module 1's (10, 0)
    np.testing.assert_allclose(router.distances([1.25, 0.25]), [1.0, 8.75**2 + 0.25**2])
    # far from both, but max_modules are open: the nearest module takes it
    assert router.route([0, 10]) == 0 and router.n_modules == 2


def test_graph_export_graphml_and_json(tmp_path):
    bank = MemoryBank(4, threshold=0.2)
    bank.write(E[0], E[:2], [[1], [2]], {"task": 0, "pc": 0})
    bank.write(E[3], E[2:], [[3], [4]], {"task": 1, "pc": 1})
    bank.export_graph(tmp_path / "g.graphml")
    g = nx.read_graphml(tmp_path / "g.graphml")
    assert g.number_of_nodes() == 2 and g.edges["0", "1"]["count"] == 1
    assert json.loads(g.nodes["1"]["tasks"]) == [1] and g.nodes["1"]["n_slots"] == 2
    bank.export_graph(tmp_path / "g.json")
    h = graph_from_json(json.loads((tmp_path / "g.json").read_text()))
    assert h.nodes[0]["program_steps"] == [0] and h.edges[0, 1]["count"] == 1
    with pytest.raises(UsageError, match=".graphml or .json"):
        bank.export_graph(tmp_path / "g.txt")


# -- bank -------------------------------------------------------------------


def _bank(kind="flat", n_episodes=12, per=25, dim=16, seed=0, **kw):
    """Episodes of 3 tasks around 3 distant directions; exemplar keys scattered around them."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:3] * 4
    bank = MemoryBank(dim, kind, threshold=0.3, **kw)
    for e in range(n_episodes):
        task = e % 3
        emb = centres[task] + 0.1 * rng.normal(size=dim)
        keys = centres[task] + rng.normal(size=(per, dim))
        tokens = [list(rng.integers(0, 50, size=rng.integers(1, 6))) for _ in range(per)]
        bank.write(emb, keys, tokens, {"task": task, "episode": e, "step": 10 * e, "pc": e % 2})
    return bank, rng.normal(size=(6, dim))


def test_bank_write_routes_and_fingerprints():
    bank, _ = _bank(n_episodes=6, per=3)
    assert bank.n_modules == 3 and bank.n_slots == 18
    fp = bank.fingerprints(np.array([[0, 3], [4, 17]]))
    assert fp["slot"].tolist() == [[0, 3], [4, 17]]
    assert fp["module"].tolist() == [[0, 1], [1, 2]]  # episodes 0,1,2,3,4,5 -> modules 0,1,2,0,1,2
    assert fp["pc"].tolist() == [[0, 1], [1, 1]]
    # routing first, writing later with the same module
    module = bank.route(np.eye(16)[1] * 4, task=1)
    first = bank.n_slots
    got_module, slots = bank.write(None, np.ones((2, 16)), [[1], [2]], {"task": 1}, module=module)
    assert got_module == 1 and slots.tolist() == [first, first + 1]
    assert bank.graph.nodes[1]["n_slots"] == 8
    with pytest.raises(UsageError, match="router assigns it"):
        bank.write(np.ones(16), np.ones((1, 16)), [[1]], {"task": 0, "module": 2})


@pytest.mark.parametrize("kind,kw", [("flat", {}), ("ivf", {"ivf_train_at": 200, "ivf_nprobe": 2}),
                                     ("hnsw", {"hnsw_m": 8, "ef_search": 16})])
def test_save_load_round_trip_is_exact(tmp_path, kind, kw):
    bank, queries = _bank(kind, **kw)
    if kind == "ivf":
        assert bank.store.trained  # 300 slots > 200: the IVF phase is what gets saved
    before = bank.read(queries, 8)
    bank.save(tmp_path / "bank")
    loaded = MemoryBank.load(tmp_path / "bank", dim=16)
    after = loaded.read(queries, 8)
    np.testing.assert_array_equal(before[0], after[0])  # bit-identical distances
    np.testing.assert_array_equal(before[1], after[1])
    assert loaded.store.params == bank.store.params
    assert [s.tokens for s in loaded.get(before[1][0])] == [s.tokens for s in bank.get(before[1][0])]
    assert nx.utils.graphs_equal(loaded.graph, bank.graph)
    assert dict(loaded.graph.nodes(data=True)) == dict(bank.graph.nodes(data=True))
    assert list(loaded.graph.edges(data=True)) == list(bank.graph.edges(data=True))
    np.testing.assert_array_equal(loaded.router.centroids, bank.router.centroids)
    # both continue identically
    emb, key = np.eye(16)[2] * 4, np.eye(16)[5:6]
    assert bank.write(emb, key, [[1]], {"task": 2}) == loaded.write(emb, key, [[1]], {"task": 2})


def test_ivf_buffer_phase_round_trip(tmp_path):
    bank, queries = _bank("ivf", n_episodes=3, ivf_train_at=1000)
    assert not bank.store.trained
    before = bank.read(queries, 4)
    bank.save(tmp_path / "b")
    loaded = MemoryBank.load(tmp_path / "b")
    assert not loaded.store.trained
    np.testing.assert_array_equal(before[1], loaded.read(queries, 4)[1])


def _rewrite(folder, name, data: bytes, fix_manifest=True):
    (folder / name).write_bytes(data)
    if fix_manifest:  # a consistent manifest, so the deeper checks are reached
        import hashlib

        m = json.loads((folder / "manifest.json").read_text())
        m["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (folder / "manifest.json").write_text(json.dumps(m))


def _edit_manifest(folder, **changes):
    m = json.loads((folder / "manifest.json").read_text())
    m.update(changes)
    (folder / "manifest.json").write_text(json.dumps(m))


CORRUPTIONS = {
    "missing index": (lambda f: (f / "index.faiss").unlink(), r"index.faiss is missing"),
    "missing manifest": (lambda f: (f / "manifest.json").unlink(), r"manifest.json is missing"),
    "bad manifest JSON": (lambda f: (f / "manifest.json").write_text("{not json"), r"not valid JSON"),
    "truncated index": (lambda f: (f / "index.faiss").write_bytes((f / "index.faiss").read_bytes()[:100]),
                        r"100 bytes, the manifest says \d+ \(truncated or replaced\)"),
    "flipped byte": (lambda f: (f / "slots.npz").write_bytes(b"X" + (f / "slots.npz").read_bytes()[1:]),
                     r"do not match the manifest checksum"),
    "index unreadable by faiss": (lambda f: _rewrite(f, "index.faiss", (f / "index.faiss").read_bytes()[:64]),
                                  r"faiss could not read the index"),
    "slots not npz": (lambda f: _rewrite(f, "slots.npz", b"garbage"), r"slots.npz: unreadable"),
    "graph not JSON": (lambda f: _rewrite(f, "graph.json", b"[1,"), r"graph.json: not valid JSON"),
    "wrong version": (lambda f: _edit_manifest(f, format_version=99), r"format_version 99 is not supported"),
    "wrong format": (lambda f: _edit_manifest(f, format="something-else"), r"not a mempos-memory-bank manifest"),
    "dimension mismatch": (lambda f: _edit_manifest(f, dim=32, store={**json.loads(
        (f / "manifest.json").read_text())["store"], "dim": 32}), r"index has dimension 16, the manifest says 32"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_folder_is_refused_with_one_clear_line(tmp_path, name):
    bank, _ = _bank(n_episodes=3, per=4)
    folder = bank.save(tmp_path / "bank")
    damage, message = CORRUPTIONS[name]
    damage(folder)
    with pytest.raises(UsageError, match=message) as info:
        MemoryBank.load(folder)
    assert "\n" not in str(info.value)


def test_load_checks_expected_dimension_and_missing_folder(tmp_path):
    bank, _ = _bank(n_episodes=2, per=2)
    bank.save(tmp_path / "bank")
    with pytest.raises(UsageError, match="the bank has dimension 16, expected 8"):
        MemoryBank.load(tmp_path / "bank", dim=8)
    with pytest.raises(UsageError, match="no memory bank at"):
        MemoryBank.load(tmp_path / "nowhere")


def test_save_killed_midway_keeps_previous_bank(tmp_path, monkeypatch):
    old, queries = _bank(n_episodes=3, per=5)
    old.save(tmp_path / "bank")
    expected = old.read(queries, 4)
    new, _ = _bank(n_episodes=6, per=5, seed=1)

    calls = []

    def dying_write(path, data):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # mid-save, after one file is written
        with open(path, "wb") as fh:
            fh.write(data)

    monkeypatch.setattr(persist, "_write_file", dying_write)
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path / "bank")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["bank"]  # no half folder left behind
    reloaded = MemoryBank.load(tmp_path / "bank")
    assert reloaded.n_slots == 15
    for a, b in zip(expected, reloaded.read(queries, 4)):
        np.testing.assert_array_equal(a, b)

    # a hard kill cannot clean up: the orphaned temporary folder lacks its manifest and never loads
    monkeypatch.setattr(persist, "write_json", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr(persist.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path / "bank")
    monkeypatch.undo()
    (orphan,) = [p for p in tmp_path.iterdir() if p.name != "bank"]
    assert orphan.name.startswith(".bank.tmp-") and (orphan / "index.faiss").exists()
    with pytest.raises(UsageError, match="manifest.json is missing"):
        MemoryBank.load(orphan)
    assert MemoryBank.load(tmp_path / "bank").n_slots == 15
    new.save(tmp_path / "bank")  # the next save clears the orphan
    assert sorted(os.listdir(tmp_path)) == ["bank"] and MemoryBank.load(tmp_path / "bank").n_slots == 30


def test_kill_between_renames_is_named(tmp_path, monkeypatch):
    bank, _ = _bank(n_episodes=2, per=2)
    bank.save(tmp_path / "bank")
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt()
        real_rename(src, dst)

    monkeypatch.setattr(persist.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        bank.save(tmp_path / "bank")
    monkeypatch.undo()
    with pytest.raises(UsageError, match=r"interrupted save left the previous one at .*\.bank\.previous"):
        MemoryBank.load(tmp_path / "bank")
    assert MemoryBank.load(tmp_path / ".bank.previous").n_slots == 4


def test_save_never_replaces_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    bank, _ = _bank(n_episodes=1, per=1)
    with pytest.raises(UsageError, match="not a memory bank"):
        bank.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_replay_sampling_deterministic_and_excludes_task():
    bank, _ = _bank(n_episodes=6, per=10)  # tasks 0,1,2 with 20 slots each
    a = bank.sample(12, np.random.default_rng(5), exclude_task=1)
    b = bank.sample(12, np.random.default_rng(5), exclude_task=1)
    c = bank.sample(12, np.random.default_rng(6), exclude_task=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(set(a.tolist())) == 12
    assert 1 not in bank.fingerprints(a)["module"].tolist()  # task 1 lives in module 1
    assert {s.task for s in bank.get(a)} <= {0, 2}
    both = bank.sample(100, np.random.default_rng(0), exclude_task=[0, 2])
    assert sorted(both.tolist()) == sorted(s for s in range(60) if bank.get([s])[0].task == 1)  # all 20, capped


def test_module_balanced_sampling_favours_small_modules():
    bank = MemoryBank(4, threshold=0.2)
    bank.write(E[0], np.tile(E[0], (90, 1)), [[0]] * 90, {"task": 0})
    bank.write(E[1], np.tile(E[1], (10, 1)), [[1]] * 10, {"task": 1})
    rng = np.random.default_rng(0)
    uniform = bank.fingerprints(bank.sample(10, rng))["module"]
    balanced = bank.fingerprints(bank.sample(10, np.random.default_rng(0), balance="module"))["module"]
    assert (balanced == 1).sum() >= 4 > (uniform == 1).sum()
    with pytest.raises(UsageError, match="numpy Generator"):
        bank.sample(3, 0)
