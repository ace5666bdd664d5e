"""A cache of stage results, keyed by content.

A key is the sha256 of what a stage's output depends on: the stage name, its config, the BYTES of its
input files, blobs (e.g. `hash_module(model)`), a dataset fingerprint and library versions. Names and
paths never enter a key: Olive keyed runs on model ids derived from names/paths and served one CLIP
model's cached result for another (microsoft/Olive#1936). Same content anywhere -> same key.

Layout under the root:
    entries/<key>/entry.json, entries/<key>/files/<name>   a complete entry (entry.json written last)
    tmp/put-<host>-<pid>-<token>/                         an entry being written, renamed into entries/
    tmp/del-<host>-<pid>-<token>/                         an entry being removed (renamed out first)
    locks/<key[:2]>.lock                                  256 lock stripes, never deleted
An entry appears and disappears by one rename, so a reader sees all of it or none of it, and a killed
process leaves only a tmp/ directory that the next put or clear removes.
"""
from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

from .version import __version__
from .errors import EdgepackError
from .hashing import sha256_bytes, sha256_file

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Bump when the key recipe or the entry layout changes (2: records hold the whole int8 sensitivity ranking).
CACHE_FORMAT = "edgepack-stage-cache/2"
DEFAULT_MAX_GB = 5.0
# Entries used this recently are never evicted: a build that just got a hit restores it next.
EVICT_GRACE_S = 60.0
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"


def default_root() -> Path:
    if env := os.environ.get("EDGEPACK_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "edgepack" / "stages"


def _max_bytes_from_env() -> int:
    raw = os.environ.get("EDGEPACK_CACHE_MAX_GB")
    if not raw:
        return int(DEFAULT_MAX_GB * 1e9)
    try:
        gb = float(raw)
        if gb < 0:
            raise ValueError
    except ValueError:
        raise EdgepackError(f"EDGEPACK_CACHE_MAX_GB={raw!r} is not a size in GB",
                            "set it to a number such as 5 or 0.5, or unset it for 5 GB") from None
    return int(gb * 1e9)


def library_versions(*dists: str) -> dict[str, str]:
    """Installed versions of the named distributions (for `StageCache.key(versions=...)`)."""
    from importlib.metadata import PackageNotFoundError, version
    found = {}
    for d in dists:
        try:
            found[d] = version(d)
        except PackageNotFoundError:
            found[d] = "absent"
    return found


def _json_default(obj):
    if isinstance(obj, os.PathLike):
        raise TypeError(f"cache key config holds a path ({obj}); a key never uses paths: pass the file "
                        "in files= so its bytes are hashed, or leave it out")
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"cache key config holds a {type(obj).__name__}, which has no canonical JSON form")


@dataclass
class CacheEntry:
    key: str
    files: dict[str, Path]  # stored name -> path inside the cache (the caller's own paths when disabled)
    record: dict = field(default_factory=dict)
    created: float = 0.0     # seconds since the epoch


