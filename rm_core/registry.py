"""Reward-model registry: versioned directories, a manifest each, a CURRENT pointer.

Layout::

    registry/
      CURRENT                  text: the served version's name (replaced by atomic rename)
      v0001/manifest.json      written last inside the staging dir; lists every file's sha256
      v0001/adapter/...        PEFT adapter (safetensors) incl. the scalar head
      .staging-*/              a publish in progress (never served; removed by the next publish)

Publishing builds the version in a staging directory, writes the manifest, fsyncs, renames the
directory into place, and only then switches CURRENT. A SIGKILL at any point leaves either the
old CURRENT or the new, complete version; a half-written version is never served. Loading checks
every file against the manifest's sha256, so a corrupt file is refused with a reason instead of
serving garbage. Paths are confined to the registry root (version names are validated).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from salmon.atomic import atomic_write_json, atomic_write_text, file_sha256, fsync_dir
from salmon.errors import UserError

VERSION_RE = re.compile(r"^v\d{4,}$")
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
# The principle-following RM that ships with the package for the embedded base, a registry of its own
# (rebuilt by `salmon rm-pretrain --ship`); `scorer: auto` serves it when no registry version exists.
SHIPPED_REGISTRY = Path(__file__).resolve().parent / "shipped"
SHIPPED_PREFIX = "shipped:"


class RegistryError(UserError):
    """A registry or version that cannot be used; the message says why."""


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    version: str
    kind: str = Field(default="sequence_classifier", description="What the version holds.")
    base_model: str = Field(description="Model source of the backbone ('embedded' or a local path).")
    adapter: str | None = Field(default="adapter", description="PEFT adapter dir inside the version.")
    reward_mean: float = 0.0
    reward_std: float = 1.0
    prompt_format_version: str
    data_hash: str | None = None
    parent_version: str | None = None
    eval_metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)
    files: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256")


class Registry:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    # -- reading ------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and VERSION_RE.match(p.name) and (p / MANIFEST).is_file())

    def current(self) -> str | None:
        try:
            name = (self.root / CURRENT).read_text().strip()
        except FileNotFoundError:
            return None
        return name or None

    def path(self, version: str) -> Path:
        if not VERSION_RE.match(version or ""):
            raise RegistryError(f"{version!r} is not a version name (expected v0001, v0002, …)")
        p = (self.root / version).resolve()
        if p.parent != self.root:
            raise RegistryError(f"version {version!r} resolves outside the registry {self.root}")
        return p

    def manifest(self, version: str, verify: bool = True) -> Manifest:
        vdir = self.path(version)
        mpath = vdir / MANIFEST
        if not mpath.is_file():
            raise RegistryError(f"version {version} has no {MANIFEST} in {vdir} (missing or half-published)")
        try:
            m = Manifest.model_validate_json(mpath.read_bytes())
        except ValidationError as e:
            raise RegistryError(f"{mpath}: invalid manifest: {e.errors()[0]['msg']}") from None
        if m.adapter is not None and vdir not in (vdir / m.adapter).resolve().parents:
            raise RegistryError(f"{mpath}: adapter {m.adapter!r} points outside the version directory")
        if verify:
            verify_files(vdir, m.files, f"version {version}")
        return m

    # -- writing ------------------------------------------------------------------------------
    def next_version(self) -> str:
        existing = [int(v[1:]) for v in self.versions()]
        staged = [int(p.name.split("-")[1][1:]) for p in self.root.glob(".staging-v*-*")
                  if p.name.split("-")[1][1:].isdigit()] if self.root.is_dir() else []
        return f"v{max(existing + staged + [0]) + 1:04d}"

    def publish(self, build_dir: str | os.PathLike, manifest: dict[str, Any], make_current: bool = True,
                version: str | None = None) -> str:
        """Copy ``build_dir`` in as a new version with ``manifest``; switch CURRENT. Returns the version."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean_staging()
        version = version or self.next_version()
        final = self.path(version)
        if final.exists():
            raise RegistryError(f"version {version} already exists in {self.root}")
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=self.root))
        try:
            shutil.copytree(build_dir, staging, dirs_exist_ok=True)
            files = {}
            for f in sorted(staging.rglob("*")):
                if f.is_file() and f.name != MANIFEST:
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                    files[str(f.relative_to(staging))] = file_sha256(f)
            m = Manifest.model_validate({**manifest, "version": version, "files": files})
            atomic_write_json(staging / MANIFEST, m.model_dump(mode="json"))
            for d in [staging, *[p for p in staging.rglob("*") if p.is_dir()]]:
                fsync_dir(d)
            os.rename(staging, final)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if make_current:
            self.set_current(version)
        return version

    def set_current(self, version: str) -> None:
        self.manifest(version, verify=False)
        for p in self.root.glob(f".{CURRENT}.*.tmp"):  # a switch killed mid-write left its temp file
            p.unlink(missing_ok=True)
        atomic_write_text(self.root / CURRENT, version + "\n")

    def _clean_staging(self) -> None:
        """Remove what a killed publish left: staging dirs and temp files of the CURRENT pointer."""
        for p in self.root.glob(".staging-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(f".{CURRENT}.*.tmp"):
            p.unlink(missing_ok=True)


def verify_files(root: Path, files: dict[str, str], what: str) -> None:
    """Check a manifest's ``files`` (relative path -> sha256) under ``root``: each inside it, present
    and unchanged, and no pickle-format file anywhere under it; else a RegistryError naming ``what``."""
    root = root.resolve()
    for rel, digest in files.items():
        f = (root / rel).resolve()
        if root not in f.parents:
            raise RegistryError(f"{what}: file {rel!r} in {MANIFEST} points outside the version directory {root}")
        if not f.is_file():
            raise RegistryError(f"{what}: file {rel} listed in the manifest is missing")
        if file_sha256(f) != digest:
            raise RegistryError(f"{what}: file {rel} is corrupt (sha256 differs from the manifest)")
    for f in root.rglob("*"):
        if f.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle"}:
            raise RegistryError(f"{what}: {f.name} is a pickle-format file; salmon loads safetensors only")


# -- contrast adapters (`salmon contrast-tune`): a LoRA for the contrastive scorer's LM ------------
CONTRAST_ADAPTER_KIND = "contrast-adapter"
CONTRAST_ADAPTER_DIR = "adapter"


def verified_contrast_adapter(root: str | os.PathLike, base_model: str) -> tuple[Path, str]:
    """(the adapter directory, a short tag) of a `salmon contrast-tune` output, after checking that its
    manifest is for ``base_model`` and its files (:func:`verify_files`); else a RegistryError."""
    import json

    root = Path(root)
    path = root / MANIFEST
    what = f"contrast adapter {root}"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RegistryError(f"{what}: cannot read {MANIFEST} ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != CONTRAST_ADAPTER_KIND:
        raise RegistryError(f"{what}: {MANIFEST} is not a {CONTRAST_ADAPTER_KIND!r} manifest")
    if manifest.get("base_model") != base_model:
        raise RegistryError(f"{what} was trained on {manifest.get('base_model')!r}, "
                            f"not on the scorer's model {base_model!r}")
    if not manifest.get("files"):
        raise RegistryError(f"{what}: the manifest lists no files")
    verify_files(root, manifest["files"], what)
    return root / CONTRAST_ADAPTER_DIR, "adapter-" + file_sha256(path)[:8]


def shipped_manifest(base_model: str) -> Manifest | None:
    """The shipped RM's manifest when one ships for ``base_model``, else None (files not verified here)."""
    reg = Registry(SHIPPED_REGISTRY)
    version = reg.current()
    if not version:
        return None
    try:
        manifest = reg.manifest(version, verify=False)
    except RegistryError:
        return None
    return manifest if manifest.base_model == base_model else None


def shipped_version(base_model: str) -> str | None:
    """The shipped RM's version when it exists for ``base_model`` (its manifest names the base), else None."""
    manifest = shipped_manifest(base_model)
    return manifest.version if manifest else None


def shipped_one_pass_version(base_model: str) -> str | None:
    """The shipped RM's version when it is a one-pass reward model (a head to fine-tune) for
    ``base_model``; None when none ships or the shipped one is a contrast adapter."""
    manifest = shipped_manifest(base_model)
    return manifest.version if manifest and manifest.kind != CONTRAST_ADAPTER_KIND else None


def ship(build_dir: Path, manifest: dict[str, Any], target: Path | None = None) -> Path:
    """Make ``build_dir`` (with ``manifest``) the RM shipped with the package, as ``target``/v0001.

    The new tree is published into a staging registry beside ``target`` and swapped in by renames, so
    a crash leaves either the old shipped RM or the new one, never a mix; the result is verified
    against its manifest. ``manifest`` carries what the version's manifest should say (its version and
    file list are made here).
    """
    target = Path(target or SHIPPED_REGISTRY)
    manifest = {k: v for k, v in manifest.items() if k not in {"version", "files", "training_data"}}
    staging = target.with_name(f".{target.name}-new")
    shutil.rmtree(staging, ignore_errors=True)
    Registry(staging).publish(build_dir, manifest, version="v0001")
    old = target.with_name(f".{target.name}-old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    Registry(target).manifest("v0001", verify=True)
    return target
