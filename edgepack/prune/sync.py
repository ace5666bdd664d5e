"""Model attributes kept in step with the pruned widths.

torch-pruning changes layers only. Attention modules compute the head size from `num_heads`
and may keep per-head parameters (Swin's relative position bias table, (entries, num_heads));
published models also store widths as plain integers and reshape with them (torchvision's ViT:
`x.reshape(n, self.hidden_dim, n_h * n_w)`). After each pruned group these are updated here:
`num_heads` from the qkv width, per-head parameters by dropping the removed heads' entries, and
an integer attribute that the forward pass reads, whose value is the old width of a layer just
pruned, on that layer or one of its parents. Every change can be undone with its group, and is
logged so that `load_pruned` can redo it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn


SKIP_ATTRIBUTES = {"num_heads", "training"}  # heads are derived from the qkv width (below)


@dataclass
class Heads:
    module: nn.Module
    head_dim: int
    params: list[tuple[str, int]] = field(default_factory=list)  # (parameter name, heads dim)


def head_parameters(module: nn.Module, num_heads: int) -> list[tuple[str, int]]:
    """The attention module's own parameters with exactly one dimension of size num_heads."""
    found = []
    for name, p in module.named_parameters(recurse=False):
        dims = [d for d, s in enumerate(p.shape) if s == num_heads]
        if len(dims) == 1:
            found.append((name, dims[0]))
    return found


@contextlib.contextmanager
def int_attributes_read(model: nn.Module):
    """Yields {module name: integer attributes its code read} for the forward passes run inside
    the block, for modules written outside torch (torch's own layers are torch-pruning's)."""
    read: set[tuple[int, str]] = set()
    found: dict[str, set[str]] = {}
    swapped = []
    for m in model.modules():
        cls = type(m)
        names = {k for k, v in vars(m).items() if type(v) is int and not k.startswith("_")} - SKIP_ATTRIBUTES
        if not names or cls.__module__.startswith("torch"):
            continue
        spy = type(cls.__name__, (cls,), {})

        def getattribute(self, key, _spy=spy, _names=names):
            if key in _names:
                read.add((id(self), key))
            return super(_spy, self).__getattribute__(key)

        spy.__getattribute__ = getattribute
        try:
            m.__class__ = spy
        except TypeError:  # __slots__ or an extension type: not watched
            continue
        swapped.append((m, cls))
    try:
        yield found
    finally:
        for m, cls in swapped:
            m.__class__ = cls
        by_id = {id(m): n for n, m in model.named_modules()}
        for mid, key in read:
            found.setdefault(by_id[mid], set()).add(key)


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


class AttributeSync:
    def __init__(self, model: nn.Module, heads_before: dict[str, int], reads: dict[str, set[str]]):
        self.model = model
        self.heads = {}
        for name, h in heads_before.items():
            att = model.get_submodule(name)
            self.heads[name] = Heads(att, att.qkv.out_features // (3 * h), head_parameters(att, h))
        self.reads = reads  # from int_attributes_read
        self.slices: list[list] = []  # [parameter path, dim, kept indices], in order
        self.attributes: dict[str, int] = {}  # "module.attr" -> value now

    def ignored_parameters(self) -> list[nn.Parameter]:
        """Per-head parameters: torch-pruning would slice them with channel indices."""
        return [getattr(h.module, p) for h in self.heads.values() for p, _ in h.params]

    def removed_heads(self, group, dg) -> dict[str, list[int]] | str:
        """{attention module: heads the group removes}, or a sentence when it cuts heads apart."""
        removed = {}
        for name, h in self.heads.items():
            for dep, idxs in group:
                if dep.target.module is not h.module.qkv or not dg.is_out_channel_pruning_fn(dep.handler):
                    continue
                idxs = {int(i) for i in tp._helpers.to_plain_idxs(idxs)}
                width = h.module.qkv.out_features // 3
                heads = sorted({i // h.head_dim for i in idxs if i < width})
                whole = {s * width + k * h.head_dim + j for s in range(3) for k in heads for j in range(h.head_dim)}
                if idxs != whole:
                    return f"it removes parts of attention heads in {name!r}, not whole heads"
                removed[name] = heads
        return removed

    def apply_heads(self, removed: dict[str, list[int]]) -> list:
        undo = []
        for name, h in self.heads.items():
            undo.append((h.module, "num_heads", h.module.num_heads))
            h.module.num_heads = h.module.qkv.out_features // (3 * h.head_dim)
            for pname, dim in h.params if removed.get(name) else []:
                old = getattr(h.module, pname)
                keep = [i for i in range(old.shape[dim]) if i not in set(removed[name])]
                setattr(h.module, pname, nn.Parameter(old.data.index_select(dim, torch.tensor(keep)),
                                                      requires_grad=old.requires_grad))
                undo.append((h.module, pname, old))
                self.slices.append([f"{name}.{pname}", dim, keep])
                undo.append(("slice", len(self.slices) - 1, None))
        return undo

    def apply_widths(self, changes: dict[str, tuple[int, int]]) -> list:
        """Set integer attributes read by the forward pass that hold a changed layer's old
        width (on the layer or a parent); an attribute matching two different new widths is
        left alone (the check after pruning decides)."""
        wanted: dict[tuple[str, str], set[int]] = {}
        for layer, (old, new) in changes.items():
            for parent in _parents(layer):
                for attr in self.reads.get(parent, ()):
                    value = getattr(self.model.get_submodule(parent), attr, None)
                    if type(value) is int and value == old:
                        wanted.setdefault((parent, attr), set()).add(new)
        undo = []
        for (parent, attr), news in wanted.items():
            if len(news) != 1:
                continue
            module = self.model.get_submodule(parent)
            undo.append((module, attr, getattr(module, attr)))
            setattr(module, attr, news.pop())
            path = f"{parent}.{attr}" if parent else attr
            undo.append(("attribute", path, self.attributes.get(path)))
            self.attributes[path] = getattr(module, attr)
        return undo

    def described(self, changes: list) -> list[tuple[nn.Module, str, int]]:
        """(module, "Class.attr" path, new value) for the attribute changes in `changes`."""
        return [(target, f"{type(target).__name__}.{key}", getattr(target, key))
                for target, key, _ in changes if isinstance(target, nn.Module)]

    def undo(self, changes: list) -> None:
        for target, key, old in reversed(changes):
            if target == "slice":
                del self.slices[key:]
            elif target == "attribute":
                if old is None:
                    self.attributes.pop(key, None)
                else:
                    self.attributes[key] = old
            else:
                setattr(target, key, old)

    def refresh_heads(self, pruner) -> None:
        """torch-pruning's head counts follow the widths (it decrements them before a group is
        pruned, so an undone group would leave them wrong)."""
        for h in self.heads.values():
            n = h.module.qkv.out_features // (3 * h.head_dim)
            h.module.num_heads = n
            pruner.num_heads[h.module.qkv] = n
            if h.module.qkv in pruner.out_channel_groups:
                pruner.out_channel_groups[h.module.qkv] = n


def redo(model: nn.Module, slices: list, attributes: dict) -> None:
    """Apply logged per-head slices and attribute values to a model re-pruned from history."""
    for path, dim, keep in slices:
        parent, _, pname = path.rpartition(".")
        module = model.get_submodule(parent)
        old = getattr(module, pname)
        setattr(module, pname, nn.Parameter(old.data.index_select(dim, torch.tensor(keep)),
                                            requires_grad=old.requires_grad))
    for path, value in attributes.items():
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, value)
