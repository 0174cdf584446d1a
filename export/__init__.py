"""Export: `python -m export RUN_OR_CHECKPOINT_DIR EXPORT_DIR` writes a verified ONNX model with a KV cache.

    pipeline.py     the named steps, checkpoint to published folder (`export()`)
    portable.py     the portable graph's builder (standard ONNX ops, written from the weights)
    graph.py        trace the portable graph with torch.onnx instead (--exporter dynamo), check a graph
    verify.py       the gates: parity grids, greedy tokens, validation loss
    fused.py        the fused graph's builder (onnxruntime's contrib ops, the cache written in place)
    variants.py     int8, int4, int8-weights and fp16 versions of a graph
    onnxfile.py     a graph on disk: NAME.onnx, and NAME.onnx.data for weights past protobuf's 2 GB
    genai.py        onnxruntime-genai's config for the folder
    hf.py           `--format hf`: a transformers GPT2LMHeadModel folder
    destination.py  where an export may be written, and `--force`
"""
