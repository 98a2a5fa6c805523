"""The continual-learning task suite and the task stream: values, not just that code ran."""

import gzip
import json
import re
from pathlib import Path

import pytest

from mempos.agent import tasks as tasks_module
from mempos.agent.stream import Episode, TaskStream
from mempos.agent.tasks import (
    TASKS,
    Example,
    JsonlTask,
    Task,
    get_task,
    parse_tasks,
    register_task,
)
from mempos.data import load_text
from mempos.errors import UsageError

GENERATED = ("kv", "copy", "reverse", "sort", "add", "program")


# --- answers recomputed independently ---------------------------------------------------------


def expected_answer(name: str, example: Example) -> str:
    prompt = example.prompt
    if name == "kv":
        body, asked = re.fullmatch(r"(.*) \? ([a-z]{2}) =", prompt).groups()
        pairs = dict(pair.split("=") for pair in body.split(" "))
        assert len(pairs) == len(body.split(" ")), "keys must be distinct"
        return " " + pairs[asked]
    if name in ("copy", "reverse", "sort"):
        verb, digits = re.fullmatch(r"(\w+) (\d{4,8}) =", prompt).groups()
        assert verb == name
        return " " + {"copy": digits, "reverse": digits[::-1], "sort": "".join(sorted(digits))}[name]
    if name == "add":
        a, b = re.fullmatch(r"(\d\d)\+(\d\d)=", prompt).groups()
        return f" {int(a) + int(b)}"
    if name == "program":
        *steps, last = example.segments
        assert last == " print x ="
        scope: dict = {}
        exec("".join(steps).strip(), {}, scope)  # the steps are valid Python statements
        return f" {scope['x']}"
    raise AssertionError(name)


@pytest.mark.parametrize("name", GENERATED)
def test_generated_answers_are_correct_and_short(name):
    task = get_task(name)
    assert task.name == name and task.kind == "qa"
    for split in ("train", "eval"):
        examples = task.examples(split, 200, seed=3)
        assert len(examples) == 200
        for ex in examples:
            assert ex.answer == expected_answer(name, ex), ex
            assert len(ex.prompt) <= 60
            assert len(ex.answer) <= task.max_answer_chars
            assert task.score(ex.answer, ex.answer)


@pytest.mark.parametrize("name", GENERATED)
def test_generated_tasks_are_deterministic_and_splits_disjoint(name):
    task, again = get_task(name), get_task(name)
    assert task.examples("train", 50, seed=1) == again.examples("train", 50, seed=1)
    assert task.examples("eval", 50, seed=1) == again.examples("eval", 50, seed=1)
    assert task.examples("train", 50, seed=1) != task.examples("train", 50, seed=2)
    assert task.examples("train", 20, seed=1) == task.examples("train", 50, seed=1)[:20]  # a prefix
    train = {(e.prompt, e.answer) for s in (0, 1, 2) for e in task.examples("train", 300, seed=s)}
    eval_ = {(e.prompt, e.answer) for s in (0, 1, 2) for e in task.examples("eval", 300, seed=s)}
    assert train and eval_ and not train & eval_  # disjoint across seeds too


def test_example_values_match_the_documented_formats():
    assert expected_answer("kv", Example(("ab=381 cq=027 zt=552 ? cq =",), "")) == " 027"
    assert expected_answer("copy", Example(("copy 4821 =",), "")) == " 4821"
    assert expected_answer("sort", Example(("sort 4821 =",), "")) == " 1248"
    assert expected_answer("reverse", Example(("reverse 4821 =",), "")) == " 1284"
    assert expected_answer("add", Example(("37+58=",), "")) == " 95"
    assert expected_answer("program", Example(("x=3;", " x+=4;", " x*=2;", " print x ="), "")) == " 14"
    kv = get_task("kv").examples("train", 300, seed=0)
    assert {len(e.prompt.split(" ? ")[0].split()) for e in kv} == {3, 4, 5}
    digits = get_task("copy").examples("train", 300, seed=0)
    assert {len(e.answer) - 1 for e in digits} == {4, 5, 6, 7, 8}
    add = get_task("add").examples("train", 300, seed=0)
    assert all(10 <= int(x) <= 99 for e in add for x in e.prompt[:-1].split("+"))


