"""ComfyUI entry point of the Kontext node pack.

Nothing heavy happens at import: the node classes import ComfyUI lazily, so this file imports with or without ComfyUI.
"""
try:  # imported as a ComfyUI custom node (a package): relative import of our nodes
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError:  # imported as a plain module (e.g. by pytest's rootdir collection)
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
