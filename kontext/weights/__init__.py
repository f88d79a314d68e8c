"""Checkpoint reading (safetensors only), layout detection and streaming loads."""
from .checkpoint import Checkpoint, read_header
from .loading import Plan, Source, check_plan, load_plan, strip_prefix

__all__ = ["Checkpoint", "read_header", "Plan", "Source", "check_plan", "load_plan", "strip_prefix"]
