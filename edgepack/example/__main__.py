"""Retrain the embedded default's weights: `python -m edgepack.example`."""
import time

import torch
from safetensors.torch import save_file

from . import WEIGHTS, accuracy, eval_data, train

torch.set_num_threads(2)
t0 = time.time()
model = train()
save_file(model.state_dict(), str(WEIGHTS))
print(f"trained in {time.time() - t0:.1f}s; eval top-1 {accuracy(model, eval_data()):.2f}% -> {WEIGHTS}")
