"""The continual-learning agent: fingerprints reach attention, packing, memory writes and reads,
strategies as hooks, evaluation, and the summaries of a run."""

import math

import numpy as np
import pytest
import torch

from mempos.agent import metrics as M
from mempos.agent.fingerprints import (
    AXES, FINGERPRINT_AXES, Fingerprints, apply_fingerprint_encoding, auto_strides, fingerprint_label,
    parse_fingerprints,
)
from mempos.agent.items import Encoder, ExemplarTable
from mempos.agent.loop import Agent, AgentConfig, ContinualRun
from mempos.agent.packing import IGNORE, pack
from mempos.agent.results import score_summary, summarise
from mempos.agent.strategies import STRATEGIES, Strategy, make_strategy, register_strategy
from mempos.agent.stream import TaskStream
from mempos.agent.tasks import Example, parse_tasks
from mempos.errors import UsageError
from mempos.generation import greedy_decode
from mempos.models import small_gpt2, train_tokenizer

TEXT = "\n".join(f"copy {i * 7919 % 99991:05d} = {i * 7919 % 99991:05d} reverse x={i % 10}; print x ="
                 for i in range(300))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT, 300)


def tiny_model(tokenizer, seed=0, layout="sections"):
    return apply_fingerprint_encoding(small_gpt2(len(tokenizer), n_layer=2, n_head=2, n_embd=32, seed=seed),
                                      layout).eval()


def tiny_agent(tokenizer, strategy="naive", kinds=("qa", "qa"), **config):
    config = {"context_len": 64, "lr": 1e-2, "context_examples": 1, **config}
    return Agent(tiny_model(tokenizer), tokenizer, make_strategy(strategy) if isinstance(strategy, str) else strategy,
                 AgentConfig(**config), list(kinds))


def tiny_stream(spec="copy,reverse", episodes=2, batch=3, seed=0, eval_size=3):
    return TaskStream(parse_tasks(spec), episodes, batch, seed, eval_size)


# ---- fingerprints as positions ----------------------------------------------------------------------


def test_parse_fingerprints_and_labels():
    assert parse_fingerprints("none") == () and parse_fingerprints("") == ()
    assert parse_fingerprints("pc,slot") == ("slot", "pc")
    assert parse_fingerprints("fp") == ("slot", "module", "pc") == parse_fingerprints("all")
    assert fingerprint_label(()) == "" and fingerprint_label(("slot", "module", "pc")) == "+fp"
    assert fingerprint_label(("slot", "pc")) == "+slot+pc"
    with pytest.raises(UsageError, match="unknown fingerprint axis 'time'"):
        parse_fingerprints("slot,time")


@pytest.mark.parametrize("layout", ["sections", "interleaved"])
def test_auto_stride_turns_each_axis_fastest_pair_by_one_radian(tokenizer, layout):
    model = tiny_model(tokenizer, layout=layout)
    encoding = model.transformer.h[0].attn.position_encoding
    strides = auto_strides(model)
    for axis in FINGERPRINT_AXES:
        fastest = encoding.inv_freq[encoding.pairs_of(axis)].max().item()
        assert strides[axis] * fastest == pytest.approx(1.0)
    if layout == "sections":  # later axes own ever lower frequencies, so they need ever larger strides
        assert strides["slot"] < strides["module"] < strides["pc"]
    agent = tiny_agent(tokenizer, fingerprints=("pc",))  # the agent's default stride is "auto"
    assert agent.fingerprints.strides == auto_strides(agent.model)
    assert agent.fingerprints.positions(np.array([0, 1]), slot=3, module=2)[:, 1:].tolist() == [
        [0.0, 0.0, 0.0], [0.0, 0.0, auto_strides(agent.model)["pc"]]]


def capture_rotations(model, layer=0):
    """Record (key positions, rotated keys, rotated queries) as the attention of `layer` computes them."""
    encoding = model.transformer.h[layer].attn.position_encoding
    original = encoding.rotate
    seen = []

    def rotate(q, k, q_pos, k_pos):
        q_rot, k_rot = original(q, k, q_pos, k_pos)
        seen.append((k_pos.clone(), k_rot.detach().clone(), q_rot.detach().clone()))
        return q_rot, k_rot

    encoding.rotate = rotate
    return encoding, seen


