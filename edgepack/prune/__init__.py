"""Structured channel pruning with distillation fine-tuning (runs before export).

Entry points: `run_prune_stage` (the build pipeline), `prune_model`, `finetune`,
`save_pruned` / `load_pruned`, and `PruneConfig` / `make_config` for the options.
"""
from .config import FinetuneConfig, PruneConfig, make_config
from .engine import UnprunableModel, prune_model
from .finetune import distillation_loss, evaluate, finetune
from .latency import measure_latency, search_latency_ratio
from .measure import count_macs_params
from .record import PruneRecord
from .saving import load_pruned, save_pruned
from .stage import prune_and_finetune, run_prune_stage

__all__ = ["FinetuneConfig", "PruneConfig", "PruneRecord", "UnprunableModel", "count_macs_params",
           "distillation_loss", "evaluate", "finetune", "load_pruned", "make_config", "measure_latency",
           "prune_and_finetune", "prune_model", "run_prune_stage", "save_pruned", "search_latency_ratio"]
