"""Loaded models are shared, not reloaded: the same file with the same options gives the same object.

The cache holds weak references only. ComfyUI's own output cache keeps a loader's result alive between queue runs
(the loaders' IS_CHANGED reports the file's size and mtime, so a rewritten file re-runs the loader, and then the key
below differs and the file is read again); when ComfyUI drops it ("Free memory", another workflow), nothing here
keeps the weights in memory.
"""
from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path
from typing import Callable, TypeVar

from .host import fingerprint

log = logging.getLogger(__name__)
T = TypeVar("T")

_lock = threading.Lock()
_cache: dict[tuple, weakref.ref] = {}


def cached(kind: str, paths: tuple[Path, ...], options: tuple, load: Callable[[], T]) -> T:
    """The live object for (kind, files as they are now, options), else `load()` remembered weakly."""
    key = (kind, tuple((str(p.resolve()), fingerprint(p)) for p in paths), options)
    with _lock:
        ref = _cache.get(key)
        obj = ref() if ref is not None else None
        if obj is not None:
            log.info("Kontext: reusing the loaded %s (%s)", kind, ", ".join(p.name for p in paths))
            return obj
        for k in [k for k, r in _cache.items() if r() is None]:
            del _cache[k]
    obj = load()  # outside the lock: loading takes long and may fail (then nothing is remembered)
    with _lock:
        _cache[key] = weakref.ref(obj)
    return obj


def live_entries() -> int:
    """How many cached models are still alive (for tests and memory checks)."""
    with _lock:
        return sum(1 for r in _cache.values() if r() is not None)
