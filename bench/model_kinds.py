"""The issue's table per model kind: built or not, metric fp32 -> int8 (ONNX and TFLite), worst
SQNR, int8 speed-up over fp32 (ONNX Runtime on this x86 machine), for --target x86 and rpi.

The six kinds (tests/fixtures/kinds: detector, image + token ids, stateful VAD as ONNX, opset-11
dynamic segmenter as ONNX, transformer encoder, regression) are trained once (cached by source).
Usage: .venv/bin/python bench/model_kinds.py [--out bench/results/model_kinds.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import save  # noqa: E402  (also puts tests/ on sys.path for the fixtures)
from fixtures.kinds import make  # noqa: E402

EDGEPACK = Path(sys.executable).with_name("edgepack")


def build(args: list[str], target: str, out: Path) -> tuple[int, dict | None, float]:
    extra = ["--format", "onnx"] if target == "rpi" and any(a.endswith(".onnx") for a in args) else []
    t0 = time.perf_counter()
    proc = subprocess.run([str(EDGEPACK), "build", "--target", target, *args, *extra, "--out", str(out), "--json",
                           "--latency-runs", "30"], capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    try:
        return proc.returncode, json.loads(proc.stdout)["manifest"], seconds
    except (json.JSONDecodeError, KeyError):
        return proc.returncode, {"error": proc.stderr[-1500:]}, seconds


def row(kind: str, target: str, code: int, m: dict, seconds: float) -> dict:
    if "artifacts" not in m:
        return {"kind": kind, "target": target, "exit": code, "built": False, "error": m.get("error")}
    arts = {a["path"]: a["metrics"] for a in m["artifacts"]}

    def quality(path):
        q = arts.get(path)
        return None if q is None else (q["metric"] if q.get("metric") is not None else q.get("accuracy"))
    lat = {p: (q.get("latency_ms") or {}).get("p50") for p, q in arts.items()}
    speed = lat["model.fp32.onnx"] / lat["model.int8.onnx"] if lat.get("model.int8.onnx") else None
    return {"kind": kind, "target": target, "exit": code, "built": True, "seconds": round(seconds, 1),
            "measure": "metric" if arts["model.fp32.onnx"].get("metric") is not None else "top-1 %",
            "fp32": quality("model.fp32.onnx"), "int8_onnx": quality("model.int8.onnx"),
            "int8_tflite": quality("model.int8.tflite"), "sqnr_onnx_db": arts["model.int8.onnx"].get("sqnr_db"),
            "sqnr_tflite_db": (arts.get("model.int8.tflite") or {}).get("sqnr_db"),
            "onnx_int8_speedup_x86": round(speed, 2) if speed else None, "samples": arts["model.int8.onnx"].get("samples"),
            "passed": m["passed"], "failed_budgets": [v["budget"] for v in m["verdicts"] if v["ok"] is False]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", nargs="+", default=["x86", "rpi"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgepack-kinds-") as tmp:
        kinds = make.make_all(Path(tmp) / "data")
        rows = []
        for target in args.targets:
            for name, info in kinds.items():
                code, m, s = build(info["args"], target, Path(tmp) / target / name)
                rows.append(row(name, target, code, m, s))
                print(json.dumps(rows[-1]), flush=True)
    print(f"wrote {save('model_kinds', {'rows': rows, 'command': '.venv/bin/python bench/model_kinds.py'})}")


if __name__ == "__main__":
    main()
