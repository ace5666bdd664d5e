"""`edgepack search`: a multi-objective search over pruning, int8 and runtime settings, on the
device fleet, with Optuna as the engine and its database as the shared state.

    from edgepack.search import SearchConfig, search, show
    r = search(BuildConfig(target="x86"), SearchConfig(trials=20))   # r.best, r.pareto, r.trials
    show("digits-cnn-x86")                                           # the stored study

Modules: config (SearchConfig, storage URLs), space (the [search] table), objective (one trial),
study (storage, sampler, the worker loop), worker (fleet processes), results (table, plot,
best build), run (search, show).
"""
from .config import SearchConfig
from .run import SearchResult, search, show

__all__ = ["SearchConfig", "SearchResult", "search", "show"]
