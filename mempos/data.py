"""Text corpora, fixed-length token chunks and needle injection.

Every experiment reads text through `load_text`, cuts it with `chunk_tokens`
and plants needles with `inject_needles`, so two experiments given the same
`--data` see exactly the same tokens.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import inspect
import os
import re
import socket
import sys
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from mempos.errors import UsageError

TRAIN_FRACTION = 0.9
DEFAULT_NEEDLE = "needle needle needle"
WIKITEXT_NAMES = ("wikitext", "wikitext-2-raw-v1")
TEXT_SUFFIXES = (".txt", ".raw", ".md", ".gz")
HUB_PROBE_TIMEOUT_S = 3.0

# Stdlib modules whose docstrings make up the embedded corpus. All exist on
# CPython 3.10+; optional C extensions that a build may lack are skipped.
EMBEDDED_MODULES = tuple(sorted("""
    abc argparse array ast asyncio base64 binascii bisect builtins bz2 calendar
    cmath cmd code codecs codeop collections collections.abc colorsys compileall
    concurrent.futures configparser contextlib contextvars copy copyreg cProfile
    csv ctypes dataclasses datetime dbm decimal difflib dis doctest email
    email.headerregistry email.message email.policy email.utils enum errno
    faulthandler filecmp fileinput fnmatch fractions ftplib functools gc getopt
    getpass gettext glob graphlib gzip hashlib heapq hmac html html.parser http
    http.client http.cookiejar http.cookies http.server imaplib importlib
    importlib.metadata importlib.resources inspect io ipaddress itertools json
    keyword linecache locale logging logging.config logging.handlers lzma mailbox
    marshal math mimetypes modulefinder multiprocessing netrc numbers operator
    optparse os pathlib pdb pickle pickletools pkgutil platform plistlib poplib
    pprint profile pstats py_compile pyclbr pydoc queue quopri random re reprlib
    runpy sched secrets select selectors shelve shlex shutil signal site smtplib
    socket socketserver sqlite3 ssl stat statistics string stringprep struct
    subprocess symtable sys sysconfig tabnanny tarfile tempfile textwrap
    threading time timeit token tokenize trace traceback tracemalloc types typing
    unicodedata unittest unittest.mock urllib.parse urllib.request
    urllib.response urllib.robotparser uuid warnings wave weakref webbrowser
    wsgiref.handlers wsgiref.simple_server wsgiref.util wsgiref.validate xml.dom
    xml.dom.minidom xml.dom.pulldom xml.etree.ElementTree xml.parsers.expat
    xml.sax xml.sax.handler xml.sax.saxutils xmlrpc.client xmlrpc.server zipapp
    zipfile zipimport zlib zoneinfo
""".split()))

_ADDRESS = re.compile(r"\bat 0x[0-9a-fA-F]+")


@dataclass(frozen=True)
class Corpus:
    """A named text corpus already split into a training and an evaluation part."""

    name: str
    train: str
    eval: str


@dataclass(frozen=True)
class NeedleRecord:
    """Where one needle was planted: chunk row, start inside it, start in the flat stream."""

    chunk_index: int
    token_index: int
    absolute_index: int
    length: int


def load_text(source: str | None) -> Corpus:
    """Resolve a `--data` value: None/'embedded', 'wikitext', a path, or 'train=PATH,eval=PATH'."""
    if source is None or source == "embedded":
        return embedded_corpus()
    if source in WIKITEXT_NAMES:
        return load_wikitext()
    if source.startswith(("train=", "eval=")):
        return _load_explicit_splits(source)
    path = Path(source).expanduser()
    if path.exists():
        return _load_path(source, path)
    if path.suffix or "/" in source or os.sep in source or source.startswith((".", "~")):
        raise UsageError(f"data path not found: {source}")
    raise UsageError(
        f"unknown corpus {source!r} (and no such file or folder): use 'embedded', 'wikitext', "
        "a path to a text file or folder, or train=PATH,eval=PATH"
    )


# --- the embedded corpus -----------------------------------------------------


def embedded_corpus() -> Corpus:
    """Real English text that ships with Python itself, so the default needs no download."""
    text = "\n\n".join(doc for doc in _stdlib_docs() if doc.strip())
    train, eval_ = _split(text, "\n\n")
    return Corpus("embedded", train, eval_)


def _stdlib_docs() -> list[str]:
    """The pydoc help topics, then every stdlib docstring once, in a fixed order.

    Docstrings are deduplicated (inheritance repeats many) and lines that could
    differ between machines (memory addresses, install paths) are dropped, so
    the text is the same on every run with the same Python version.
    """
    from pydoc_data.topics import topics

    docs = dict.fromkeys(topics[key] for key in sorted(topics))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases such as typing.io warn on access
        for name in EMBEDDED_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            docs.update(dict.fromkeys(_module_docs(module)))
    return [_clean(doc) for doc in docs if doc]


def _module_docs(module) -> Iterator[str | None]:
    """Docstrings of a module, its public classes and functions, and their public members."""
    yield inspect.getdoc(module)
    for name in sorted(dir(module)):
        obj = getattr(module, name, None)
        if name.startswith("_") or name.endswith("hook") or not _is_stdlib_api(obj, module.__name__):
            continue  # hooks (sys.excepthook, threading.excepthook...) are swapped at run time by pytest etc.
        yield inspect.getdoc(obj)
        if inspect.isclass(obj):
            for member_name in sorted(vars(obj)):
                member = getattr(obj, member_name, None)
                if not member_name.startswith("_") and _is_stdlib_api(member, obj.__module__):
                    yield inspect.getdoc(member)


def _is_stdlib_api(obj, default_module: str) -> bool:
    """Classes, functions, methods and properties written in the stdlib.

    Plain data would only repeat its type's docstring, and what other libraries
    add at import time (transformers adds methods to logging.Logger, IPython
    adds builtins) would make the text depend on what the caller imported.
    """
    if not (inspect.isclass(obj) or inspect.isroutine(obj) or inspect.isdatadescriptor(obj)):
        return False
    owner = getattr(getattr(obj, "fget", obj), "__module__", None) or default_module
    return owner.split(".")[0] in sys.stdlib_module_names


def _clean(doc: str) -> str:
    """Drop lines that name this machine: memory addresses and install prefixes."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    lines = doc.splitlines()
    keep = [line for line in lines if not _ADDRESS.search(line) and not any(p in line for p in prefixes)]
    return "\n".join(keep)