@pytest.mark.parametrize("name", GENERATED)
def test_score_accepts_right_answers_and_rejects_near_misses(name):
    task = get_task(name)
    for ex in task.examples("eval", 20, seed=0):
        right = ex.answer.strip()
        assert task.score(ex.answer, ex.answer)
        assert task.score(f"  {right}\n", ex.answer)
        assert task.score(right, ex.answer)
        off = right[:-1] + str((int(right[-1]) + 1) % 10)  # last digit one off
        assert not task.score(off, ex.answer)
        assert not task.score(right + "0", ex.answer)
        assert not task.score(right[:-1], ex.answer)
        assert not task.score("", ex.answer)


def test_program_segments_and_program_counters():
    task = get_task("program")
    examples = task.examples("train", 300, seed=0)
    assert {len(e.segments) for e in examples} == {3, 4, 5}
    values = set()
    for ex in examples:
        assert "".join(ex.segments) == ex.prompt
        assert ex.segments[0].startswith("x=") and ex.segments[-1] == " print x ="
        for pc, (start, segment) in enumerate(zip(ex.segment_starts, ex.segments)):
            assert ex.prompt[start:start + len(segment)] == segment
            assert {ex.pc_of_char(i) for i in range(start, start + len(segment))} == {pc}
        assert ex.pc_of_char(len(ex.prompt)) == len(ex.segments) - 1  # answer chars: the last step
        values.add(int(ex.answer))
    assert min(values) >= 0 and max(values) <= 99 and len(values) > 10
    ex = Example(("x=3;", " x+=4;", " x*=2;", " print x ="), " 14")
    assert ex.segment_starts == (0, 4, 10, 16)
    # token offsets as a fast tokenizer returns them for ex.text
    offsets = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 6), (6, 8), (8, 10), (10, 12), (12, 16), (16, 22),
               (22, 24), (24, 26), (26, 29)]
    assert ex.token_pcs(offsets) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3]
    assert get_task("copy").examples("train", 1, 0)[0].token_pcs([(0, 4), (4, 9)]) == [0, 0]


def test_example_is_frozen_and_takes_a_string_as_one_segment():
    ex = Example("copy 12 =", " 12")
    assert ex.segments == ("copy 12 =",) and ex.prompt == "copy 12 =" and ex.text == "copy 12 = 12"
    assert Example(["a", "b"], "") == Example(("a", "b"), "")
    with pytest.raises(AttributeError):
        ex.answer = "x"
    with pytest.raises(TypeError):
        Example((), "x")


# --- registry, specs and user tasks -------------------------------------------------------------


def test_registry_and_spec_errors():
    assert set(GENERATED) | {"lm_embedded", "lm_wikitext", "lm_shakespeare", "lm"} <= set(TASKS)
    names = [t.name for t in parse_tasks(" copy, reverse,kv ")]
    assert names == ["copy", "reverse", "kv"]
    with pytest.raises(UsageError, match="unknown task 'nope'.*jsonl:PATH"):
        get_task("nope")
    with pytest.raises(UsageError, match="listed twice"):
        parse_tasks("copy,kv,copy")
    for bad in ("", "  ", "copy,,kv", "copy,"):
        with pytest.raises(UsageError, match="no tasks|empty task"):
            parse_tasks(bad)
    with pytest.raises(UsageError, match="needs a path"):
        get_task("jsonl:")
    kv = get_task("kv:min_pairs=2:max_pairs=2")
    assert all(len(e.prompt.split(" ? ")[0].split()) == 2 for e in kv.examples("train", 20, 0))
    with pytest.raises(UsageError, match="bad option 'pairs=2'.*min_pairs, max_pairs"):
        get_task("kv:pairs=2")
    with pytest.raises(UsageError, match="min_pairs takes a whole number, got 'two'"):
        get_task("kv:min_pairs=two")
    short = get_task("reverse:min_digits=2:max_digits=3")
    examples = short.examples("train", 50, 0)
    assert {len(e.answer.strip()) for e in examples} == {2, 3} and short.max_answer_chars == 4
    assert all(e.answer.strip() == e.prompt.split()[1][::-1] for e in examples)
    with pytest.raises(UsageError, match="reverse: need 1 <= min_digits <= max_digits"):
        get_task("reverse:min_digits=5:max_digits=3")


