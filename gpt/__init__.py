"""gpt: a character-level decoder-only transformer, from text to tokens to a trained model.

Importing the package imports nothing heavy: `gpt.tokenizer` and `gpt.sampling` need no torch,
so the ONNX runtime in `serve/` can use them; `gpt.model` and `gpt.data` bring torch in.
"""

__version__ = "0.1.0"
