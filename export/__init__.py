"""Export: `python -m export RUN_OR_CHECKPOINT_DIR EXPORT_DIR` writes a verified ONNX model with a KV cache."""
