"""Serving with onnxruntime: `python -m serve EXPORT_DIR --prompt ...` and `python -m serve.server EXPORT_DIR`.

    manifest.py   the export folder's contract, read and checked
    runtime.py    the onnxruntime session (OnnxModel) and generate()
    cache.py      the fused graph's preallocated KV cache
    batch.py      sequences and the batches that decode them together (make_batch)
    scoring.py    log-probabilities of a text in rolling windows (echo, serve.evaluate)
    evaluate.py   `python -m serve.evaluate`: every variant of an export scored on your text
    server.py     the HTTP server: decode_request → predict → encode_response (protocol.py holds
                  OpenAI's shapes), the model loop in scheduler.py, limits in guard.py, /metrics in
                  metrics.py

Nothing under serve/ imports torch: `pip install .[serve]` is enough to run it.
"""
