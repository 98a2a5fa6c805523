"""Corpora, chunking and needles: values, not just that the code ran."""

import gzip
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mempos import data
from mempos.data import (
    DEFAULT_NEEDLE,
    NeedleRecord,
    chunk_tokens,
    inject_needles,
    load_text,
    needle_mask,
    needle_token_ids,
)
from mempos.errors import UsageError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKI = SHARED_DATA / "wikitext-2-raw"
WIKI_VALID_SHA256 = "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7"  # from its README
needs_shared_data = pytest.mark.skipif(not (WIKI / "wiki.valid.raw.gz").exists(), reason="no ../shared/data")


def numbered_lines(n: int, tag: str = "line") -> str:
    return "".join(f"{tag} {i} of the text.\n" for i in range(n))


# --- embedded corpus -----------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    return load_text(None)


def test_embedded_corpus_is_large_english_and_split_90_10(embedded):
    total = len(embedded.train) + len(embedded.eval)
    assert embedded.name == "embedded"
    assert total >= 1_500_000
    assert 0.88 < len(embedded.train) / total < 0.92
    assert embedded.train.count(" the ") > 5000
    assert embedded.eval.count(" the ") > 500
    assert "object at 0x" not in embedded.train + embedded.eval
    assert sys.prefix not in embedded.train + embedded.eval


def test_embedded_corpus_splits_once_at_a_paragraph_boundary(embedded):
    whole = "\n\n".join(p for p in data._stdlib_docs() if p.strip())
    assert embedded.train + "\n\n" + embedded.eval == whole