def test_slot_fingerprint_reaches_attention_only_through_the_slot_axis(tokenizer):
    model = tiny_model(tokenizer)
    encoder = Encoder(tokenizer)
    a = encoder.item(Example(("copy 1234 =",), " 1234"), lm=False, task=0)
    b = encoder.item(Example(("copy 98765 =",), " 98765"), lm=False, task=0)
    fingerprints = Fingerprints(("slot", "module", "pc"), stride=8.0)
    encoding, seen = capture_rotations(model)
    logits = []
    for slot_b in (5, 9):  # only example b's slot changes
        batch = pack([a.at(4, 1), b.at(slot_b, 1)], fingerprints, encoder.eos, context_len=64)
        with torch.no_grad():
            logits.append(model(batch.ids, token_positions=batch.positions).logits)
    (_, b_start, b_end) = batch.spans[1]
    (pos0, k0, q0), (pos1, k1, q1) = seen
    # the positions the attention function received: b's slot axis moved by stride * 4, nothing else
    delta = pos1 - pos0
    assert delta.shape[-1] == len(AXES)
    assert torch.equal(delta[0, b_start:b_end, AXES.index("slot")], torch.full((b_end - b_start,), 32.0))
    delta[0, b_start:b_end, AXES.index("slot")] = 0
    assert not delta.any()
    # rotated keys and queries change only in the slot axis's frequency pairs, only for b's tokens
    half = k0.shape[-1] // 2
    slot_pairs = encoding.pairs_of("slot")
    slot_dims = torch.cat([slot_pairs, slot_pairs + half])
    other_dims = torch.tensor([d for d in range(2 * half) if d not in set(slot_dims.tolist())])
    for before, after in ((k0, k1), (q0, q1)):
        changed = (before - after).abs() > 1e-6  # (B, H, T, D)
        assert not changed[..., other_dims].any()
        assert not changed[:, :, :b_start].any()
        assert changed[:, :, b_start:b_end][..., slot_dims].any()
    # a precedes b, so its logits cannot change; b attends to a across slots, so its logits do
    assert torch.equal(logits[0][:, :b_start], logits[1][:, :b_start])
    assert (logits[0][:, b_start:b_end] - logits[1][:, b_start:b_end]).abs().max() > 1e-4
    # with the slot axis off the same change is invisible
    off = Fingerprints(("module", "pc"))
    outs = []
    for slot_b in (5, 9):
        batch = pack([a.at(4, 1), b.at(slot_b, 1)], off, encoder.eos, context_len=64)
        with torch.no_grad():
            outs.append(model(batch.ids, token_positions=batch.positions).logits)
    assert torch.equal(outs[0], outs[1])


def test_positions_and_targets_of_a_packed_batch(tokenizer):
    encoder = Encoder(tokenizer)
    program = encoder.item(Example(("x=3;", " x+=4;", " print x ="), " 7"), lm=False, task=1).at(7, 2)
    lm = encoder.item(Example(("copy 12 reverse",), ""), lm=True, task=0).at(3, 0)
    fingerprints = Fingerprints(("slot", "module", "pc"), stride=2.0)
    batch = pack([program, lm, program], fingerprints, encoder.eos, context_len=len(program) + len(lm))
    assert [s[0] for s in batch.spans] == [0, 0, 1]  # first fit: the third item opens a second row
    row, start, end = batch.spans[0]
    pos = batch.positions[row, start:end]
    assert pos[:, 0].tolist() == list(range(len(program)))
    assert set(pos[:, 1].tolist()) == {14.0} and set(pos[:, 2].tolist()) == {4.0}
    assert pos[:, 3].tolist() == [2.0 * p for p in program.pcs.tolist()]
    assert sorted(set(program.pcs.tolist())) == [0, 1, 2] and program.answer_pc == 2
    # qa: only the answer and its eos are targets; lm: every token but the first
    labels = batch.labels[row, start:end]
    assert (labels[: program.n_prompt] == IGNORE).all()
    assert labels[program.n_prompt:].tolist() == program.tokens[program.n_prompt:].tolist()
    assert program.tokens[-1] == encoder.eos
    _, lm_start, lm_end = batch.spans[1]
    assert batch.labels[0, lm_start] == IGNORE
    assert batch.labels[0, lm_start + 1:lm_end].tolist() == lm.tokens[1:].tolist()
    # padding of the shorter row: eos, no target, fingerprints 0
    r2, _, end2 = batch.spans[2]
    assert (batch.labels[r2, end2:] == IGNORE).all() and (batch.positions[r2, end2:, 1:] == 0).all()
    # switched-off axes carry 0
    plain = pack([program], Fingerprints(()), encoder.eos, context_len=64)
    assert not plain.positions[..., 1:].any()
    with pytest.raises(UsageError, match="longer than the context"):
        pack([program], fingerprints, encoder.eos, context_len=len(program) - 1)


