"""Where int8 time goes in ONNX Runtime: per-op-type and per-convolution times from its profiler,
and what in the optimized graph stayed float or kept Q/DQ nodes.

Sessions of all variants run interleaved (one inference of each in turn) with profiling on; every
node's time is the median over the runs, so a burst of machine load hits all variants alike.
The graph ONNX Runtime actually executes (after its QDQ fusions and layout transforms) is saved
and walked: float compute nodes, surviving QuantizeLinear/DequantizeLinear and what they sit
next to, layout Transposes. Convolutions are matched between the fp32 and int8 runs by name,
with their MACs, GMAC/s and whether the shape fits ONNX Runtime's symmetric int8 kernels.

    python bench/int8_profile.py [--models resnet18,mobilenet_v2] [--runs 60]
Writes bench/results/int8_speed_profile.json.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save  # noqa: E402

INT8_OPS = re.compile(r"^(QLinear\w+|QGemm|QAttention|QEmbedLayerNormalization|MatMulInteger\w*|ConvInteger|"
                      r"DynamicQuantize\w*|MatMulIntegerToFloat|QOrdered\w+)$")
# Ops that only move data: on a uint8 tensor they are int8 work already.
MOVE_OPS = {"MaxPool", "NhwcMaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity",
            "Slice", "Gather", "Split", "Concat", "Pad", "SpaceToDepth", "DepthToSpace", "Expand", "Tile", "Shape"}
WATCH = {"MaxPool", "AveragePool", "Add", "Concat", "Resize", "GlobalAveragePool", "Flatten", "Reshape", "Mul"}


def _session(path: Path, threads: int, prefix: str, optimized: Path | None = None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    so.enable_profiling, so.profile_file_prefix = True, prefix
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def profile(models: dict[str, Path], feed: dict, runs: int = 60, threads: int = 1, warmup: int = 5) -> dict:
    """label -> {"nodes": {name: {"op", "ms"}}, "total_ms", "graph": static findings} (medians over runs)."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="edgepack-prof-") as d:
        sessions = {k: _session(p, threads, f"{d}/{i}", Path(d) / f"{i}.opt.onnx") for i, (k, p) in enumerate(models.items())}
        for _ in range(warmup):
            for s in sessions.values():
                s.run(None, feed)
        for _ in range(runs):
            for s in sessions.values():
                s.run(None, feed)
        for i, (label, s) in enumerate(sessions.items()):
            events = json.loads(Path(s.end_profiling()).read_text())
            per_node = defaultdict(list)
            op_of = {}
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    name = e["name"][: -len("_kernel_time")]
                    per_node[name].append(e["dur"] / 1000)
                    op_of[name] = e["args"].get("op_name", "?")
            # the first warmup runs are in the profile too: keep the last `runs` samples of each node
            nodes = {n: {"op": op_of[n], "ms": float(np.median(v[-runs:]))} for n, v in per_node.items()}
            optimized = onnx.load(str(Path(d) / f"{i}.opt.onnx"), load_external_data=False)
            out[label] = {"nodes": nodes, "total_ms": sum(v["ms"] for v in nodes.values()),
                          "graph": executed_graph_findings(optimized, nodes)}
    return out


def by_op_type(nodes: dict) -> dict:
    table = defaultdict(lambda: {"ms": 0.0, "count": 0})
    for v in nodes.values():
        table[v["op"]]["ms"] += v["ms"]
        table[v["op"]]["count"] += 1
    total = sum(v["ms"] for v in table.values()) or 1.0
    return {op: {"ms": round(v["ms"], 3), "share": round(v["ms"] / total, 3), "count": v["count"]}
            for op, v in sorted(table.items(), key=lambda kv: -kv[1]["ms"])}


