"""Peak resident memory of whole `edgepack build --target rpi` runs in which the fallbacks run.

Issue 10's goal: a ConvNeXt-T-style model (about 28M parameters) builds in at most 2 GB and a
ViT-B/16-style one (about 86M) in at most 4 GB, with the ONNX and the TFLite accuracy-aware
fallback both running. The models are defined here (no torchvision), seeded random weights
(memory does not depend on training), written as a model file plus safetensors in a temporary
directory with synthetic 224x224 calibration and evaluation images (no download). The budgets
are made unreachable on purpose (`max_accuracy_drop=0`, `min_sqnr_db=60`) so both fallbacks try
every candidate: the worst case for memory. The manifest is checked that they ran.

Measurement: the build is a subprocess (the venv's `edgepack build ...`); its process tree
(the build, the forked TFLite children, the conversion and latency subprocesses) is polled from
/proc every 0.25 s. Per sample: the sum of RSS over the live tree (counts copy-on-write pages a
forked child shares with its parent twice: an upper bound), the sum of PSS (shared pages split:
what the tree really holds), and each process's VmHWM (its own peak, which polling cannot miss).
A third figure counts each page the tree maps once: the build's RSS plus its descendants' private
pages (USS; what a forked child shares copy-on-write, and the libraries, are the build's own pages
too). PSS undercounts a little here (library pages are split with unrelated processes on this
shared machine). The goal is judged on the largest of the PSS sum, the counted-once figure and
the largest single VmHWM (a peak polling may miss); the RSS sum (an overcount) is recorded beside. Each peak is attributed to the build's last progress line (the
stage then running).

    .venv/bin/python bench/build_memory.py                        # both models, ~30-60 min on 2 cores
    .venv/bin/python bench/build_memory.py --models convnext_t
Writes bench/results/build_memory.json (merged per model).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, save  # noqa: E402

GOALS_MB = {"convnext_t": 2048, "vit_b16": 4096}
POLL_S = 0.25

# Written to the temporary directory as the model file the build loads (`models.py:NAME`).
MODELS = '''
import torch
from torch import nn
from torch.nn import functional as F


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (ConvNeXt's channels_first norm)."""
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6 * 1e5))  # layer scale (trained-like size)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), num_classes=1000):
        super().__init__()
        self.downsample = nn.ModuleList([nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))])
        for i in range(3):
            self.downsample.append(nn.Sequential(LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], 2, 2)))
        self.stages = nn.ModuleList([nn.Sequential(*[ConvNeXtBlock(d) for _ in range(n)]) for d, n in zip(dims, depths)])
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        for down, stage in zip(self.downsample, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean((2, 3))))


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, img=224, patch=16, dim=768, depth=12, heads=12, num_classes=1000):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def convnext_t():
    return ConvNeXt()


def vit_b16():
    return ViT()
