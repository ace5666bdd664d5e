"""Peak memory and time of quantization-aware training on a realistic model: the qat stage's own work.

The ConvNeXt-T-style network of bench/build_memory.py (28.6M parameters, 224x224) as the qat stage
trains it (edgepack.compress.qat): a folded copy (the student) beside the float model (the
teacher), the fake quantization put on (every Conv/Linear weight, and its input), activation
ranges calibrated on 4 samples, then `fit` for one epoch of 2 steps at batch 2 (distillation,
Adam, the clip ratios' own group), with learned weight ranges and with ORT's fixed scales,
per-tensor and per-channel. Each variant runs in a fresh process, so each peak RSS (ru_maxrss)
is its own; 3 rounds, the order swapped each round (the machine is shared). An epoch costs a step times the training set over the batch size.

    .venv/bin/python bench/qat_memory.py                # writes bench/results/qat_memory.json
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

ROUNDS = 3

CHILD = '''
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
torch.set_num_threads(1)
from models import convnext_t
from edgepack.compress.qat import calibrate, fake_quantized, fit, fold_batchnorm
from edgepack.data import Dataset
from edgepack.prune import FinetuneConfig
from edgepack.targets import Quantization
per_channel, learn = sys.argv[2] == "1", sys.argv[3] == "1"
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
torch.manual_seed(0)
teacher = convnext_t().eval()
params = sum(p.numel() for p in teacher.parameters())
base = rss()
rng = np.random.default_rng(0)
x = rng.standard_normal((4, 3, 224, 224)).astype(np.float32)
data = Dataset(x, rng.integers(0, 10, 4), "random", [str(i) for i in range(1000)])
q = Quantization(per_channel=per_channel)
t0 = time.perf_counter()
student, folded = fold_batchnorm(teacher)
with fake_quantized(student, q, learn) as layers:
    calibrate(student, data, samples=4, batch_size=2)
    t_prepare, after_prepare = time.perf_counter() - t0, rss()
    t0 = time.perf_counter()
    s = fit(student, teacher, data, None, FinetuneConfig(epochs=1, batch_size=2, lr=1e-4, patience=None, threads=1))
    t_fit = time.perf_counter() - t0
print(json.dumps({"params": params, "layers": len(layers), "rss_model_mb": round(base),
                  "peak_after_prepare_mb": round(after_prepare), "peak_after_fit_mb": round(rss()),
                  "prepare_s": round(t_prepare, 1), "fit_2_steps_s": round(t_fit, 1), "epochs_run": s["epochs_run"]}))
'''


def main() -> None:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "models.py").write_text(MODELS)
        (Path(tmp) / "child.py").write_text(CHILD)
        for r in range(ROUNDS):  # learned and fixed side by side per scheme, the order swapped each round
            for per_channel in (0, 1):
                for learn in ((1, 0) if r % 2 == 0 else (0, 1)):
                    t0 = time.perf_counter()
                    out = subprocess.run([sys.executable, str(Path(tmp) / "child.py"), tmp, str(per_channel),
                                          str(learn)], capture_output=True, text=True, check=True).stdout
                    key = f"{'per_channel' if per_channel else 'per_tensor'}-{'learned' if learn else 'fixed'}"
                    row = {**json.loads(out.strip().splitlines()[-1]), "process_s": round(time.perf_counter() - t0, 1)}
                    rows.setdefault(key, []).append(row)
                    print(key, row, flush=True)
    save("qat_memory", {"bench": "qat_memory", "command": " ".join(sys.argv), "machine": machine(),
                        "model": "ConvNeXt-T-style (bench/build_memory.py), 224x224, batch 2, 1 thread", "rows": rows})


if __name__ == "__main__":
    main()