class StageCache:
    def __init__(self, root: Path | None = None, enabled: bool = True, *, max_bytes: int | None = None,
                 evict_grace_s: float = EVICT_GRACE_S):
        self.root = Path(root) if root is not None else default_root()
        self.enabled = enabled
        self.max_bytes = max_bytes if max_bytes is not None else _max_bytes_from_env()
        self.evict_grace_s = evict_grace_s
        if self.root.exists() and not self.root.is_dir():
            raise EdgepackError(f"cache root {self.root} is a file, not a directory",
                                "remove it, or point EDGEPACK_CACHE_DIR at a directory")

    # ---- keys -------------------------------------------------------------------------------
    def key(self, stage: str, *, config: dict, files: list[Path] = (), blobs: list[bytes | str] = (),
            data: str | None = None, versions: dict[str, str] | None = None) -> str:
        file_hashes = []
        for p in files:
            p = Path(p)
            if not p.is_file():
                raise EdgepackError(f"cache key input {p} is not a file", "check the path the stage was given")
            file_hashes.append(sha256_file(p))  # the bytes only: the name and place do not matter
        doc = {"format": CACHE_FORMAT, "edgepack": __version__, "stage": stage, "config": config,
               "files": file_hashes, "blobs": [sha256_bytes(b) for b in blobs], "data": data,
               "versions": dict(versions or {})}
        return sha256_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":"), default=_json_default))

    # ---- paths and locks --------------------------------------------------------------------
    def _entry_dir(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise ValueError(f"not a cache key: {key!r} (expected 64 lowercase hex digits)")
        return self.root / "entries" / key

    def _lock(self, key: str, timeout: float = -1, name: str | None = None) -> FileLock:
        """The lock stripe of a key (or a named lock): held while an entry is installed or removed."""
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / "locks" / f"{name or key[:2]}.lock"), timeout=timeout)

    def _tmp(self, kind: str) -> Path:
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp / f"{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(6)}"

    def _discard(self, d: Path) -> None:
        """Remove a directory: renamed out of sight first, so it vanishes at once for readers."""
        trash = self._tmp("del")
        try:
            os.rename(d, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    # ---- reading ----------------------------------------------------------------------------
    def _load(self, d: Path) -> CacheEntry | str:
        """The entry in d when every file matches its stored sha256, else why not."""
        try:
            meta = json.loads((d / "entry.json").read_text())
            files = {}
            for name, want in meta["files"].items():
                if Path(name).name != name:
                    return f"stored file name {name!r} is not a plain name"
                p = d / "files" / name
                if p.stat().st_size != want["size"]:
                    return f"{name} is {p.stat().st_size} bytes, stored {want['size']}"
                if sha256_file(p) != want["sha256"]:
                    return f"{name} does not match its stored sha256"
                files[name] = p
            return CacheEntry(meta["key"], files, meta["record"], meta["created"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{type(e).__name__}: {e}"

    def get(self, key: str) -> CacheEntry | None:
        if not self.enabled:
            return None
        d = self._entry_dir(key)
        if not d.is_dir():
            return None
        entry = self._load(d)
        if isinstance(entry, CacheEntry):
            try:
                os.utime(d / "entry.json")  # last use, for least-recently-used eviction
            except OSError:
                pass
            return entry
        with self._lock(key):  # re-check under the lock: a concurrent put may have just replaced it
            again = self._load(d) if d.is_dir() else None
            if isinstance(again, str):
                log.warning("edgepack cache: entry %s is damaged (%s); removed", key[:12], again)
                self._discard(d)
        return again if isinstance(again, CacheEntry) else None

    # ---- writing ----------------------------------------------------------------------------
    def put(self, key: str, files: dict[str, Path], record: dict) -> CacheEntry:
        dest = self._entry_dir(key)
        for name, src in files.items():
            if not name or Path(name).name != name or name in (".", ".."):
                raise ValueError(f"cache file name {name!r} must be a plain file name")
            if not Path(src).is_file():
                raise EdgepackError(f"cannot cache {src}: not a file", "the stage should have written it")
        record_json = json.dumps(record, sort_keys=True, default=_json_default)
        if not self.enabled:
            return CacheEntry(key, {n: Path(p) for n, p in files.items()}, json.loads(record_json), time.time())
        self._sweep_tmp()
        staging = self._tmp("put")
        try:
            (staging / "files").mkdir(parents=True)
            stored = {}
            for name, src in files.items():
                shutil.copyfile(src, staging / "files" / name)
                p = staging / "files" / name  # hash the copy: what is stored is what is verified
                stored[name] = {"sha256": sha256_file(p), "size": p.stat().st_size}
            created = time.time()
            meta = {"format": CACHE_FORMAT, "key": key, "files": stored, "record": json.loads(record_json),
                    "created": created}
            with open(staging / "entry.json", "w") as f:  # last: an entry without it is incomplete
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            dest.parent.mkdir(parents=True, exist_ok=True)
            with self._lock(key):
                if dest.is_dir():
                    existing = self._load(dest)
                    if isinstance(existing, CacheEntry):  # another process won the race: keep theirs
                        return existing
                    log.warning("edgepack cache: replacing damaged entry %s (%s)", key[:12], existing)
                    self._discard(dest)
                os.rename(staging, dest)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        self._evict(keep=key)
        return CacheEntry(key, {n: dest / "files" / n for n in stored}, meta["record"], created)

    def restore(self, entry: CacheEntry, dest_dir: Path, names: dict[str, str] | None = None) -> dict[str, Path]:
        """Put the entry's files in dest_dir; names maps stored name -> file name there (and restricts
        the restore to those files). Hardlinks share bytes with the cache: replace a restored file,
        never modify it in place (a modified entry fails its sha256 check and is dropped)."""
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        wanted = names if names is not None else {n: n for n in entry.files}
        restored = {}
        for name, target in wanted.items():
            if name not in entry.files:
                raise KeyError(f"cache entry {entry.key[:12]} has no file {name!r} (it has {sorted(entry.files)})")
            src, dst = entry.files[name], dest_dir / target
            if dst.exists() and os.path.samefile(src, dst):
                restored[name] = dst
                continue
            part = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.part")
            try:
                os.link(src, part)
            except OSError:  # another filesystem, or links not allowed
                shutil.copyfile(src, part)
            os.replace(part, dst)
            restored[name] = dst
        return restored

    # ---- housekeeping -----------------------------------------------------------------------
    def _entries(self) -> list[tuple[str, Path, float, int]]:
        """(key, dir, last use, bytes) for every installed entry."""
        found = []
        try:
            dirs = list(os.scandir(self.root / "entries"))
        except FileNotFoundError:
            return found
        for d in dirs:
            if not _KEY_RE.match(d.name):
                continue
            try:
                used = os.stat(os.path.join(d.path, "entry.json")).st_mtime
            except OSError:
                used = 0.0  # incomplete: first to go
            size = sum(f.stat().st_size for f in Path(d.path).rglob("*") if f.is_file())
            found.append((d.name, Path(d.path), used, size))
        return found

    def _sweep_tmp(self) -> None:
        """Remove tmp/ directories left by killed processes (this host, pid gone; or a day old)."""
        try:
            dirs = list(os.scandir(self.root / "tmp"))
        except FileNotFoundError:
            return
        for d in dirs:
            parts = d.name.rsplit("-", 2)
            try:
                pid, host = int(parts[1]), parts[0].split("-", 1)[1]
            except (IndexError, ValueError):
                continue
            stale = time.time() - d.stat().st_mtime > 86400
            if host == _HOST and pid != os.getpid():
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    stale = True
                except PermissionError:
                    pass  # alive, another user's
            if stale:
                shutil.rmtree(d.path, ignore_errors=True)

    def _evict(self, keep: str | None = None) -> None:
        try:  # one evictor at a time; a busy lock means another process is doing it now
            lock = self._lock("", timeout=0, name="evict")
            lock.acquire()
        except Timeout:
            return
        try:
            entries = sorted(self._entries(), key=lambda e: e[2])
            total = sum(e[3] for e in entries)
            now = time.time()
            for key, d, used, size in entries:
                if total <= self.max_bytes:
                    break
                if key == keep or now - used < self.evict_grace_s:
                    continue
                with self._lock(key):
                    self._discard(d)
                total -= size
                log.info("edgepack cache: evicted %s (%d bytes)", key[:12], size)
        finally:
            lock.release()

    def clear(self) -> dict:
        n = b = 0
        for key, d, _, size in self._entries():
            with self._lock(key):
                self._discard(d)
            n, b = n + 1, b + size
        self._sweep_tmp()
        return {"entries": n, "bytes": b}

    def info(self) -> dict:
        entries = self._entries()
        return {"root": str(self.root), "entries": len(entries), "bytes": sum(e[3] for e in entries),
                "max_bytes": self.max_bytes, "enabled": self.enabled}


# ---- PyTorch models ---------------------------------------------------------------------------
_source_hashes: dict[tuple, str] = {}


def _module_source_hash(modname: str) -> str:
    """sha256 of a Python module's source, or "" when it has none (exec'd code, C extensions)."""
    mod = sys.modules.get(modname)
    path = getattr(mod, "__file__", None)
    try:
        st = os.stat(path) if path else None
    except OSError:
        st = None
    memo = (modname, path, st.st_mtime_ns if st else None, st.st_size if st else None)
    if memo not in _source_hashes:
        try:
            _source_hashes[memo] = sha256_bytes(inspect.getsource(mod))
        except (TypeError, OSError):
            _source_hashes[memo] = ""
    return _source_hashes[memo]


def hash_module(module: "torch.nn.Module") -> str:
    """Content hash of a model: its architecture (repr, class names, the source of the classes'
    modules, train/eval flags) and every parameter and buffer (name, dtype, shape, bytes)."""
    import torch
    h = hashlib.sha256()

    def feed(part: bytes | str) -> None:  # length-prefixed, so parts cannot run into each other
        b = part.encode() if isinstance(part, str) else part
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    feed(CACHE_FORMAT)
    feed(str(module))
    classes = {c for m in module.modules() for c in type(m).__mro__ if c is not object}
    for qual, modname in sorted({(f"{c.__module__}.{c.__qualname__}", c.__module__) for c in classes}):
        feed(qual)
        feed(_module_source_hash(modname))
    feed("".join("1" if m.training else "0" for m in module.modules()))
    tensors = itertools.chain(module.named_parameters(remove_duplicate=False),
                              module.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        feed(f"{name}|{t.dtype}|{tuple(t.shape)}")
        raw = t.reshape(-1).view(torch.uint8).numpy()  # bytes of any dtype (bfloat16 too), no copy
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()
