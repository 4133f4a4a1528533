"""Resumable sharded stages: work units -> JSONL shards + a manifest of finished shards.

A stage splits its (deterministically ordered) work units into fixed-size shards. Each shard is computed
from its units and the stage seed only, written with temp file + fsync + rename, and then recorded in
``manifest.json`` (also written atomically). After a SIGKILL at any point the rerun skips every shard the
manifest lists (and whose bytes still match), recomputes the rest, and so ends with exactly the files a
clean run writes: a shard is never half-written, and one written but not yet recorded is recomputed to
the same bytes. The manifest carries a fingerprint of config + inputs, so a rerun with different
settings into the same directory is refused instead of silently mixing two datasets.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from salmon.atomic import (
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    jsonl_dumps,
    read_jsonl,
    remove_stale_temps,
)
from salmon.errors import UserError

MANIFEST = "manifest.json"
SUMMARY = "summary.json"

ShardFn = Callable[[int, Sequence[Any]], tuple[list[dict], dict[str, int]]]


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hash of JSON-able data, independent of dict order (used for fingerprints and data hashes)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts: each shard gets its own, so resume never depends on earlier shards."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.jsonl"


class ShardedStage:
    """Runs ``fn(shard_index, units) -> (records, counters)`` over shards of ``units``, resumably."""

    def __init__(self, out_dir: str | Path, stage: str, fingerprint: dict[str, Any]):
        self.out_dir = Path(out_dir)
        self.stage = stage
        self.fingerprint = fingerprint
        self.fingerprint_hash = stable_hash(fingerprint)
        self.manifest_path = self.out_dir / MANIFEST

    def _load_manifest(self, num_shards: int) -> dict[str, Any]:
        fresh = {"stage": self.stage, "fingerprint": self.fingerprint_hash, "num_shards": num_shards,
                 "done": {}, "complete": False}
        if not self.manifest_path.is_file():
            return fresh
        try:
            m = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{self.manifest_path}: not a valid stage manifest; move the directory away and rerun") from None
        if m.get("stage") != self.stage or m.get("fingerprint") != self.fingerprint_hash:
            raise UserError(
                f"{self.out_dir} holds {m.get('stage')!r} output made from different inputs or settings "
                f"(fingerprint {m.get('fingerprint')} != {self.fingerprint_hash}); use another output directory"
            )
        return m

    def run(self, units: Sequence[Any], shard_size: int, fn: ShardFn, desc: str | None = None,
            unit_name: str = "items") -> dict[str, Any]:
        """Finish every shard; returns the manifest (``done`` maps shard file -> sha256, records, counters)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Leftovers of a kill mid-write (a shard's, the manifest's or the summary's temp file); never read.
        remove_stale_temps(self.out_dir)
        shards = [units[i:i + shard_size] for i in range(0, len(units), shard_size)]
        manifest = self._load_manifest(len(shards))
        done: dict[str, Any] = manifest["done"]
        todo = []
        for i, chunk in enumerate(shards):
            name = shard_name(i)
            info = done.get(name)
            path = self.out_dir / name
            if info and path.is_file() and file_sha256(path) == info["sha256"]:
                continue
            done.pop(name, None)
            todo.append((i, chunk))
        done_units = len(units) - sum(len(c) for _, c in todo)
        t0 = time.monotonic()
        with tqdm(total=len(units), initial=done_units, desc=desc or self.stage, unit=unit_name,
                  dynamic_ncols=True) as bar:
            for i, chunk in todo:
                records, counters = fn(i, chunk)
                name = shard_name(i)
                atomic_write_text(self.out_dir / name, jsonl_dumps(records))
                done[name] = {"sha256": file_sha256(self.out_dir / name), "records": len(records),
                              "units": len(chunk), "counters": counters}
                manifest["complete"] = len(done) == len(shards)
                atomic_write_json(self.manifest_path, manifest)
                bar.update(len(chunk))
        manifest["complete"] = True
        manifest["done"] = dict(sorted(done.items()))
        atomic_write_json(self.manifest_path, manifest)
        manifest["elapsed_s"] = time.monotonic() - t0
        return manifest


def counters_total(manifest: dict[str, Any]) -> dict[str, int]:
    total: dict[str, int] = {}
    for info in manifest["done"].values():
        for k, v in info.get("counters", {}).items():
            total[k] = total.get(k, 0) + v
    return total


def iter_stage(out_dir: str | Path) -> Iterator[dict]:
    """Records of a finished stage, shard by shard; refuses an unfinished one (rerun it first)."""
    out_dir = Path(out_dir)
    mpath = out_dir / MANIFEST
    if not mpath.is_file():
        raise UserError(f"{out_dir}: no {MANIFEST}; run the stage that writes it first")
    m = json.loads(mpath.read_text())
    if not m.get("complete"):
        raise UserError(f"{out_dir}: stage {m.get('stage')!r} is unfinished; rerun it to resume")
    for name in sorted(m["done"]):
        yield from read_jsonl(out_dir / name)


def stage_shards(out_dir: str | Path) -> list[str]:
    m = json.loads((Path(out_dir) / MANIFEST).read_text())
    return sorted(m["done"])


def write_summary(out_dir: str | Path, summary: dict[str, Any]) -> Path:
    path = Path(out_dir) / SUMMARY
    atomic_write_json(path, summary)
    return path