# ---- memory: writes, replay, recall -----------------------------------------------------------------


def test_episode_is_routed_written_and_replayable_with_its_fingerprints(tokenizer, tmp_path):
    agent = tiny_agent(tokenizer, fingerprints=("slot", "module", "pc"))
    stream = tiny_stream()
    episodes = iter(stream)
    first = next(episodes)
    record = agent.train_episode(first)
    bank = agent.bank
    assert bank.n_slots == 3 and bank.n_modules == 1 and record.module == 0 and record.replayed == 0
    stored = agent.exemplars.items(bank, [0, 1, 2])
    expected = agent.episode_items(first)
    for i, (got, want) in enumerate(zip(stored, expected)):
        assert got.tokens.tolist() == want.tokens.tolist() and got.pcs.tolist() == want.pcs.tolist()
        assert (got.slot, got.module, got.task, got.n_prompt) == (i, 0, 0, want.n_prompt)
    meta = bank.store.meta(np.arange(3))
    assert meta["episode"].tolist() == [0, 0, 0] and meta["step"].tolist() == [0, 0, 0]
    # the exemplar table survives a save/load round trip
    agent.exemplars.save(tmp_path)
    table = ExemplarTable.load(tmp_path, bank.n_slots)
    assert [i.pcs.tolist() for i in table.items(bank, [2, 0])] == [expected[2].pcs.tolist(), expected[0].pcs.tolist()]


def test_replay_draws_earlier_tasks_only_and_keeps_their_slots(tokenizer):
    agent = tiny_agent(tokenizer, strategy=make_strategy("replay", ratio=1.0))
    stream = tiny_stream(episodes=2)
    episodes = list(stream)
    for episode in episodes[:2]:  # task 0
        agent.train_episode(episode)
    assert agent.replay(10, exclude_task=0) == []
    items = agent.episode_items(episodes[2])
    composed = agent.strategy.compose_batch(agent, episodes[2], items)
    replayed = composed[len(items):]
    assert len(replayed) == len(items) == 3
    assert {r.task for r in replayed} == {0} and all(0 <= r.slot < 6 for r in replayed)
    assert len({r.slot for r in replayed}) == 3
    record = agent.train_episode(episodes[2])
    assert record.replayed == 3 and agent.bank.n_slots == 9


