"""Where the compressed bytes of an int8 ONNX go: per initializer, raw bytes, deflate level 9 of
that initializer alone, distinct values, and the order-0 entropy of its elements (bits each).

    .venv/bin/python bench/cluster_bytes.py a.int8.onnx [b.int8.onnx ...]   # prints a table per file
Used by bench/compress_cluster.py (`bytes_by_kind` goes into its JSON)."""
from __future__ import annotations

import sys
import zlib
from collections import defaultdict

import numpy as np


def entropy_bits(values: np.ndarray) -> float:
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def initializer_table(path) -> list[dict]:
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(path))
    users = defaultdict(list)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            users[name].append((node.op_type, i))
    rows = []
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        raw = a.tobytes()
        kind = f"{a.dtype}"
        if a.dtype == np.int8 and a.ndim >= 2:
            kind = "int8 weight"
        elif a.dtype == np.int32:
            kind = "int32 bias"
        elif users[init.name] and users[init.name][0][0] in ("DequantizeLinear", "QuantizeLinear") and users[init.name][0][1] == 1:
            kind = "scale"
        elif users[init.name] and users[init.name][0][0] in ("DequantizeLinear", "QuantizeLinear") and users[init.name][0][1] == 2:
            kind = "zero point"
        elif a.dtype == np.float32:
            kind = "float"
        rows.append({"name": init.name, "kind": kind, "shape": list(a.shape), "raw": len(raw),
                     "deflate": len(zlib.compress(raw, 9)) - 6 if raw else 0,
                     "distinct": int(len(np.unique(a))) if a.size else 0,
                     "entropy_bits": round(entropy_bits(a.reshape(-1)), 3) if a.size else 0.0})
    return rows


def bytes_by_kind(path) -> dict:
    """{kind: {"tensors", "raw", "deflate"}} summed over the initializers of one int8 ONNX."""
    out: dict = {}
    for r in initializer_table(path):
        k = out.setdefault(r["kind"], {"tensors": 0, "raw": 0, "deflate": 0})
        k["tensors"] += 1
        k["raw"] += r["raw"]
        k["deflate"] += r["deflate"]
    return out


def main(paths):
    from pathlib import Path
    for p in paths:
        rows = initializer_table(p)
        print(f"== {p}: file {Path(p).stat().st_size:,} B, deflate {len(zlib.compress(Path(p).read_bytes(), 9)):,} B")
        for r in rows:
            print(f"{r['name'][:48]:48s} {r['kind']:12s} {str(r['shape']):18s} raw {r['raw']:>8,} "
                  f"defl {r['deflate']:>8,} ({8 * r['deflate'] / max(1, r['raw']):.2f} b/B) "
                  f"distinct {r['distinct']:>5} H {r['entropy_bits']:.2f}")
        for kind, k in bytes_by_kind(p).items():
            print(f"  {kind:12s} tensors {k['tensors']:4d} raw {k['raw']:>9,} deflate {k['deflate']:>9,}")


if __name__ == "__main__":
    main(sys.argv[1:])
