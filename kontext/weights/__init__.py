"""Checkpoint reading (safetensors only), layout detection and streaming loads."""
from .checkpoint import Checkpoint, count_indexed, read_header
from .loading import Plan, Source, as_device, check_plan, load_plan

__all__ = ["Checkpoint", "count_indexed", "read_header", "Plan", "Source", "as_device", "check_plan", "load_plan"]
