"""Copies of a module tree that share its tensors: how a model with some layers changed (LoRA branches, an export's
Q/DQ stand-ins) is made without touching, or duplicating, the original."""
from __future__ import annotations

import copy

from torch import nn


def shallow_copy(m: nn.Module) -> nn.Module:
    """A new module object sharing m's submodules and tensors (its own dicts, so replacing one leaves m alone)."""
    c = copy.copy(m)
    c._modules, c._parameters, c._buffers = dict(m._modules), dict(m._parameters), dict(m._buffers)
    return c


def copy_path(root: nn.Module, name: str) -> nn.Module:
    """Copy every module on the path to `name` in the (already copied) root; returns the copied layer."""
    parent = root
    for part in name.split("."):
        child = shallow_copy(parent._modules[part])
        parent._modules[part] = child
        parent = child
    return parent