# --- WikiText-2 through `datasets` ---------------------------------------------


def load_wikitext() -> Corpus:
    """WikiText-2 (raw) from the `datasets` cache, or from the hub when it is reachable.

    Without a network `load_dataset` retries for about 25 s before failing, so
    the cache is tried offline first and the hub only after a quick probe.
    """
    import datasets

    splits = _load_wikitext_cached(datasets)
    if splits is None:
        offline_env = datasets.config.HF_HUB_OFFLINE
        if offline_env or not hub_reachable():
            why = "offline mode is set (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if offline_env else "no network"
            raise UsageError(
                f"cannot reach the Hugging Face hub for dataset wikitext-2-raw-v1 ({why}) and it is not "
                "cached: pass --data PATH to a local text file or folder, or --data embedded for the embedded corpus"
            )
        try:
            splits = datasets.load_dataset("wikitext", "wikitext-2-raw-v1")
        except Exception as e:  # network and hub errors come in many types; all are the user's environment
            raise UsageError(f"could not load wikitext-2-raw-v1 from the hub: {_one_line(e)}") from e
    return Corpus("wikitext-2-raw-v1", _join_rows(splits["train"]["text"]), _join_rows(splits["test"]["text"]))


def _load_wikitext_cached(datasets):
    """The cached WikiText-2 splits, or None; never touches the network."""
    with _datasets_offline(datasets):
        try:
            return datasets.load_dataset("wikitext", "wikitext-2-raw-v1")
        except Exception:  # any failure here just means "not usable from the cache"
            return None


@contextlib.contextmanager
def _datasets_offline(datasets):
    """Make `datasets` act as if HF_DATASETS_OFFLINE=1 (it reads the env only at import)."""
    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def _join_rows(rows: list[str]) -> str:
    """Rows are the file's lines (content lines keep their newline, blank ones are empty)."""
    return "\n".join(row.rstrip("\n") for row in rows)


def hub_reachable() -> bool:
    """A TCP connect to the hub endpoint with a short timeout; DNS failure counts as unreachable."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _one_line(error: Exception) -> str:
    """An exception message squeezed onto one line, for UsageError texts."""
    return " ".join(str(error).split()) or type(error).__name__


# --- local files -------------------------------------------------------------


def _load_path(name: str, path: Path) -> Corpus:
    """A file is split 90/10 at a line; a folder by split names in file names, else 90/10."""
    if path.is_file():
        train, eval_ = _split(_read_text_file(path), "\n")
        return Corpus(name, train, eval_)
    files = _text_files(path)
    by_role = {role: [f for f in files if _names_split(f, role)] for role in ("train", "valid", "test")}
    train_files = by_role["train"] or by_role["valid"]
    eval_files = by_role["test"] or (by_role["valid"] if by_role["train"] else [])
    if train_files and eval_files:
        return Corpus(name, _read_files(train_files, path), _read_files(eval_files, path))
    train, eval_ = _split(_read_files(files, path), "\n")
    return Corpus(name, train, eval_)


def _names_split(file: Path, role: str) -> bool:
    """'wiki.test.raw' and 'test_2.txt' name the test split; 'latest.txt' does not."""
    return re.search(rf"(^|[^a-z]){role}", file.name.lower()) is not None


def _load_explicit_splits(source: str) -> Corpus:
    """`train=PATH,eval=PATH`: each side a file or folder, read whole (no 90/10 split)."""
    parts = re.split(r",(?=(?:train|eval)=)", source)
    pairs = dict(part.split("=", 1) for part in parts)
    if len(parts) != 2 or set(pairs) != {"train", "eval"} or not all(pairs.values()):
        raise UsageError(f"expected --data train=PATH,eval=PATH, got {source!r}")
    train, eval_ = (_read_source(pairs[role]) for role in ("train", "eval"))
    return Corpus(source, train, eval_)


def _read_source(spec: str) -> str:
    """One side of train=,eval=: a whole file or a whole folder."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise UsageError(f"data path not found: {spec}")
    return _read_text_file(path) if path.is_file() else _read_files(_text_files(path), path)


