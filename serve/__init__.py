"""Serving with onnxruntime: `python -m serve EXPORT_DIR --prompt ...` and `python -m serve.server EXPORT_DIR`.

Nothing under serve/ imports torch: `pip install .[serve]` is enough to run it.
"""
