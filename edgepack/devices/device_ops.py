"""Operations run ON the device with the device's own Python (stdlib only).

The host sends this file's source with `python -c SOURCE OP JSON_ARGS` and reads one JSON
object back from stdout. It must not import edgepack or anything outside the standard
library: the device may have nothing else installed (that is what `probe` finds out).

Deployment layout under the device's workdir:
    <workdir>/<name>                             symlink -> .releases/<name>/<stamp> (swapped atomically)
    <workdir>/.releases/<name>/<stamp>/          one complete, verified deployment
    <workdir>/.releases/<name>/<stamp>.partial/  an upload in progress (or an interrupted one,
                                                 removed by a later deploy once 10 min untouched)
"""
import hashlib
import json
import os
import platform
import shutil
import sys
import time


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                return h.hexdigest()
            h.update(block)


def probe(args):
    workdir = os.path.expanduser(args["workdir"])
    if not os.path.isabs(workdir):  # relative to the home directory, as over SSH
        workdir = os.path.join(os.path.expanduser("~"), workdir)
    workdir = os.path.abspath(workdir)
    # Free space of the filesystem the workdir is (or will be) on.
    existing = workdir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    st = os.statvfs(existing)
    modules = {}
    for mod in args.get("modules", []):
        try:
            m = __import__(mod, fromlist=["_"])
            top = sys.modules.get(mod.split(".")[0])
            modules[mod] = {"ok": True, "version": getattr(m, "__version__", None)
                            or getattr(top, "__version__", None)}
        except BaseException as e:  # a broken wheel can raise anything, even SystemExit
            modules[mod] = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
    return {
        "cpuinfo": read_cpuinfo_text(args.get("cpuinfo_path", "/proc/cpuinfo")),
        "machine": platform.machine(), "system": platform.system(),
        "python": platform.python_version(), "executable": sys.executable,
        "workdir": workdir, "free_bytes": st.f_bavail * st.f_frsize,
        "writable": os.access(existing, os.W_OK), "cpu_count": os.cpu_count(),
        "modules": modules,
    }


# The /proc/cpuinfo lines the host parses (edgepack.cpuinfo.parse_cpuinfo): the model, the ARM
# core id and every core's flags. Identical flag lines are sent once (the host intersects them, so
# that changes nothing) and the rest is dropped: a 128-core server's file is ~200 KB.
CPUINFO_KEYS = ("processor", "flags", "Features", "model name", "Model", "Hardware", "cpu model",
                "Processor", "CPU implementer", "CPU part", "CPU architecture")


def read_cpuinfo_text(path):
    """The host-relevant lines of the device's cpuinfo, or None where there is none (macOS)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    kept, seen = [], set()
    for line in text.splitlines():
        key = line.partition(":")[0].strip()
        if key not in CPUINFO_KEYS:
            continue
        if key != "processor" and line in seen:
            continue
        seen.add(line)
        kept.append(line)
    return "\n".join(kept) + "\n"


STALE_PARTIAL_S = 600


def _last_change(path):
    newest = 0.0
    for top, _, names in os.walk(path):
        for p in [top] + [os.path.join(top, n) for n in names]:
            try:
                newest = max(newest, os.lstat(p).st_mtime)
            except OSError:
                pass
    return newest


def _current_release(root, name):
    link = os.path.join(root, name)
    return os.path.realpath(link) if os.path.isdir(link) else None


def prepare(args):
    """Make a staging dir; pre-fill it with files already deployed with the same sha256."""
    root, name, files = args["root"], args["name"], args["files"]
    releases = os.path.join(root, ".releases", name)
    os.makedirs(releases, exist_ok=True)
    # Leftovers of interrupted deploys of this build are useless: remove them. A partial that
    # changed recently may be a concurrent deploy still uploading (every write touches it).
    for entry in os.listdir(releases):
        full = os.path.join(releases, entry)
        if entry.endswith(".partial") and time.time() - _last_change(full) > STALE_PARTIAL_S:
            shutil.rmtree(full, ignore_errors=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-%d" % os.getpid()
    staging = os.path.join(releases, stamp + ".partial")
    os.makedirs(staging)
    current = _current_release(root, name)
    reused, missing = [], []
    for rel, digest in sorted(files.items()):
        dst = os.path.join(staging, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        old = os.path.join(current, rel) if current else None
        if old and os.path.isfile(old) and sha256(old) == digest:
            try:
                os.link(old, dst)  # same content: a hard link costs no space and no upload
            except OSError:
                shutil.copy2(old, dst)
            reused.append(rel)
        else:
            missing.append(rel)
    return {"staging": staging, "reused": reused, "missing": missing}


def commit(args):
    """Verify every staged file, then point <root>/<name> at the new release atomically."""
    root, name, staging, files = args["root"], args["name"], args["staging"], args["files"]
    bad = []
    for rel, digest in sorted(files.items()):
        path = os.path.join(staging, rel)
        if not os.path.isfile(path):
            bad.append({"file": rel, "problem": "missing"})
        elif sha256(path) != digest:
            bad.append({"file": rel, "problem": "sha256 mismatch", "expected": digest, "got": sha256(path)})
    if bad:
        shutil.rmtree(staging, ignore_errors=True)
        return {"ok": False, "bad": bad}
    final = staging[: -len(".partial")]
    os.rename(staging, final)
    link = os.path.join(root, name)
    if os.path.isdir(link) and not os.path.islink(link):
        # A plain directory (copied by hand or by an older tool): keep it aside, not lost.
        os.rename(link, os.path.join(root, ".releases", name, "manual-%d" % time.time()))
    tmp_link = os.path.join(root, ".%s.link-%d" % (name, os.getpid()))
    if os.path.lexists(tmp_link):
        os.remove(tmp_link)
    os.symlink(os.path.join(".releases", name, os.path.basename(final)), tmp_link)
    os.replace(tmp_link, link)  # rename(2) is atomic: readers see the old or the new release
    # Older complete releases of this build are no longer referenced.
    releases = os.path.join(root, ".releases", name)
    for entry in os.listdir(releases):
        full = os.path.join(releases, entry)
        if full != final and not entry.endswith(".partial") and not entry.startswith("manual-"):
            shutil.rmtree(full, ignore_errors=True)
    return {"ok": True, "path": link, "release": final, "verified": len(files)}


def abort(args):
    shutil.rmtree(args["staging"], ignore_errors=True)
    return {"ok": True}


EVAL_OUTPUTS = ".edgepack-eval"  # <workdir>/.edgepack-eval/: evaluation outputs until the host fetched them


def discard(args):
    """Remove one fetched evaluation output (nothing outside the outputs folder)."""
    path = os.path.abspath(args["path"])
    if os.path.basename(os.path.dirname(path)) != EVAL_OUTPUTS or not path.endswith(".npz"):
        return {"ok": False, "error": "refusing to remove %s: not an evaluation output" % path}
    if os.path.isfile(path):
        os.remove(path)
    return {"ok": True}


def main():
    op, args = sys.argv[1], json.loads(sys.argv[2])
    try:
        result = {"probe": probe, "prepare": prepare, "commit": commit, "abort": abort,
                  "discard": discard}[op](args)
    except OSError as e:
        result = {"ok": False, "error": "%s: %s" % (type(e).__name__, e), "errno": e.errno}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.exit(1)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
