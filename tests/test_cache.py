"""StageCache: content keys, verified hits, crash-safe and concurrent puts, eviction, CLI."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_cli
from edgepack.cache import StageCache, hash_module

ROOT = Path(__file__).resolve().parents[1]


def _write(p: Path, data: bytes) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def _visible(root: Path) -> list[str]:
    d = root / "entries"
    return sorted(os.listdir(d)) if d.exists() else []


def test_key_is_content_not_path(tmp_path):
    cache = StageCache(tmp_path / "cache")
    blob = os.urandom(4096)
    a = _write(tmp_path / "one" / "model.onnx", blob)
    b = _write(tmp_path / "elsewhere" / "renamed.bin", blob)
    cfg = {"opset": 17, "per_channel": True}
    ka = cache.key("quantize", config=cfg, files=[a], data="fp1", versions={"onnx": "1.23"})
    assert ka == cache.key("quantize", config=dict(reversed(cfg.items())), files=[b], data="fp1",
                           versions={"onnx": "1.23"})
    changed = bytearray(blob)
    changed[100] ^= 1
    _write(b, bytes(changed))
    others = {
        cache.key("quantize", config=cfg, files=[b], data="fp1", versions={"onnx": "1.23"}),  # one byte
        cache.key("quantize", config=cfg | {"opset": 18}, files=[a], data="fp1", versions={"onnx": "1.23"}),
        cache.key("export", config=cfg, files=[a], data="fp1", versions={"onnx": "1.23"}),
        cache.key("quantize", config=cfg, files=[a], data="fp2", versions={"onnx": "1.23"}),
        cache.key("quantize", config=cfg, files=[a], data="fp1", versions={"onnx": "1.24"}),
        cache.key("quantize", config=cfg, files=[a], blobs=[b"x"], data="fp1", versions={"onnx": "1.23"}),
    }
    assert len(others) == 6 and ka not in others
    with pytest.raises(TypeError, match="path"):
        cache.key("quantize", config={"model": a}, files=[a])


def test_put_get_restore_roundtrip(tmp_path):
    cache = StageCache(tmp_path / "cache")
    src = {"model.onnx": _write(tmp_path / "work" / "m.onnx", os.urandom(200_000)),
           "calib.json": _write(tmp_path / "work" / "c.json", b'{"n": 64}')}
    key = cache.key("export", config={"opset": 17}, files=[src["model.onnx"]])
    assert cache.get(key) is None
    put = cache.put(key, src, {"nodes": 42, "seconds": 1.5})
    assert all(p.is_relative_to(tmp_path / "cache") for p in put.files.values())
    hit = cache.get(key)
    assert hit is not None and hit.key == key and hit.record == {"nodes": 42, "seconds": 1.5}
    assert hit.created == pytest.approx(put.created)
    for name, p in src.items():
        assert hit.files[name].read_bytes() == p.read_bytes()
    out = cache.restore(hit, tmp_path / "out", names={"model.onnx": "model_fp32.onnx"})
    assert list(out) == ["model.onnx"] and out["model.onnx"] == tmp_path / "out" / "model_fp32.onnx"
    assert out["model.onnx"].read_bytes() == src["model.onnx"].read_bytes()
    assert os.path.samefile(out["model.onnx"], hit.files["model.onnx"])  # same filesystem: a hardlink
    again = cache.restore(hit, tmp_path / "out")  # restoring over existing files works
    assert sorted(p.name for p in again.values()) == ["calib.json", "model.onnx"]
    info = cache.info()
    assert info["entries"] == 1 and info["bytes"] >= 200_000 and info["root"] == str(tmp_path / "cache")


def test_disabled_cache_never_hits_and_writes_nothing(tmp_path):
    root = tmp_path / "cache"
    on = StageCache(root)
    f = _write(tmp_path / "a.bin", b"abc")
    key = on.key("load", config={}, files=[f])
    on.put(key, {"a.bin": f}, {})
    off = StageCache(root, enabled=False)
    assert off.get(key) is None
    entry = off.put(on.key("load", config={"x": 1}), {"a.bin": f}, {"r": 1})
    assert entry.files["a.bin"] == f and entry.record == {"r": 1}
    assert _visible(root) == [key]


def test_damaged_entry_is_a_miss_and_removed(tmp_path, caplog):
    cache = StageCache(tmp_path / "cache")
    f = _write(tmp_path / "m.bin", os.urandom(10_000))
    key = cache.key("prune", config={"ratio": 0.5}, files=[f])
    entry = cache.put(key, {"m.bin": f}, {"ok": True})
    with open(entry.files["m.bin"], "r+b") as fh:
        fh.truncate(5000)
    with caplog.at_level(logging.WARNING, logger="edgepack.cache"):
        assert cache.get(key) is None
    assert "damaged" in caplog.text and _visible(tmp_path / "cache") == []
    # same size, one byte flipped: the sha256 check catches it too
    entry = cache.put(key, {"m.bin": f}, {"ok": True})
    data = bytearray(entry.files["m.bin"].read_bytes())
    data[0] ^= 0xFF
    entry.files["m.bin"].write_bytes(bytes(data))
    assert cache.get(key) is None and _visible(tmp_path / "cache") == []
    assert cache.put(key, {"m.bin": f}, {"ok": True}) and cache.get(key) is not None


CHILD = textwrap.dedent('''
    import json, shutil, sys, time
    from pathlib import Path
    import edgepack.cache as ec
    root, src, key, mode, flag = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5])
    cache = ec.StageCache(root)
    if mode == "hang":  # copy the file, then say so and hang until killed
        real = shutil.copyfile
        def copy_then_hang(a, b):
            real(a, b)
            flag.write_text("copied")
            time.sleep(600)
        ec.shutil.copyfile = copy_then_hang
    else:  # both processes reach the install step before either takes the lock
        real_lock = ec.StageCache._lock
        def lock_after_both_ready(self, k, timeout=-1, name=None):
            if name is None:
                (flag.parent / f"ready-{mode}").write_text("")
                while len(list(flag.parent.glob("ready-*"))) < 2:
                    time.sleep(0.01)
            return real_lock(self, k, timeout, name)
        ec.StageCache._lock = lock_after_both_ready
    entry = cache.put(key, {"model.bin": src}, {"by": mode})
    print(json.dumps({"path": str(entry.files["model.bin"]), "record": entry.record}))
''')


def _child(tmp_path, root, src, key, mode) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen([sys.executable, str(script), str(root), str(src), key, mode,
                             str(tmp_path / "sync" / "flag")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)


def test_killed_put_leaves_no_entry(tmp_path):
    root = tmp_path / "cache"
    (tmp_path / "sync").mkdir()
    src = _write(tmp_path / "m.bin", os.urandom(1_000_000))
    cache = StageCache(root)
    key = cache.key("export", config={}, files=[src])
    proc = _child(tmp_path, root, src, key, "hang")
    deadline = time.time() + 60
    while not (tmp_path / "sync" / "flag").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert cache.get(key) is None and _visible(root) == []
    leftovers = os.listdir(root / "tmp")
    assert len(leftovers) == 1 and leftovers[0].startswith("put-")  # the half-written copy, out of sight
    entry = cache.put(key, {"model.bin": src}, {"second": True})
    assert cache.get(key).record == {"second": True}
    assert entry.files["model.bin"].read_bytes() == src.read_bytes()
    assert os.listdir(root / "tmp") == []  # the dead process's copy was swept


def test_concurrent_puts_of_one_key_both_succeed(tmp_path):
    root = tmp_path / "cache"
    (tmp_path / "sync").mkdir()
    src = _write(tmp_path / "m.bin", os.urandom(2_000_000))
    key = StageCache(root).key("quantize", config={}, files=[src])
    procs = [_child(tmp_path, root, src, key, m) for m in ("a", "b")]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        results.append(json.loads(stdout))
    assert results[0]["path"] == results[1]["path"]  # both got the one installed entry
    assert results[0]["record"] == results[1]["record"]  # the winner's record, for both
    hit = StageCache(root).get(key)
    assert hit is not None and hit.files["model.bin"].read_bytes() == src.read_bytes()
    assert _visible(root) == [key] and os.listdir(root / "tmp") == []  # the loser's copy discarded


def test_eviction_keeps_size_bound_least_recently_used_first(tmp_path):
    cache = StageCache(tmp_path / "cache", max_bytes=2_500_000, evict_grace_s=0)
    keys = []
    for i in range(5):
        f = _write(tmp_path / f"f{i}.bin", os.urandom(1_000_000))
        keys.append(cache.key("export", config={"i": i}, files=[f]))
        if i == 2:
            time.sleep(0.02)
            assert cache.get(keys[0]) is not None  # a hit makes entry 0 the most recently used
        time.sleep(0.02)
        cache.put(keys[-1], {"m.bin": f}, {"i": i})
        assert cache.info()["bytes"] <= 2_500_000
    # after entry 2: 0 was used last, so 1 went; then 2 and 0 went as 3 and 4 arrived, oldest first
    assert cache.get(keys[1]) is None
    assert [k for k in keys if cache.get(k)] == keys[3:]
    assert cache.info()["entries"] == 2


def test_eviction_spares_recently_used_entries(tmp_path):
    cache = StageCache(tmp_path / "cache", max_bytes=1_500_000)  # default grace: a minute
    for i in range(2):
        f = _write(tmp_path / f"f{i}.bin", os.urandom(1_000_000))
        cache.put(cache.key("export", config={"i": i}, files=[f]), {"m.bin": f}, {})
    assert cache.info()["entries"] == 2  # over the bound for now, rather than drop a just-made entry


def test_cli_info_and_clear(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("EDGEPACK_CACHE_DIR", str(root))
    cache = StageCache()
    assert cache.root == root
    for i in range(3):
        f = _write(tmp_path / f"f{i}.bin", os.urandom(1000))
        cache.put(cache.key("load", config={"i": i}, files=[f]), {"m.bin": f}, {})
    code, stdout, err = run_cli("cache", "info", "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["entries"] == 3 and info["bytes"] >= 3000 and info["root"] == str(root)
    code, stdout, err = run_cli("cache", "clear", "--json")
    assert code == 0, err
    assert json.loads(stdout)["entries"] == 3
    assert _visible(root) == [] and StageCache().info()["entries"] == 0
    code, stdout, _ = run_cli("cache", "info")
    assert code == 0 and "entries: 0" in stdout


def test_bad_max_gb_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPACK_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("EDGEPACK_CACHE_MAX_GB", "lots")
    code, _, err = run_cli("cache", "info")
    assert code == 2 and "EDGEPACK_CACHE_MAX_GB" in err


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


class TinyNetWider(TinyNet):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)


def test_hash_module_follows_weights_not_instances(tmp_path):
    torch.manual_seed(0)
    a = TinyNet().eval()
    torch.manual_seed(1)
    b = TinyNet().eval()
    assert hash_module(a) != hash_module(b)  # different weights
    # the same weights saved to two places and loaded into fresh instances: one key
    for name in ("x/w.pt", "y/other.pt"):
        (tmp_path / name).parent.mkdir(parents=True)
        torch.save(a.state_dict(), tmp_path / name)
    c, d = TinyNet().eval(), TinyNet().eval()
    c.load_state_dict(torch.load(tmp_path / "x/w.pt"))
    d.load_state_dict(torch.load(tmp_path / "y/other.pt"))
    assert hash_module(c) == hash_module(d) == hash_module(a)
    with torch.no_grad():
        d.fc.bias[0] += 1e-6  # one parameter nudged
    assert hash_module(d) != hash_module(a)
    d.load_state_dict(a.state_dict())
    d.bn.running_mean[0] += 1.0  # a buffer counts too
    assert hash_module(d) != hash_module(a)
    torch.manual_seed(0)
    e = TinyNet().train()
    assert hash_module(e) != hash_module(a)  # same weights, train mode: exports differently
    assert hash_module(TinyNetWider()) != hash_module(TinyNet())
    half = TinyNet().eval()
    half.load_state_dict(a.state_dict())
    assert hash_module(half.to(torch.bfloat16)) != hash_module(a)  # dtype is part of the content
