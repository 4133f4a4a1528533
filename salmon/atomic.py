"""Atomic file writes: temp file in the same directory + fsync + rename (+ fsync of the directory).

A reader (or a rerun after SIGKILL) sees either the old file or the complete new one, never half.
Every writer in salmon that produces a file another process reads goes through here.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import signal
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from salmon.errors import UserError


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Test hook, unset in normal use. SALMON_FAULT_KILL_WRITE="<fnmatch pattern>:<n>" makes the n-th (1-based)
# atomic write of a path matching the pattern SIGKILL its own process after half of the bytes reached the
# temp file: the resume tests use it to land a kill inside a write, which a kill from outside at a random
# moment almost never hits (a write takes microseconds).
FAULT_ENV = "SALMON_FAULT_KILL_WRITE"
_fault_writes = 0


def _fault_hook(path: Path, f: Any, data: bytes) -> None:
    global _fault_writes
    pattern, _, nth = os.environ.get(FAULT_ENV, "").rpartition(":")
    if not pattern or not fnmatch.fnmatch(str(path), pattern):
        return
    _fault_writes += 1
    if _fault_writes == int(nth):
        f.write(data[:len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


def remove_stale_temps(directory: str | os.PathLike) -> int:
    """Delete the temp files a kill inside an atomic write left in ``directory``; returns how many.

    Only a writer that owns the directory may call this (another process's write in progress would go).
    """
    n = 0
    for tmp in Path(directory).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            n += 1
    return n


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _fault_hook(path, f, data)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def jsonl_dumps(records: Iterable[Any]) -> str:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records)


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
    atomic_write_text(path, jsonl_dumps(records))


class JsonlError(UserError):
    """A malformed JSONL input; the message names the file and line."""


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    path = Path(path)
    out = []
    try:
        fh = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise JsonlError(f"{path}: file not found") from None
    with fh:
        try:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise JsonlError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        except UnicodeDecodeError as e:
            raise JsonlError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return out
