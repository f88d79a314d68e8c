"""ComfyUI entry point of the Kontext node pack.

Nothing heavy happens at import: the node classes import ComfyUI lazily, so this file imports with or without ComfyUI.
"""
if __package__:  # imported as a ComfyUI custom node: a real import failure must show as IMPORT FAILED there
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported as a plain module (e.g. by a test runner collecting the repository root)
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