def test_evaluation_reads_memory_and_batched_cached_decoding_matches_one_by_one(tokenizer):
    agent = tiny_agent(tokenizer, fingerprints=("slot", "module", "pc"), context_examples=2)
    stream = tiny_stream(eval_size=5)
    agent.train_episode(next(iter(stream)))
    task = stream.tasks[0]
    examples = stream.eval_set(0)
    items = agent.items(examples, [0] * len(examples))
    contexts, modules = agent.recall(items, 2)
    assert all(len(c) == 2 for c in contexts) and modules == [0] * 5
    queries = agent.embed(items)
    for context, query in zip(contexts, queries):  # nearest exemplar last, right before the example
        _, nearest = agent.bank.read(query, 2)
        assert [c.slot for c in context] == nearest[::-1].tolist()
    predictions = []
    original = task.score
    task.score = lambda predicted, answer: predictions.append(predicted) or original(predicted, answer)
    try:
        scores = agent.evaluate(task, 0, examples)
    finally:
        del task.score
    assert scores["n"] == 5 and 0 <= scores["em"] <= 1 and scores["nll"] > 0
    # the same predictions, one example at a time, with no cache
    budget = task.max_answer_chars + 1
    expected = []
    for item, context in zip(items, contexts):
        case = context + [item.at(agent.bank.n_slots, 0).prompt()]
        batch = pack(case, agent.fingerprints, agent.eos, rows=[list(range(len(case)))])
        out = greedy_decode(agent.model, batch.ids, budget, positions=batch.positions,
                            step=agent.fingerprints.next_position, use_cache=False)[0, batch.ids.shape[1]:].tolist()
        expected.append(agent.encoder.decode(out[: out.index(agent.eos)] if agent.eos in out else out))
    assert sorted(predictions) == sorted(expected)
    # without memory the example is evaluated alone
    alone = tiny_agent(tokenizer, memory=False)
    assert alone.recall(items, 2)[0] == [[]] * 5


# ---- strategies are hooks -------------------------------------------------------------------------


def test_a_strategy_subclass_changes_the_loop_through_its_hooks_only(tokenizer):
    calls = []

    @register_strategy("test_doubler")
    class Doubler(Strategy):
        summary = "train on every example twice, with a penalty that counts its calls"
        defaults = {"copies": 2}

        def before_task(self, agent, task_id):
            calls.append(("before_task", task_id))

        def compose_batch(self, agent, episode, items):
            calls.append(("compose", episode.step))
            return items * self.copies

        def penalty(self, model):
            calls.append(("penalty",))
            return 0.0 * sum(p.sum() for p in model.parameters())

        def after_task(self, agent, task_id):
            calls.append(("after_task", task_id))

    try:
        strategy = make_strategy("test_doubler", copies="3")
        assert strategy.copies == 3
        agent = tiny_agent(tokenizer, strategy=strategy)
        metrics = ContinualRun(agent, tiny_stream(), progress=False).run()
        assert calls == [("before_task", 0), ("compose", 0), ("penalty",), ("compose", 1), ("penalty",),
                         ("after_task", 0), ("before_task", 1), ("compose", 2), ("penalty",), ("compose", 3),
                         ("penalty",), ("after_task", 1)]
        assert [e["replayed"] for e in metrics["episodes"]] == [6, 6, 6, 6]  # 3 examples, 2 extra copies each
        with pytest.raises(UsageError, match="no option 'ratio'"):
            make_strategy("test_doubler", ratio=1)
    finally:
        STRATEGIES.pop("test_doubler")


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away_from_it(tokenizer):
    ewc = make_strategy("ewc", **{"lambda": 10.0, "samples": 4})
    agent = tiny_agent(tokenizer, strategy=ewc)
    stream = tiny_stream()
    assert ewc.penalty(agent.model) is None
    for episode in list(stream)[:2]:
        agent.train_episode(episode)
    ewc.after_task(agent, 0)
    (fisher, anchor), = ewc.tasks
    assert all((f >= 0).all() for f in fisher) and sum(f.sum() for f in fisher) > 0
    assert ewc.penalty(agent.model).item() == 0.0
    with torch.no_grad():
        for p in agent.params:
            p.add_(0.01)
    expected = 10.0 / 2 * sum((f * 0.01 ** 2).sum() for f in fisher)
    assert ewc.penalty(agent.model).item() == pytest.approx(expected.item(), rel=1e-3)
    restored = make_strategy("ewc")
    restored.load_state_dict(ewc.state_dict())
    assert restored.penalty(agent.model).item() == pytest.approx(ewc.penalty(agent.model).item() * 100 / 10)


