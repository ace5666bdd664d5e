"""Peak memory and time of weight clustering on a realistic model: the cluster stage's own work.

The ConvNeXt-T-style network of bench/build_memory.py (28.6M parameters, 224x224), clustered
with the stage's defaults (16 values, scaled, the int8 grid of the scheme: qmax 127 and 64 both
timed; rate 0.04 also weighted by layer sensitivity, measured on 128 random inputs as the stage
does, edgepack.compress.sensitivity), then one fine-tuning step with the clusters kept (forward + backward at batch 1, the
parametrization gathering every weight), in a fresh process per variant so each peak RSS
(ru_maxrss) is its own. Fine-tuning epochs cost that step times the training set; they are not
run here.

    .venv/bin/python bench/cluster_memory.py            # writes bench/results/cluster_memory.json
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_memory import MODELS  # noqa: E402
from common import machine, save  # noqa: E402

CHILD = '''
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from models import convnext_t
from edgepack.compress.cluster import cluster, clusters_kept
qmax, rate, weighted = int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "sensitivity"
import numpy as np
from edgepack.compress.sensitivity import SAMPLES, weight_sensitivity
from edgepack.data import Dataset
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
torch.manual_seed(0)
model = convnext_t().eval()
params = sum(p.numel() for p in model.parameters())
base = rss()
sens, t_sens, after_sens = None, None, None
if weighted:
    data = Dataset(np.random.default_rng(0).standard_normal((SAMPLES, 3, 224, 224)).astype(np.float32), None, "random", [])
    t0 = time.perf_counter()
    sens = weight_sensitivity(model, data)
    t_sens, after_sens = round(time.perf_counter() - t0, 1), round(rss())
t0 = time.perf_counter()
model, rec = cluster(model, 16, scaled=True, qmax=qmax, rate=rate, sensitivity=sens)
t_cluster, after_cluster = time.perf_counter() - t0, rss()
x = torch.randn(1, 3, 224, 224)
with clusters_kept(model, rec):
    model.train()
    t0 = time.perf_counter()
    model(x).square().mean().backward()
    t_step = time.perf_counter() - t0
print(json.dumps({"params": params, "layers": len(rec.layers), "rss_model_mb": round(base), "peak_after_cluster_mb":
                  round(after_cluster), "peak_after_step_mb": round(rss()), "cluster_s": round(t_cluster, 1),
                  "finetune_step_s": round(t_step, 2), "sensitivity_s": t_sens, "peak_after_sensitivity_mb": after_sens}))
'''


def main() -> None:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "models.py").write_text(MODELS)
        (Path(tmp) / "child.py").write_text(CHILD)
        for qmax, rate, by in ((127, 0.0, "uniform"), (64, 0.0, "uniform"), (127, 0.04, "uniform"),
                               (127, 0.04, "sensitivity")):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, str(Path(tmp) / "child.py"), tmp, str(qmax), str(rate), by],
                                 capture_output=True, text=True, check=True).stdout
            rows[f"qmax{qmax}-rate{rate}" + ("-sensitivity" if by == "sensitivity" else "")] = {**json.loads(out.strip().splitlines()[-1]),
                                              "process_s": round(time.perf_counter() - t0, 1)}
            print(rows, flush=True)
    save("cluster_memory", {"bench": "cluster_memory", "command": " ".join(sys.argv), "machine": machine(),
                            "model": "ConvNeXt-T-style (bench/build_memory.py), 224x224, batch 1, 1 thread", "rows": rows})


if __name__ == "__main__":
    main()