def test_a_user_task_is_one_small_class():
    @register_task("_probe")
    class Multiply(Task):
        kind, max_answer_chars = "qa", 3

        def sample(self, rng):
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            return Example((f"{a}*{b}=",), f" {a * b}")

    try:
        task = get_task("_probe")
        assert task.name == "_probe"
        train, eval_ = task.examples("train", 100, 0), task.examples("eval", 30, 0)
        assert all(int(e.answer) == int(e.prompt[0]) * int(e.prompt[2]) for e in train + eval_)
        assert not {e.prompt for e in train} & {e.prompt for e in eval_}
        with pytest.raises(ValueError, match="already registered"):
            register_task("_probe")(lambda: task)
    finally:
        TASKS.pop("_probe", None)


def test_a_task_with_too_few_examples_fails_clearly():
    class Tiny(Task):
        name = "tiny"

        def sample(self, rng):
            return Example(("same",), " 1")

    split = "eval" if tasks_module._unit_hash("tiny", "same", " 1") >= Tiny.eval_fraction else "train"
    with pytest.raises(UsageError, match="could not draw 2"):
        Tiny().examples(split, 2, 0)
    with pytest.raises(ValueError, match="split"):
        Tiny().examples("test", 2, 0)


# --- JSON-lines tasks ---------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_task_splits_80_20_deterministically(tmp_path):
    rows = [json.dumps({"prompt": f"q{i} =", "answer": f" {i}"}) for i in range(100)]
    path = write_lines(tmp_path / "my.jsonl", rows[:50] + [""] + rows[50:])  # a blank line is skipped
    task = get_task(f"jsonl:{path}")
    assert task.name == f"jsonl:{path}" and task.kind == "qa" and task.max_answer_chars == 3
    n_train, n_eval = task.split_sizes
    assert n_train + n_eval == 100 and 10 <= n_eval <= 30
    train = task.examples("train", 250, seed=0)
    eval_ = task.examples("eval", 500, seed=0)
    assert len(train) == 250 and len({e.prompt for e in train}) == n_train  # cycles through every line
    assert len(eval_) == n_eval == len(set(eval_))
    assert not {e.prompt for e in train} & {e.prompt for e in eval_}
    assert all(e.answer == " " + e.prompt[1:-2] for e in train + eval_)
    again = JsonlTask(path)
    assert again.examples("train", 40, 5) == task.examples("train", 40, 5) != task.examples("train", 40, 6)
    assert {e.prompt for e in again.examples("eval", 100, 1)} == {e.prompt for e in eval_}
    assert JsonlTask(path, split_seed=1).examples("eval", 100, 0) != eval_  # the seed moves the split


def test_jsonl_task_with_segments_and_lm_lines(tmp_path):
    path = write_lines(tmp_path / "prog.jsonl", [
        json.dumps({"segments": ["y=1;", " y+=2;", " print y ="], "answer": " 3"}),
        json.dumps({"segments": ["y=2;", " print y ="], "prompt": "y=2; print y =", "answer": " 2"}),
    ])
    task = get_task(f"jsonl:{path}")
    assert task.split_sizes == (1, 1)
    both = task.examples("train", 1, 0) + task.examples("eval", 1, 0)
    assert sorted(len(e.segments) for e in both) == [2, 3]
    lm = write_lines(tmp_path / "lm.jsonl", [json.dumps({"prompt": "some text", "answer": ""})] * 3)
    assert get_task(f"jsonl:{lm}").kind == "lm"