def test_unknown_strategy_and_bad_options_are_usage_errors():
    with pytest.raises(UsageError, match="unknown strategy 'magic'"):
        make_strategy("magic")
    with pytest.raises(UsageError, match="replay ratio must be between 0 and 100"):
        make_strategy("replay", ratio=-1)
    with pytest.raises(UsageError, match="must be a finite number"):
        make_strategy("replay", ratio="lots")
    with pytest.raises(UsageError, match="needs the memory bank"):
        Agent(None, None, make_strategy("replay"), AgentConfig(memory=False), ["qa"])


# ---- the run: rows of R, baselines, interference -------------------------------------------------


def test_run_fills_R_row_by_row_and_measures_interference(tokenizer):
    agent = tiny_agent(tokenizer, kinds=("qa", "qa", "qa"))
    stream = tiny_stream("copy,reverse,kv", episodes=2)
    metrics = ContinualRun(agent, stream, interference_every=1, interference_examples=2, progress=False).run()
    R = np.array(metrics["R"]["nll"])
    assert np.isfinite(R[0, :2]).all() and np.isnan(R[0, 2])  # after task 0: tasks 0 and 1 only
    assert np.isfinite(R[1:]).all()
    assert np.isfinite(metrics["baseline"]["nll"]).all()
    series = metrics["interference"]
    assert [e["step"] for e in series] == [2, 3, 4, 5]  # every episode of tasks 1 and 2
    assert [sorted(e["cosines"]) for e in series] == [["0"], ["0"], ["0", "1"], ["0", "1"]]
    for entry in series:
        assert all(-1 <= c <= 1 for c in entry["cosines"].values())
        assert entry["negative_share"] == np.mean([c < 0 for c in entry["cosines"].values()])
    assert metrics["finished"] and metrics["memory"]["slots"] == 18


def test_joint_trains_on_the_mixed_stream_and_fills_only_the_last_row(tokenizer):
    agent = tiny_agent(tokenizer, strategy="joint")
    metrics = ContinualRun(agent, tiny_stream(), progress=False).run()
    R = np.array(metrics["R"]["em"])
    assert np.isnan(R[0]).all() and np.isfinite(R[1]).all()
    assert sorted({e["task"] for e in metrics["episodes"]}) == [0, 1]
    assert sorted(set(agent.bank.store.meta(np.arange(agent.bank.n_slots))["task"].tolist())) == [0, 1]
    assert set(summarise(metrics)["em"]) == {"acc", "per_task"}


# ---- summaries use the metrics module ---------------------------------------------------------------

R3 = np.array([[0.9, 0.1, np.nan], [0.95, 0.8, 0.3], [0.6, 0.7, 0.85]])
B3 = np.array([0.1, 0.05, 0.15])


def test_score_summary_is_continual_metrics_when_every_task_is_scored():
    joint = np.array([0.92, 0.85, 0.9])
    full = score_summary(R3, B3, joint, True)
    reference = M.continual_metrics(R3, B3, joint, True)
    for key in ("acc", "bwt", "fwt", "forgetting_max", "forgetting_first_last", "intransigence"):
        assert full[key] == pytest.approx(reference[key], abs=1e-12), key
    nll = score_summary(-R3, -B3, None, False)
    assert nll["forgetting_max"] == pytest.approx(full["forgetting_max"])


def test_score_summary_averages_over_tasks_where_the_score_exists():
    R = R3.copy()
    R[:, 1] = np.nan  # task 1 is language modelling: no exact match
    b = B3.copy()
    b[1] = np.nan
    s = score_summary(R, b, None, True)
    assert s["acc"] == pytest.approx((0.6 + 0.85) / 2)
    assert s["bwt"] == pytest.approx(0.6 - 0.9)  # task 0 only
    assert s["forgetting_max"] == pytest.approx(0.95 - 0.6)
    assert s["forgetting_first_last"] == pytest.approx(0.9 - 0.6)
    assert s["fwt"] == pytest.approx(0.3 - 0.15)  # task 2 only
    assert math.isnan(s["per_task"]["bwt"][1])
