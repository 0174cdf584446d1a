"""Serving with onnxruntime: `python -m serve EXPORT_DIR --prompt ...` and `python -m serve.server EXPORT_DIR`.

    manifest.py   the export folder's contract, read and checked
    runtime.py    the onnxruntime session (OnnxModel) and generate()
    cache.py      the fused graph's preallocated KV cache
    batch.py      sequences and the batches that decode them together (make_batch)
    server.py     the HTTP server: decode_request → predict → encode_response
    scheduler.py  the model loop of the server; guard.py its connection, time and byte limits

Nothing under serve/ imports torch: `pip install .[serve]` is enough to run it.
"""
