"""Calibration, evaluation and training data: one `Dataset` of named model inputs, whatever the source.

Sources: a folder of images in class sub-folders (decoded lazily, bounded memory), an `.npz` with
one array per input name (and `y`), an `.npy`, or a Python `module:function` / `file.py:function`
returning arrays, a dict, (x, y), a Dataset or an iterable of batches. `load_dataset` fits the data
to the model's inputs (`conform`).
"""
from .conform import cast_input, conform
from .dataset import Dataset, stratified_allocation
from .images import IMAGE_SUFFIXES, PRESETS, ImageFolderArray, Preprocess, scan_image_folder
from .lazy import IndexedView, LazyArray, MappedArray
from .sources import from_result, load_dataset

__all__ = ["Dataset", "Preprocess", "load_dataset", "conform", "cast_input", "from_result",
           "LazyArray", "ImageFolderArray", "IndexedView", "MappedArray", "IMAGE_SUFFIXES", "PRESETS",
           "scan_image_folder", "stratified_allocation"]