'''


def make_inputs(work: Path, name: str, n_calib: int, n_eval: int) -> dict:
    """models.py, NAME.safetensors, calib.npz and eval.npz (labels: the float model's argmax, so
    the fp32 top-1 is 100% and the int8 drop is its disagreement) in `work`."""
    import numpy as np
    import torch
    from safetensors.torch import save_file
    (work / "models.py").write_text(MODELS)
    scope: dict = {}
    exec(compile(MODELS, str(work / "models.py"), "exec"), scope)
    torch.manual_seed(0)
    model = scope[name]().eval()
    params = sum(p.numel() for p in model.parameters())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / f"{name}.safetensors"))
    rng = np.random.default_rng(0)

    def images(n):  # smooth random images (low-pass noise), roughly ImageNet-normalised
        low = torch.from_numpy(rng.normal(0, 1, (n, 3, 14, 14)).astype(np.float32))
        x = torch.nn.functional.interpolate(low, size=(224, 224), mode="bicubic", align_corners=False)
        return (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(n))).numpy()
    calib, ev = images(n_calib), images(n_eval)
    with torch.no_grad():
        y = np.concatenate([model(torch.from_numpy(ev[i:i + 4])).argmax(1).numpy() for i in range(0, n_eval, 4)])
    np.savez(work / "calib.npz", x=calib)
    np.savez(work / "eval.npz", x=ev, y=y.astype(np.int64))
    del model
    return {"params": params, "calib_samples": n_calib, "eval_samples": n_eval}


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(root: int) -> list[int]:
    kids, out, todo = _children_map(), [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _proc(pid: int) -> dict | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        pss = uss = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                uss += int(line.split()[1])
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return None
    kb = {ln.split(":")[0]: int(ln.split()[1]) for ln in status.splitlines() if ln.startswith(("VmRSS", "VmHWM"))}
    if "VmRSS" not in kb:  # a zombie
        return None
    try:  # a pid is reused within a long build on a busy machine (pid_max 32768): (pid, start) names a process
        start = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        start = 0
    return {"rss": kb["VmRSS"], "hwm": kb.get("VmHWM", 0), "pss": pss, "uss": uss, "cmd": cmd, "start": start}


def run_build(cmd: list[str], env: dict, log) -> dict:
    """Run the build, poll its process tree, return the peaks and the timeline."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[tuple[float, str]] = []
    out: list[str] = []

    def read_err():
        for line in proc.stderr:
            lines.append((time.monotonic() - t0, line.rstrip()))
            log.write(line)
            log.flush()
    threading.Thread(target=read_err, daemon=True).start()
    threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True).start()
    samples, hwm, peak = [], {}, {"rss_sum_mb": 0.0}
    while proc.poll() is None:
        t = time.monotonic() - t0
        procs = {p: i for p in _tree(proc.pid) if (i := _proc(p))}
        for p, i in procs.items():
            if i["hwm"] > hwm.get((p, i["start"]), {"hwm": 0})["hwm"]:
                hwm[(p, i["start"])] = {"hwm": i["hwm"], "cmd": i["cmd"], "stage": _stage(lines, t)}
        rss, pss = sum(i["rss"] for i in procs.values()) / 1024, sum(i["pss"] for i in procs.values()) / 1024
        # The root's RSS plus its descendants' private pages: each page the tree maps counted once
        # (a forked child's copy-on-write pages and the libraries are the root's too).
        once = (procs[proc.pid]["rss"] if proc.pid in procs else 0) / 1024 + \
            sum(i["uss"] for p, i in procs.items() if p != proc.pid) / 1024
        root = (procs[proc.pid]["rss"] if proc.pid in procs else 0) / 1024
        samples.append([round(t, 2), round(rss), round(pss), round(once), len(procs), round(root)])
        if rss > peak["rss_sum_mb"]:
            peak = {"rss_sum_mb": round(rss), "pss_sum_mb": round(pss), "root_rss_plus_children_uss_mb": round(once),
                    "t_s": round(t, 1), "stage": _stage(lines, t),
                    "processes": sorted(({"pid": p, "rss_mb": round(i["rss"] / 1024), "pss_mb": round(i["pss"] / 1024),
                                          "uss_mb": round(i["uss"] / 1024), "cmd": i["cmd"]}
                                         for p, i in procs.items()), key=lambda d: -d["rss_mb"])}
        time.sleep(POLL_S)
    proc.wait()
    time.sleep(0.5)
    seconds = time.monotonic() - t0
    pss_peak = max(samples, key=lambda s: s[2]) if samples else [0, 0, 0, 0, 0, 0]
    once_peak = max(samples, key=lambda s: s[3]) if samples else [0, 0, 0, 0, 0, 0]
    top = sorted(({"pid": p, "vmhwm_mb": round(h["hwm"] / 1024), "cmd": h["cmd"], "stage_at_peak": h["stage"]}
                  for (p, _), h in hwm.items()), key=lambda d: -d["vmhwm_mb"])
    every = max(1, len(samples) // 200)
    return {"returncode": proc.returncode, "seconds": round(seconds, 1), "peak_rss_sum": peak,
            "peak_pss_sum_mb": pss_peak[2], "peak_pss_at_s": pss_peak[0], "peak_pss_stage": _stage(lines, pss_peak[0]),
            "peak_counted_once_mb": once_peak[3], "peak_counted_once_at_s": once_peak[0],
            "peak_counted_once_stage": _stage(lines, once_peak[0]),
            "largest_process_vmhwm": top[:6], "processes_seen": len(hwm),
            "timeline_cols": ["t_s", "rss_sum_mb", "pss_sum_mb", "root_rss_plus_children_uss_mb", "processes", "root_rss_mb"], "timeline": [x for k, x in enumerate(samples) if k % every == 0 or x in (pss_peak, once_peak)],
            "progress": [[round(t, 1), _plain(s)] for t, s in lines if s.strip()], "stdout": out[0] if out else ""}


def _stage(lines: list[tuple[float, str]], t: float) -> str:
    last = [s for ts, s in lines if ts <= t and s.strip()]
    return _plain(last[-1]) if last else "(start-up)"


def _plain(line: str) -> str:
    """A progress line as text (the CLI writes JSON events when stderr is not a terminal)."""
    try:
        e = json.loads(line)
    except ValueError:
        return line.strip()
    if not isinstance(e, dict):
        return line.strip()
    what = e.get("message") or e.get("task") or e.get("step") or ""
    return f"{e.get('event', '')}: {what}" if e.get("event") not in (None, "message") else str(what)


def what_ran(manifest: dict) -> dict:
    st = manifest.get("stages", {})
    q, tf = st.get("quantize", {}) or {}, st.get("tflite", {}) or {}
    fb, tfb = q.get("fallback") or {}, tf.get("fallback") or {}
    return {"stages": list(st), "onnx_fallback_ran": bool(fb.get("tried")),
            "onnx_fallback_tried": [t.get("float_nodes") for t in fb.get("tried", [])],
            "onnx_float_nodes": fb.get("float_nodes"),
            "tflite_fallback_ran": bool(tfb.get("tried")),
            "tflite_fallback_tried": [t.get("float_ops") for t in tfb.get("tried", [])],
            "tflite_float_ops": [o.get("module") or o.get("name") for o in tfb.get("float_ops", [])],
            "tflite_fallback_skipped": tf.get("fallback_skipped"),
            "tflite_sensitivity_skipped": (tf.get("sensitivity") or {}).get("skipped"),
            "tflite_skipped": tf.get("skipped")}


def bench_model(name: str, args, log) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"ep-buildmem-{name}-") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        info = make_inputs(work, name, args.calib, args.eval)
        info["inputs_seconds"] = round(time.monotonic() - t0, 1)
        cmd = [str(Path(sys.executable).parent / "edgepack"), "build", "--target", "rpi", "--model", f"{work}/models.py:{name}",
               "--weights", str(work / f"{name}.safetensors"), "--input-shape", "1x3x224x224",
               "--calib", str(work / "calib.npz"), "--eval", str(work / "eval.npz"), "--out", str(work / "dist"),
               "--no-cache", "--latency-runs", "5", "--budget", "max_accuracy_drop=0", "--budget", "min_sqnr_db=60",
               "--json", *args.extra]
        env = {**os.environ, "EDGEPACK_CACHE_DIR": str(work / "cache")}
        log.write(f"\n=== {name}: {' '.join(cmd)}\n")
        log.flush()
        load = list(os.getloadavg())
        r = run_build(cmd, env, log)
        r["loadavg_before"], r["loadavg_after"] = load, list(os.getloadavg())
        manifest = {}
        try:
            manifest = json.loads(r.pop("stdout"))["manifest"]
        except (ValueError, KeyError, TypeError):
            r["stdout_tail"] = r.get("stdout", "")[-2000:]
        ran = what_ran(manifest) if manifest else {}
        return judge({"model": name, **info, "command": " ".join(cmd).replace(str(work), "$TMP"), **r, "ran": ran})


def judge(res: dict) -> dict:
    """The figure the goal is judged on (see the module docstring) and whether it is met: only
    when the build finished (exit 0, or 1 for the unreachable quality budgets) and both fallbacks ran."""
    judged = max(res["peak_pss_sum_mb"], res.get("peak_counted_once_mb", 0),
                 *(p["vmhwm_mb"] for p in res["largest_process_vmhwm"][:1]), 0)
    ran = res.get("ran") or {}
    both = bool(ran.get("onnx_fallback_ran") and ran.get("tflite_fallback_ran"))
    goal = GOALS_MB[res["model"]]
    res.update(judged_peak_mb=judged, judged_on="max(peak PSS sum of the tree, peak of root RSS + descendants' private pages, largest process VmHWM)", goal_mb=goal,
               met=res["returncode"] in (0, 1) and both and judged <= goal,
               note=None if both else "a fallback did not run: the goal is not judged met")
    res["progress"] = [[t, _plain(s)] for t, s in res.get("progress", []) if s.strip()]
    res["phase_seconds"] = phases(res["progress"], res["seconds"])
    return res


# Progress lines that open each phase of a build (in order), for per-phase durations.
PHASES = [("load", "loading "), ("export", "exporting to ONNX"), ("quantize", "quantizing to int8"),
          ("onnx fallback", "int8 misses a quality budget"), ("tflite fp32", "converting to TFLite fp32"),
          ("tflite int8", "converting to TFLite int8"), ("tflite fallback", "int8 TFLite misses"),
          ("validate", "measuring latency"), ("write", "wrote ")]


def phases(progress: list, total: float) -> dict:
    starts = []
    for name, marker in PHASES:
        t = next((t for t, s in progress if marker in s), None)
        if t is not None:
            starts.append((name, t))
    ends = [t for _, t in starts[1:]] + [total]
    return {name: round(end - t, 1) for (name, t), end in zip(starts, ends)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(GOALS_MB), choices=list(GOALS_MB))
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--eval", type=int, default=24)
    ap.add_argument("--out", default="build_memory")
    ap.add_argument("extra", nargs="*", help="more build options after --")
    args = ap.parse_args()
    path = RESULTS / f"{args.out}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault("results", {})
    doc["method"] = __doc__.split("Measurement: ")[1].split("\n\n")[0].replace("\n", " ")
    with open(os.environ.get("BUILD_MEMORY_LOG", "/dev/null"), "a") as log:
        for name in args.models:
            res = bench_model(name, args, log)
            res["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            doc["results"][name] = res
            print(f"{name}: {res['params'] / 1e6:.1f}M params, judged peak {res['judged_peak_mb']} MB "
                  f"(goal {res['goal_mb']}; RSS sum {res['peak_rss_sum']['rss_sum_mb']}, PSS sum "
                  f"{res['peak_pss_sum_mb']}), {res['seconds']} s, exit {res['returncode']}, met={res['met']}; "
                  f"peak during: {res['peak_rss_sum'].get('stage')}", flush=True)
            doc["machine"] = machine()
            doc["results"] = {k: judge(v) for k, v in doc["results"].items()}
            save(args.out, doc)


if __name__ == "__main__":
    main()
