"""Structured channel pruning with distillation fine-tuning (runs before export)."""
from .config import FinetuneConfig, PruneConfig, make_config
from .engine import UnprunableModel, prune_model
from .measure import count_macs_params
from .record import PruneRecord

__all__ = ["FinetuneConfig", "PruneConfig", "PruneRecord", "UnprunableModel", "count_macs_params",
           "make_config", "prune_model"]