def executed_graph_findings(model: onnx.ModelProto, nodes: dict) -> dict:
    """Float compute and leftover Q/DQ in the graph ONNX Runtime executes (its optimized model)."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    float_tensors = {i.name for i in g.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    for n in g.node:  # nodes are topologically sorted in a saved optimized model
        if n.op_type == "DequantizeLinear" or (n.op_type == "Cast" and any(a.i == 1 for a in n.attribute if a.name == "to")):
            float_tensors.update(n.output)
        elif n.op_type == "QuantizeLinear" or INT8_OPS.match(n.op_type):
            continue
        elif any(i in float_tensors for i in n.input if i and i not in inits):
            float_tensors.update(n.output)
    ms = lambda n: round(nodes.get(n.name, {}).get("ms", 0.0), 3)  # noqa: E731
    float_nodes = [{"node": n.name, "op": n.op_type, "ms": ms(n)} for n in g.node
                   if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and not INT8_OPS.match(n.op_type)
                   and n.op_type not in ("Shape",) and any(i in float_tensors for i in n.input if i and i not in inits)]
    leftovers = []
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            src = producer.get(n.input[0])
            leftovers.append({"node": n.name, "op": "QuantizeLinear", "after": src.op_type if src else "graph input", "ms": ms(n)})
        elif n.op_type == "DequantizeLinear" and n.input[0] not in inits:
            leftovers.append({"node": n.name, "op": "DequantizeLinear", "before": sorted({c.op_type for c in consumers[n.output[0]]}) or ["graph output"], "ms": ms(n)})
    around = [x for x in leftovers if x.get("after") in WATCH or set(x.get("before", [])) & WATCH]
    return {"float_compute_nodes": float_nodes,
            "qdq_nodes_left": leftovers,
            "qdq_left_around_watched_ops": around,
            "transposes": [{"node": n.name, "ms": ms(n)} for n in g.node if n.op_type == "Transpose"],
            "unfused_activations": [x for x in float_nodes if x["op"] in ("Relu", "Clip", "Sigmoid", "HardSwish", "LeakyRelu", "Tanh")],
            "op_counts": dict(sorted(Counter(n.op_type for n in g.node).items()))}


def conv_shapes(fp32_path: Path) -> dict:
    """Conv/Gemm name -> shape facts and MACs (batch 1), plus the tensor names the fused fp32
    node may be profiled under (ONNX Runtime names fused NCHWc nodes after their output)."""
    m = onnx.shape_inference.infer_shapes(onnx.load(str(fp32_path)))
    g = m.graph
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*g.value_info, *g.output, *g.input]}
    inits = {i.name: i.dims for i in g.initializer}
    consumers = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    out = {}
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm") or n.input[1] not in inits:
            continue
        w, y = list(inits[n.input[1]]), dims.get(n.output[0], [])
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if n.op_type == "Conv" and len(w) == 4 and len(y) == 4:
            macs = int(np.prod(y[1:])) * w[1] * w[2] * w[3]
            cin, cout = w[1] * group, w[0]
            fits = (cin == group == cout and group % 16 == 0) if group > 1 else (cin % 4 == 0 and cout >= 16 and cout % 4 == 0)
            desc = f"{cin}->{cout} k{w[2]}x{w[3]} g{group} out {y[2]}x{y[3]}"
        else:
            macs, fits, desc = int(np.prod(w)), None, f"gemm {w}"
        aliases = {n.name, n.output[0]}
        nxt = consumers.get(n.output[0], [])
        if len(nxt) == 1 and nxt[0].op_type in ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid"):
            aliases.add(nxt[0].output[0])
        out[n.name] = {"shape": desc, "macs": macs, "fits_symmetric_kernel": fits, "aliases": sorted(aliases)}
    return out


def _base_name(profiled: str) -> str:
    return re.sub(r"(_token_\d+|_nchwc|_tidy\d+)+$", "", profiled)


def conv_table(shapes: dict, fp32_nodes: dict, int8_nodes: dict) -> list[dict]:
    """Per convolution: fp32 and int8 ms, speed-up, GMAC/s; sorted by int8 time."""
    alias = {a: name for name, s in shapes.items() for a in s["aliases"]}
    times = {"fp32": defaultdict(float), "int8": defaultdict(float)}
    for kind, nodes in (("fp32", fp32_nodes), ("int8", int8_nodes)):
        for n, v in nodes.items():
            if v["op"] in ("Conv", "FusedConv", "Gemm", "FusedGemm", "QLinearConv", "QGemm", "MatMul"):
                base = _base_name(n)
                if base in alias:
                    times[kind][alias[base]] += v["ms"]
    rows = []
    for name, s in shapes.items():
        f, q = times["fp32"].get(name), times["int8"].get(name)
        rows.append({"node": name, "shape": s["shape"], "mmacs": round(s["macs"] / 1e6, 1),
                     "fits_symmetric_kernel": s["fits_symmetric_kernel"],
                     "fp32_ms": round(f, 3) if f else None, "int8_ms": round(q, 3) if q else None,
                     "speedup": round(f / q, 2) if f and q else None,
                     "int8_gmacs": round(s["macs"] / q / 1e6, 1) if q else None,
                     "fp32_gmacs": round(s["macs"] / f / 1e6, 1) if f else None})
    return sorted(rows, key=lambda r: -(r["int8_ms"] or 0))


def summarize(fp32_path: Path, prof: dict, fp32_label: str = "fp32") -> dict:
    """Per variant: op-type table, graph findings; per int8 variant: the convolution table."""
    shapes = conv_shapes(fp32_path)
    doc = {}
    for label, p in prof.items():
        entry = {"total_node_ms": round(p["total_ms"], 3), "by_op_type": by_op_type(p["nodes"]), "graph": p["graph"]}
        if label != fp32_label:
            entry["convs"] = conv_table(shapes, prof[fp32_label]["nodes"], p["nodes"])
        doc[label] = entry
    return doc


def print_summary(model: str, doc: dict, top: int = 6):
    for label, e in doc.items():
        ops = ", ".join(f"{op} {v['ms']:.2f} ({100 * v['share']:.0f}%)" for op, v in list(e["by_op_type"].items())[:5])
        g = e["graph"]
        print(f"{model} {label}: {e['total_node_ms']:.2f} ms in nodes: {ops}; float compute nodes "
              f"{len(g['float_compute_nodes'])}, Q/DQ left {len(g['qdq_nodes_left'])} "
              f"({len(g['qdq_left_around_watched_ops'])} around pooling/Add/Concat/Resize/Reshape)")
        for r in e.get("convs", [])[:top]:
            print(f"    {r['node'][-42:]:42s} {r['shape']:30s} {r['mmacs']:7.1f} MMAC int8 {r['int8_ms']} ms "
                  f"fp32 {r['fp32_ms']} ms x{r['speedup']} fits={r['fits_symmetric_kernel']}")


def main() -> None:
    import torch

    from fixtures import zoo
    from edgepack.data import Dataset
    from edgepack.onnx_tools.export import to_onnx
    from edgepack.onnx_tools.qdq_tidy import tidy_qdq
    from edgepack.onnx_tools.quantize import quantize_onnx
    from edgepack.targets import load_profile
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--calib-samples", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    q = load_profile("x86").quantization
    doc = {"benchmark": "int8_speed_profile", "machine": machine(), "threads": 1, "runs": args.runs, "models": {}}
    for name in args.models.split(","):
        model = getattr(zoo, name)().eval()
        calib = Dataset(np.random.default_rng(0).standard_normal((args.calib_samples, 3, 224, 224)).astype(np.float32))
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            fp32 = to_onnx(model, (torch.zeros(1, 3, 224, 224),), d / "fp32.onnx")
            quantize_onnx(fp32, d / "int8.onnx", calib, q)
            tidy = tidy_qdq(d / "int8.onnx", d / "int8_tidy.onnx")
            feed = {"input": calib.x[:1]}
            prof = profile({"fp32": fp32, "int8": d / "int8.onnx", "int8_tidy": d / "int8_tidy.onnx"}, feed, args.runs)
            doc["models"][f"{name}_224"] = {"tidy": tidy, **summarize(fp32, prof)}
            print_summary(name, {k: v for k, v in doc["models"][f"{name}_224"].items() if k != "tidy"})
    print(f"wrote {save('int8_speed_profile', doc)}")


if __name__ == "__main__":
    main()
