"""gpt: a decoder-only transformer, from text (one file or a corpus of many) to tokens to a trained model.

Importing the package imports nothing heavy: `gpt.tokenizer` and `gpt.sampling` need no torch,
so the ONNX runtime in `serve/` can use them; `gpt.model` and `gpt.data` bring torch in.
"""

__version__ = "0.1.0"
