"""Compression stages beyond channel pruning: low-rank factorization (`lowrank`), weight
clustering (`cluster`), and the size measures they are judged by (`size`).

Each submodule works on a plain torch module and knows nothing of the build; the stages in
edgepack/stages/ wire them into the pipeline (prune -> factorize -> cluster -> export -> int8).
Import the submodules directly: `from edgepack.compress.lowrank import factorize`.
"""
