"""A folder written atomically and read back only if whole.

`write_folder` writes every file into a hidden temporary sibling
(``.NAME.tmp-PID-XXXX``), the manifest last (with each file's size and
sha256), then swaps it in: an existing folder is renamed to
``.NAME.previous``, the new one renamed to NAME, and the previous one
deleted. An exception or kill before the swap leaves the old folder
untouched (the temporary one, lacking its manifest until the very end,
never reads as a bank); the swap itself is two renames, and a kill between
them leaves no NAME but a whole ``.NAME.previous``, which `read_folder`
names in its error. An existing NAME that is not a folder of this format
is never replaced.

`read_folder` checks the manifest (valid JSON, format name, format
version), then each listed file (present, size, sha256) and raises
UsageError with one line naming the first problem.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mempos.errors import UsageError
from mempos.io import write_json

MANIFEST = "manifest.json"


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def read_npz(data: bytes, where: str) -> dict[str, np.ndarray]:
    if not data.startswith(b"PK"):
        raise UsageError(f"{where}: unreadable (not an .npz archive)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as exc:  # zipfile / numpy errors of many kinds
        raise UsageError(f"{where}: unreadable ({type(exc).__name__}: {exc})") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_ours(path: Path, fmt: str) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("format") == fmt
    except (OSError, ValueError, AttributeError):
        return False


def write_folder(path, files: Mapping[str, bytes], manifest: Mapping, fmt: str) -> Path:
    """Write `files` and a manifest (plus "format" and per-file size/sha256) as folder `path`, atomically."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"cannot save a memory bank to {path}: it exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not _is_ours(path, fmt):
        raise UsageError(f"refusing to replace {path}: it is a non-empty folder that is not a memory bank")
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        listing = {}
        for name, data in files.items():
            _write_file(tmp / name, data)
            listing[name] = {"bytes": len(data), "sha256": _sha256(data)}
        write_json(tmp / MANIFEST, {"format": fmt, **manifest, "files": listing})
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    previous = path.parent / f".{path.name}.previous"
    if path.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(path, previous)
        os.rename(tmp, path)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.rename(tmp, path)
    _fsync_dir(path.parent)
    return path


def read_folder(path, fmt: str, version: int, required: tuple[str, ...]) -> tuple[dict, dict[str, bytes]]:
    """(manifest, {name: bytes}) for a whole folder of format `fmt` and `version`; UsageError otherwise."""
    path = Path(path)
    if not path.is_dir():
        previous = path.parent / f".{path.name}.previous"
        if previous.is_dir():
            raise UsageError(f"no memory bank at {path}; an interrupted save left the previous one at {previous} "
                             f"(rename it to {path.name} to use it)")
        raise UsageError(f"no memory bank at {path} (not a folder)")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise UsageError(f"{path} is not a memory bank: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{mpath}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{mpath}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise UsageError(f"{mpath}: not a {fmt} manifest")
    got = manifest.get("format_version")
    if got != version:
        raise UsageError(f"{path}: format_version {got!r} is not supported (this mempos reads version {version})")
    listing = manifest.get("files")
    if not isinstance(listing, dict):
        raise UsageError(f"{mpath}: the file listing is missing")
    data = {}
    for name in required:
        entry = listing.get(name)
        if not isinstance(entry, dict) or not {"bytes", "sha256"} <= set(entry):
            raise UsageError(f"{mpath}: no size and checksum listed for {name}")
        fpath = path / name
        if not fpath.is_file():
            raise UsageError(f"{path}: {name} is missing")
        blob = fpath.read_bytes()
        if len(blob) != entry["bytes"]:
            raise UsageError(f"{fpath}: {len(blob)} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
        if _sha256(blob) != entry["sha256"]:
            raise UsageError(f"{fpath}: contents do not match the manifest checksum (corrupted or replaced)")
        data[name] = blob
    return manifest, data