@pytest.mark.parametrize("lines, message", [
    (None, "task file not found"),
    ([], "is empty"),
    (["", "   "], "is empty"),
    (['{"prompt": "a", "answer": " 1"}'], "need at least 2"),
    (['{"prompt": "a", "answer": " 1"}', '{"prompt": "b", "answer": 2'], r"bad\.jsonl:2: not valid JSON"),
    (['{"prompt": "a", "answer": " 1"}', "", '["a", "b"]'], r"bad\.jsonl:3: expected an object"),
    (['{"prompt": "a", "answer": " 1"}', '{"answer": " 2"}'], r":2: needs a string \"prompt\""),
    (['{"prompt": "a", "answer": " 1"}', '{"prompt": "b"}'], r":2: needs a string \"answer\""),
    (['{"prompt": "a", "answer": " 1"}', '{"prompt": "b", "answer": ""}'], r":2: empty answer"),
    (['{"prompt": "a", "answer": "1"}', '{"segments": ["b", "c"], "prompt": "bd", "answer": "2"}'], ":2: .*differs"),
])
def test_jsonl_errors_name_the_problem(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    if lines is not None:
        path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(UsageError, match=message):
        parse_tasks(f"copy,jsonl:{path}")


# --- language-modelling domains -----------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    return load_text("embedded")


def assert_real_windows(examples, text, size=200):
    for ex in examples:
        window = ex.prompt
        assert ex.answer == "" and len(ex.segments) == 1
        assert size // 2 <= len(window) <= size
        at = text.find(window)
        assert at >= 0, "a window is a verbatim piece of its corpus split"
        assert at == 0 or text[at - 1].isspace(), "starts at a word"
        end = at + len(window)
        assert end == len(text) or text[end].isspace(), "ends at a word"
        assert window == window.strip()


def test_lm_embedded_examples_are_real_text_windows(embedded):
    task = get_task("lm_embedded")
    assert task.kind == "lm" and task.name == "lm_embedded"
    train, eval_ = task.examples("train", 30, seed=0), task.examples("eval", 30, seed=0)
    assert_real_windows(train, embedded.train)
    assert_real_windows(eval_, embedded.eval)
    assert train == task.examples("train", 30, seed=0) != task.examples("train", 30, seed=1)
    assert sum(len(e.prompt) for e in train) / len(train) > 170  # about 200 characters
    assert len({e.prompt for e in train}) == 30
    assert all(task.score("", e.answer) for e in train)


def test_lm_window_size_option_and_local_sources(tmp_path):
    words = " ".join(f"w{i}" for i in range(3000))
    path = tmp_path / "corpus.txt"
    path.write_text(words + "\n" + words[::-1] + "\n", encoding="utf-8")
    task = get_task(f"lm:source={path}:window_chars=60")
    corpus = load_text(str(path))
    assert_real_windows(task.examples("train", 20, 0), corpus.train, size=60)
    assert_real_windows(task.examples("eval", 20, 0), corpus.eval, size=60)


def test_lm_shakespeare_path_option(tmp_path, monkeypatch):
    text = "".join(f"CITIZEN {i}:\nWe are accounted poor citizens, the patricians good.\n\n" for i in range(200))
    path = tmp_path / "input.txt.gz"
    path.write_bytes(gzip.compress(text.encode()))
    task = get_task(f"lm_shakespeare:path={path}")
    assert task.name == "lm_shakespeare"
    corpus = load_text(str(path))
    assert_real_windows(task.examples("train", 10, 0), corpus.train)
    assert_real_windows(task.examples("eval", 10, 0), corpus.eval)
    monkeypatch.setattr(tasks_module, "DEFAULT_SHAKESPEARE", tmp_path / "absent.txt.gz")
    with pytest.raises(UsageError, match="lm_shakespeare:path="):
        get_task("lm_shakespeare")
    with pytest.raises(UsageError, match="is not a file"):
        get_task(f"lm_shakespeare:path={tmp_path / 'nope.txt'}")


def test_lm_wikitext_offline_is_a_usage_error(monkeypatch):
    from mempos import data

    monkeypatch.setattr(data, "load_wikitext", lambda: (_ for _ in ()).throw(UsageError(
        "cannot reach the Hugging Face hub for dataset wikitext-2-raw-v1 (no network) and it is not cached: "
        "pass --data PATH to a local text file or folder")))
    task = get_task("lm_wikitext")  # cheap: the corpus is read on first use
    with pytest.raises(UsageError, match=r"^task lm_wikitext: cannot reach .*not cached; use lm:source=PATH"):
        task.examples("train", 1, 0)


# --- the stream ----------------------------------------------------------------------------------


def make_stream(seed=0, names="copy,reverse,add", episodes=3, batch=4, eval_size=8):
    return TaskStream(parse_tasks(names), episodes_per_task=episodes, batch_size=batch, seed=seed,
                      eval_size=eval_size)


def test_stream_yields_tasks_in_order_and_never_a_future_one():
    stream = make_stream()
    assert stream.n_tasks == 3 and len(stream) == 9 and stream.current_task == -1
    seen = []
    for episode in stream:
        assert isinstance(episode, Episode)
        assert stream.current_task == episode.task_id
        assert episode.step == len(seen)
        assert episode.task_name == ["copy", "reverse", "add"][episode.task_id]
        assert len(episode.examples) == 4 and episode.example_task_ids == (episode.task_id,) * 4
        assert all(ex.prompt.startswith(("copy", "reverse")) or "+" in ex.prompt for ex in episode.examples)
        assert all(ex.prompt.split()[0] == episode.task_name for ex in episode.examples if episode.task_id < 2)
        # a task's episodes come only after every episode of the earlier tasks
        assert [e.task_id for e in seen] == sorted(e.task_id for e in seen)
        assert stream.is_task_end(episode.step) == (episode.step % 3 == 2)
        seen.append(episode)
    assert [e.task_id for e in seen] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [e.step for e in seen] == list(range(9))


def test_eval_set_only_for_seen_tasks_and_the_next_one():
    stream = make_stream()
    assert len(stream.eval_set(0)) == 8
    for task_id in (1, 2):
        with pytest.raises(PermissionError, match="future"):
            stream.eval_set(task_id)
    with pytest.raises(IndexError):
        stream.eval_set(3)
    baseline = stream.baseline_eval_sets()
    assert [len(b) for b in baseline] == [8, 8, 8]
    it = iter(stream)
    next(it)  # task 0 begins
    assert stream.eval_set(1) == baseline[1]
    with pytest.raises(PermissionError):
        stream.eval_set(2)
    with pytest.raises(PermissionError, match="before the first episode"):
        stream.baseline_eval_sets()
    for _ in range(3):
        next(it)  # the first episode of task 1
    assert stream.current_task == 1 and stream.eval_set(2) == baseline[2]
    assert stream.eval_set(0) == baseline[0]  # the same held-out examples every time
    train = {ex for ep in make_stream() for ex in ep.examples}
    assert not train & {ex for b in baseline for ex in b}


def test_stream_is_deterministic_and_resume_gives_the_tail():
    full = list(make_stream(seed=7))
    assert full == list(make_stream(seed=7))
    assert full != list(make_stream(seed=8))
    for k in (0, 2, 3, 5, 9):
        stream = make_stream(seed=7)
        tail = list(stream.resume_from(k))
        assert tail == full[k:]
    resumed = make_stream(seed=7)
    resumed.resume_from(3)
    assert resumed.current_task == 0  # at a boundary: task 0 done, task 1 next
    assert len(resumed.eval_set(1)) == 8
    with pytest.raises(PermissionError):
        resumed.eval_set(2)
    with pytest.raises(ValueError):
        make_stream().resume_from(10)


def test_joint_reference_uses_the_same_examples_shuffled():
    stream = make_stream(seed=1)
    sequential = list(stream)
    fresh = make_stream(seed=1)
    joint = list(fresh.joint())
    assert fresh.current_task == 2  # every task is seen in the joint run
    assert len(joint) == len(sequential) and [e.step for e in joint] == list(range(9))
    assert all(e.task_id == -1 and e.task_name == "joint" and len(e.examples) == 4 for e in joint)
    pairs = lambda eps: sorted((t, ex.prompt) for e in eps for t, ex in zip(e.example_task_ids, e.examples))  # noqa: E731
    assert pairs(joint) == pairs(sequential)
    assert len({t for t in joint[0].example_task_ids + joint[1].example_task_ids}) > 1  # mixed episodes
    assert list(make_stream(seed=1).joint(start=4)) == joint[4:]


def test_stream_rejects_bad_settings():
    with pytest.raises(UsageError, match="at least one task"):
        TaskStream([], 1, 1, 0)
    with pytest.raises(UsageError, match="batch size"):
        TaskStream(parse_tasks("copy"), 1, 0, 0)
    with pytest.raises(UsageError, match="twice"):
        TaskStream([get_task("copy"), get_task("copy")], 1, 1, 0)


def test_stream_with_an_lm_task():
    stream = make_stream(names="kv,lm_embedded,program", episodes=2, batch=2)
    episodes = list(stream)
    assert [e.task_name for e in episodes] == ["kv", "kv", "lm_embedded", "lm_embedded", "program", "program"]
    assert all(ex.answer == "" and len(ex.prompt) > 100 for ex in episodes[2].examples)
    assert all(len(ex.segments) >= 3 for ex in episodes[4].examples)