def _text_files(folder: Path) -> list[Path]:
    """All *.txt, *.raw, *.md, *.gz under a folder, recursively, sorted, hidden ones skipped."""
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise UsageError(f"no text files ({', '.join('*' + s for s in TEXT_SUFFIXES)}) under {folder}")
    return files


def _read_files(files: list[Path], folder: Path) -> str:
    """Concatenate files with a blank line between them; fail if all are empty."""
    text = "\n\n".join(t for t in (_read_text_file(f, allow_empty=True) for f in files) if t.strip())
    if not text:
        raise UsageError(f"no text in {folder}: all {len(files)} text files are empty")
    return text


def _read_text_file(path: Path, allow_empty: bool = False) -> str:
    """UTF-8 text of a file or of a gzip of one, with a one-line error for anything else."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise UsageError(f"{path} is not a valid gzip file ({_one_line(e)})") from e
    if b"\x00" in data:
        raise UsageError(f"{path} looks binary (contains NUL bytes), not a text file")
    try:
        text = data.decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from e
    if not allow_empty and not text.strip():
        raise UsageError(f"{path} is empty (no text)")
    return text


def _split(text: str, boundary: str) -> tuple[str, str]:
    """Cut at the boundary nearest before ~90% (else after it, else at 90% exactly)."""
    cut = int(len(text) * TRAIN_FRACTION)
    at = text.rfind(boundary, 0, cut)
    if at <= 0:
        at = text.find(boundary, cut)
    if at <= 0:
        at = cut
    train, eval_ = text[:at], text[at:].lstrip("\n")
    if not train.strip() or not eval_.strip():
        raise UsageError(f"too little text to split into train and eval ({len(text)} characters)")
    return train, eval_


# --- chunks and needles ----------------------------------------------------


def chunk_tokens(ids: list[int] | torch.Tensor, length: int) -> torch.LongTensor:
    """Consecutive non-overlapping rows of `length` tokens; the incomplete tail is dropped."""
    if length < 1:
        raise UsageError(f"chunk length must be >= 1, got {length}")
    flat = torch.as_tensor(ids, dtype=torch.long).flatten()
    n_chunks = flat.numel() // length
    if n_chunks == 0:
        raise UsageError(f"text too short: {flat.numel()} tokens, need at least {length} for one chunk of {length}")
    return flat[: n_chunks * length].view(n_chunks, length).clone()


def needle_token_ids(tokenizer, needle: str = DEFAULT_NEEDLE) -> list[int]:
    """Needle ids as the needle would be tokenised mid-sentence (with its leading space)."""
    ids = tokenizer(" " + needle, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UsageError(f"needle {needle!r} tokenises to nothing")
    return list(ids)


def inject_needles(
    chunks: torch.LongTensor, needle_ids: list[int], every: int = 20, seed: int = 0
) -> tuple[torch.LongTensor, list[NeedleRecord]]:
    """Overwrite the needle into chunks 0, every, 2*every, ... at seeded random starts.

    Tokens are replaced, not inserted, so every row keeps its length; the input is
    left untouched.
    """
    n_chunks, length = chunks.shape
    size = len(needle_ids)
    if every < 1:
        raise UsageError(f"needle spacing must be >= 1 chunk, got {every}")
    if not 1 <= size <= length:
        raise UsageError(f"needle of {size} tokens does not fit in chunks of {length} tokens")
    generator = torch.Generator().manual_seed(seed)
    needle = torch.tensor(needle_ids, dtype=chunks.dtype)
    out = chunks.clone()
    records = []
    for chunk_index in range(0, n_chunks, every):
        start = int(torch.randint(0, length - size + 1, (1,), generator=generator))
        out[chunk_index, start : start + size] = needle
        records.append(NeedleRecord(chunk_index, start, chunk_index * length + start, size))
    return out, records


def needle_mask(records: list[NeedleRecord], n_chunks: int, length: int) -> torch.BoolTensor:
    """True at every needle token, in the same (n_chunks, length) layout as the chunks."""
    mask = torch.zeros(n_chunks, length, dtype=torch.bool)
    for r in records:
        mask[r.chunk_index, r.token_index : r.token_index + r.length] = True
    return mask