def test_embedded_corpus_same_on_every_load_and_process(embedded):
    assert load_text("embedded") == embedded
    code = (
        "import hashlib; from mempos.data import load_text; c = load_text(None); "
        "print(hashlib.sha256((c.train + '|' + c.eval).encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256((embedded.train + "|" + embedded.eval).encode()).hexdigest()


# --- local files -------------------------------------------------------------


def test_single_file_splits_at_a_line_near_90_percent(tmp_path):
    text = numbered_lines(1000)
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    corpus = load_text(str(path))
    assert corpus.train + "\n" + corpus.eval == text
    assert corpus.eval.startswith("line ") and corpus.train.endswith(".")
    assert 0.89 < len(corpus.train) / len(text) < 0.91


def test_gzip_file_reads_like_the_plain_file(tmp_path):
    text = numbered_lines(300)
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
    plain, packed = load_text(str(tmp_path / "a.txt")), load_text(str(tmp_path / "a.txt.gz"))
    assert (plain.train, plain.eval) == (packed.train, packed.eval)


def test_folder_uses_split_names_in_file_names(tmp_path):
    (tmp_path / "wiki.train.txt").write_text("train text\n")
    (tmp_path / "wiki.valid.txt").write_text("valid text\n")
    (tmp_path / "wiki.test.txt").write_text("test text\n")
    (tmp_path / "README.md").write_text("about the data\n")
    corpus = load_text(str(tmp_path))
    assert (corpus.train, corpus.eval) == ("train text\n", "test text\n")


def test_folder_trains_on_valid_when_there_is_no_train_file(tmp_path):
    (tmp_path / "valid.raw").write_text("valid text\n")
    (tmp_path / "test.raw").write_text("test text\n")
    (tmp_path / "latest.txt").write_text("not a split name\n")
    corpus = load_text(str(tmp_path))
    assert (corpus.train, corpus.eval) == ("valid text\n", "test text\n")


def test_folder_without_split_names_concatenates_sorted_files_recursively(tmp_path):
    (tmp_path / "b.md").write_text(numbered_lines(100, "bee"))
    (tmp_path / "a.txt").write_text(numbered_lines(100, "ant"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt.gz").write_bytes(gzip.compress(numbered_lines(100, "cat").encode()))
    (tmp_path / ".hidden.txt").write_text("hidden\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\x00")
    corpus = load_text(str(tmp_path))
    whole = corpus.train + "\n" + corpus.eval
    assert whole.index("ant 0") < whole.index("bee 0") < whole.index("cat 0")
    assert "hidden" not in whole
    assert corpus.eval.startswith("cat ") and corpus.eval.endswith("cat 99 of the text.\n")


def test_explicit_train_and_eval_paths_in_either_order(tmp_path):
    (tmp_path / "x.txt").write_text("first file\n")
    (tmp_path / "y.txt.gz").write_bytes(gzip.compress(b"second file\n"))
    spec = f"train={tmp_path / 'x.txt'},eval={tmp_path / 'y.txt.gz'}"
    corpus = load_text(spec)
    assert (corpus.name, corpus.train, corpus.eval) == (spec, "first file\n", "second file\n")
    swapped = load_text(f"eval={tmp_path / 'y.txt.gz'},train={tmp_path / 'x.txt'}")
    assert (swapped.train, swapped.eval) == (corpus.train, corpus.eval)


@pytest.mark.parametrize("spec", ["train=a.txt", "train=,eval=b.txt", "train=a,train=b"])
def test_malformed_explicit_split_spec(spec):
    with pytest.raises(UsageError, match="train=PATH,eval=PATH"):
        load_text(spec)


@needs_shared_data
def test_real_wikitext_file_and_folder():
    valid = load_text(str(WIKI / "wiki.valid.raw.gz"))
    assert valid.train.startswith(" \n = Homarus gammarus = \n")
    assert 0.89 < len(valid.train) / (len(valid.train) + len(valid.eval)) < 0.91
    folder = load_text(str(WIKI))
    assert folder.train.startswith(" \n = Homarus gammarus = \n")
    assert folder.eval.startswith(" \n = Robert Boulter = \n")
    assert "Pointer Sentinel" not in folder.train + folder.eval  # the README is not a split
    assert hashlib.sha256(folder.train.encode()).hexdigest() == WIKI_VALID_SHA256  # the file, byte for byte
    explicit = load_text(f"train={WIKI / 'wiki.valid.raw.gz'},eval={WIKI / 'wiki.test.raw.gz'}")
    assert (explicit.train, explicit.eval) == (folder.train, folder.eval)
    assert len(explicit.train) > 1_000_000 and len(explicit.eval) > 1_000_000


# --- bad input -----------------------------------------------------------------


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(UsageError, match="not found: .*nope.txt"):
        load_text(str(missing))


def test_unknown_corpus_name_lists_the_alternatives():
    with pytest.raises(UsageError, match="unknown corpus 'wikitext-103'.*embedded.*train=PATH,eval=PATH"):
        load_text("wikitext-103")


@pytest.mark.parametrize("content", [b"", b"  \n\n \t\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(UsageError, match="empty.txt is empty"):
        load_text(str(path))


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"text\x00\x01\x02 more", "contains NUL bytes"), (b"caf\xe9 au lait\n", "not UTF-8 text .*offset 3")],
)
def test_binary_or_non_utf8_file(tmp_path, content, problem):
    path = tmp_path / "blob.txt"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=f"blob.txt .*{problem}"):
        load_text(str(path))


@pytest.mark.parametrize("content", [b"this is not gzip at all", gzip.compress(b"cut short " * 100)[:30]])
def test_corrupt_gzip(tmp_path, content):
    path = tmp_path / "bad.txt.gz"
    path.write_bytes(content)
    with pytest.raises(UsageError, match="bad.txt.gz is not a valid gzip file"):
        load_text(str(path))


def test_folder_without_text_files_or_text(tmp_path):
    with pytest.raises(UsageError, match="no text files"):
        load_text(str(tmp_path))
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("\n\n")
    with pytest.raises(UsageError, match="no text in .*all 2 text files are empty"):
        load_text(str(tmp_path))


@pytest.fixture
def datasets_without_cache(tmp_path, monkeypatch):
    """`datasets` with an empty cache, so nothing can be served locally."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    return datasets


def test_wikitext_offline_fails_fast_with_alternatives(datasets_without_cache, monkeypatch):
    monkeypatch.setattr(datasets_without_cache.config, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(UsageError, match="wikitext-2-raw-v1 .*offline mode.*--data PATH.*embedded"):
        load_text("wikitext")
    assert time.monotonic() - start < 10


def test_wikitext_without_network_fails_fast(datasets_without_cache, monkeypatch):
    monkeypatch.setattr(datasets_without_cache.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    start = time.monotonic()
    with pytest.raises(UsageError, match=r"wikitext-2-raw-v1 \(no network\).*--data PATH"):
        load_text("wikitext-2-raw-v1")
    assert time.monotonic() - start < 10


def test_wikitext_is_read_from_the_datasets_cache_before_any_network(datasets_without_cache, tmp_path, monkeypatch):
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.text.text import Text

    files = {}
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.txt").write_text(f" = {split} title = \n \n Some {split} words .\n")
        files[split] = [str(tmp_path / f"{split}.txt")]
    builder = Text(
        data_files=DataFilesDict.from_patterns(files), dataset_name="wikitext",
        config_name="wikitext-2-raw-v1", cache_dir=str(tmp_path / "build"), keep_linebreaks=True,
    )
    builder.download_and_prepare()
    snapshot = tmp_path / "wikitext" / "wikitext-2-raw-v1" / "0.0.0" / "commit0"  # the layout a hub download leaves
    snapshot.parent.mkdir(parents=True)
    Path(builder.cache_dir).rename(snapshot)
    monkeypatch.setattr(datasets_without_cache.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(data, "hub_reachable", lambda: pytest.fail("probed the hub although the data is cached"))
    corpus = load_text("wikitext")
    assert corpus.name == "wikitext-2-raw-v1"
    assert (corpus.train, corpus.eval) == (" = train title = \n \n Some train words .", " = test title = \n \n Some test words .")
    assert datasets_without_cache.config.HF_HUB_OFFLINE is False  # offline only for the cache attempt


def test_hub_probe_gives_up_quickly_on_an_unresolvable_host(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.mempos-test.invalid")
    start = time.monotonic()
    assert data.hub_reachable() is False
    assert time.monotonic() - start < 10


# --- chunks ----------------------------------------------------------------


def test_chunks_are_consecutive_and_drop_the_tail():
    chunks = chunk_tokens(list(range(11)), 3)
    assert chunks.dtype == torch.long
    assert chunks.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert chunk_tokens(torch.arange(12, dtype=torch.int32), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_chunks_do_not_alias_the_input():
    ids = torch.arange(8)
    chunk_tokens(ids, 4)[0, 0] = 99
    assert ids[0] == 0


def test_text_too_short_for_one_chunk_says_how_short():
    with pytest.raises(UsageError, match="9 tokens, need at least 10"):
        chunk_tokens(list(range(9)), 10)


def test_chunk_length_must_be_positive():
    with pytest.raises(UsageError, match=">= 1"):
        chunk_tokens(list(range(9)), 0)


# --- needles ---------------------------------------------------------------


NEEDLE = [1001, 1002, 1003]


def test_needles_sit_exactly_where_recorded_every_20_chunks():
    chunks = torch.arange(45 * 16).view(45, 16)
    before = chunks.clone()
    out, records = inject_needles(chunks, NEEDLE)
    assert torch.equal(chunks, before)  # input untouched
    assert [r.chunk_index for r in records] == [0, 20, 40]
    flat = out.flatten()
    for r in records:
        assert r.length == 3 and 0 <= r.token_index <= 16 - 3
        assert out[r.chunk_index, r.token_index : r.token_index + 3].tolist() == NEEDLE
        assert r.absolute_index == r.chunk_index * 16 + r.token_index
        assert flat[r.absolute_index : r.absolute_index + 3].tolist() == NEEDLE
    mask = needle_mask(records, 45, 16)
    assert mask.dtype == torch.bool and int(mask.sum()) == 9
    assert torch.equal(out[~mask], chunks[~mask])  # replaced, nothing shifted
    assert out.shape == chunks.shape


def test_needle_positions_are_seeded_and_cover_every_valid_start():
    chunks = torch.zeros(400, 8, dtype=torch.long)
    _, first = inject_needles(chunks, NEEDLE, every=1, seed=7)
    _, again = inject_needles(chunks, NEEDLE, every=1, seed=7)
    _, other = inject_needles(chunks, NEEDLE, every=1, seed=8)
    assert first == again
    assert first != other
    assert {r.token_index for r in first} == set(range(8 - 3 + 1))


def test_needle_records_are_plain_values():
    assert NeedleRecord(2, 5, 2 * 16 + 5, 3) == NeedleRecord(2, 5, 37, 3)


@pytest.mark.parametrize(("needle", "every", "match"), [(list(range(9)), 20, "does not fit"), (NEEDLE, 0, ">= 1")])
def test_needle_that_cannot_be_placed(needle, every, match):
    with pytest.raises(UsageError, match=match):
        inject_needles(torch.zeros(4, 8, dtype=torch.long), needle, every=every)


def test_needle_ids_are_tokenised_as_a_word_in_running_text():
    from mempos.models import train_tokenizer

    tok = train_tokenizer("a needle in a haystack, needle after needle. " * 50, 300)
    ids = needle_token_ids(tok)
    assert DEFAULT_NEEDLE == "needle needle needle"
    assert ids == tok(" needle needle needle", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == " needle needle needle"
