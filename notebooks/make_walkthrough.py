"""Writes notebooks/walkthrough.ipynb from the cells below (the notebook is generated, not hand-edited).

    python notebooks/make_walkthrough.py

Keeping the cells here keeps the notebook reviewable as plain text; tests/test_teach.py executes
the generated notebook, and checks that it is up to date with this file.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """# From text to a GPT, with the toolkit's own code

This notebook walks the path of the tutorial the project grew out of: tokenization → embeddings →
self-attention → multi-head attention → feed-forward → residual + LayerNorm → the full model →
training → generation. Each step uses the toolkit's own classes (`gpt/`, `launch/`), and every
piece computed by hand is checked against the module that implements it. It runs on a CPU in a
few minutes. The map from each step to its file is in `docs/walkthrough.md`."""),
    ("code", """import math
import sys
from pathlib import Path

ROOT = Path.cwd() if (Path.cwd() / "gpt").is_dir() else Path.cwd().parent
sys.path.insert(0, str(ROOT))
import torch
import torch.nn.functional as F

torch.manual_seed(1337)
torch.set_num_threads(1)"""),
    ("md", """## 1. The text and its vocabulary

The model reads characters. The vocabulary is every distinct character of the corpus, sorted;
a character's id is its index. `gpt.data.resolve_corpus` finds TinyShakespeare (or downloads and
verifies it), and `CharTokenizer` maps text to ids and back."""),
    ("code", """from gpt.config import DataConfig
from gpt.data import resolve_corpus
from gpt.tokenizer import CharTokenizer

text = resolve_corpus(DataConfig()).read_text(encoding="utf-8")
tokenizer = CharTokenizer.from_text(text)
print(f"{len(text):,} characters, vocabulary of {tokenizer.vocab_size}:")
print(repr("".join(tokenizer.chars)))
ids = tokenizer.encode("ROMEO:")
print(ids, "->", repr(tokenizer.decode(ids)))"""),
    ("md", """## 2. A batch of (input, target) pairs

Training shows the model windows of `block_size` characters and asks, at every position, for the
next character: the target is the input shifted left by one. `gpt.data.prepare` tokenizes the
corpus once into a memory-mapped file; `get_batch` draws windows that depend only on (seed, step,
shard), so a resumed run sees the same data."""),
    ("code", """from gpt.data import get_batch, prepare

corpus = prepare(DataConfig())
x, y = get_batch(corpus.train, batch_size=4, block_size=16, seed=0, split="train", step=0, shard=0)
print("x", tuple(x.shape), "y", tuple(y.shape))
for i in range(2):
    print(repr(tokenizer.decode(x[i].tolist())), "->", repr(tokenizer.decode(y[i].tolist())))"""),
    ("md", """## 3. Token and position embeddings

Each id picks a learned vector (the token embedding, `(B, T) -> (B, T, C)`). Attention itself is
blind to order: it mixes a set of vectors. So each position also picks a learned vector, added
to the token's. Without it, "dog bites man" and "man bites dog" would look alike to the model:
below, the sum of token embeddings is identical for a word and its reverse, and the position
embeddings tell them apart."""),
    ("code", """from gpt.config import ModelConfig
from gpt.model import GPT

config = ModelConfig(block_size=32, embedding_dim=32, num_heads=4, num_layers=2, vocab_size=tokenizer.vocab_size)
model = GPT(config).eval()
a, b = torch.tensor([tokenizer.encode("stop")]), torch.tensor([tokenizer.encode("pots")])
tok_a, tok_b = model.token_embedding(a), model.token_embedding(b)
pos = model.position_embedding(torch.arange(4))
print("token embeddings alone, summed over the word, equal:", torch.allclose(tok_a.sum(1), tok_b.sum(1), atol=1e-6))
print("with positions, equal:", torch.allclose((tok_a + pos).sum(1), (tok_b + pos).sum(1), atol=1e-6))"""),
    ("md", """## 4. One attention head, by hand

A head lets each token gather information from the tokens before it:

1. project every token to a **query** (what am I looking for?), a **key** (what do I offer?) and a
   **value** (what do I pass on);
2. score each query against each key: the dot product q·k, divided by √D so the scores do not grow
   with the head size D;
3. hide the future: a token may only look at itself and earlier tokens (the causal mask);
4. softmax each row of scores into weights that sum to 1;
5. the head's output is the weighted sum of the values.

Below, head 0 of the first layer is computed step by step from the model's own weights."""),
    ("code", """attn = model.blocks[0].attn
x = model.token_embedding(a) + model.position_embedding(torch.arange(a.shape[1]))
h = model.blocks[0].ln_1(x)                      # the block normalises before attending: (B, T, C)
B, T, C = h.shape
D = attn.head_dim
q_all, k_all, v_all = attn.qkv(h).split(C, dim=2)  # one Linear makes Q, K, V for every head
q, k, v = (t[..., :D] for t in (q_all, k_all, v_all))  # head 0's slice: (B, T, D)
scores = q @ k.transpose(1, 2) / math.sqrt(D)      # (B, T, T)
scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
weights = F.softmax(scores, dim=-1)                # each row sums to 1
head0 = weights @ v                                # (B, T, D)
print(weights[0].detach().numpy().round(2))"""),
    ("md", """## 5. Multi-head attention

Several heads run side by side, each with its own slice of Q, K and V, so each can attend to
something different. Their outputs are concatenated back to width C and mixed by one more Linear
(`proj`). Doing that by hand for all heads reproduces the model's `CausalSelfAttention`, which
computes the same thing with one fused kernel (`scaled_dot_product_attention`)."""),
    ("code", """from gpt.attention import head_by_hand

heads = [head_by_hand(attn, h, i)[1] for i in range(attn.num_heads)]   # each (B, T, D)
by_hand = attn.proj(torch.cat(heads, dim=-1))                            # (B, T, C)
module, _ = attn(h, None, None)
torch.testing.assert_close(heads[0], head0)
torch.testing.assert_close(by_hand, module, atol=1e-5, rtol=0)
print("hand-built multi-head attention matches CausalSelfAttention: max |diff| =",
      (by_hand - module).abs().max().item())"""),
    ("md", """## 6. A block: feed-forward, residual connections, LayerNorm

After attention (tokens talking to each other) comes a feed-forward network applied to each token
alone (widen to 4C, GELU, back to C). Each sub-layer reads a LayerNorm'd copy of the stream and
**adds** its result to it (a residual connection), so gradients flow straight through the stack."""),
    ("code", """block = model.blocks[0]
by_hand = x + block.attn(block.ln_1(x), None, None)[0]
by_hand = by_hand + block.mlp(block.ln_2(by_hand))
module, _ = block(x, None, None)
torch.testing.assert_close(by_hand, module)
print("x + attn(ln_1(x)), then + mlp(ln_2(.)) matches Block:", tuple(module.shape))"""),
    ("md", """## 7. The full model

Embeddings, the stack of blocks, a final LayerNorm and the LM head, which turns each position's
vector into one score (logit) per vocabulary entry: `(B, T) -> (B, T, V)`. Untrained, every
character is about equally likely, so the loss is near ln(V)."""),
    ("code", """inputs = torch.tensor([tokenizer.encode("ROMEO: But")])
targets = torch.tensor([tokenizer.encode("OMEO: But ")])
out = model(inputs, targets=targets)
print("logits", tuple(out.logits.shape), f"loss {out.loss.item():.3f} vs ln(V) = {math.log(tokenizer.vocab_size):.3f}")
print(f"{model.num_parameters():,} parameters, {model.flops_per_token():,.0f} training FLOPs per token")"""),
    ("md", """## 8. A short training run

The toolkit's own training loop (`launch.train`): AdamW with warmup and cosine decay, periodic
evaluation on held-out text, checkpoints. A few hundred steps of a small model take about a
minute on a CPU; `configs/shakespeare_char_cpu.yaml` goes further."""),
    ("code", """import tempfile

from launch.plot import plot_losses
from launch.train import main, setup

run_dir = Path(tempfile.mkdtemp()) / "walkthrough"
run_config, start = setup(str(ROOT / "configs" / "tiny.yaml"), [
    f"--train.out_dir={run_dir}", "--model.block_size=64", "--model.embedding_dim=64", "--train.batch_size=16",
    "--train.max_iters=300", "--train.eval_interval=100", "--train.checkpoint_interval=300", "--train.log_interval=50",
], resume=False)
result = main(run_config, start)
print(f"val loss {result.metrics['val_loss']:.3f} after {result.metrics['step']} steps")"""),
    ("code", """from IPython.display import Image, display

display(Image(filename=str(plot_losses(run_dir))))"""),
    ("md", """## 9. Generation

Generation feeds the model its own output, one character at a time. The KV cache keeps the keys
and values of earlier positions, so each step costs one position instead of the whole context;
the cached and uncached ways give the same tokens."""),
    ("code", """from gpt.generate import generate, generate_uncached
from gpt.sampling import SamplingParams

trained = result.model.eval()
prompt = tokenizer.encode("ROMEO:")
params = SamplingParams(temperature=0.8, top_k=40)
tokens = list(generate(trained, prompt, 200, params, seed=1))
assert tokens == list(generate_uncached(trained, prompt, 200, params, seed=1))
print("ROMEO:" + tokenizer.decode(tokens))"""),
    ("md", """## 10. What the trained model attends to

Each panel is one head: row i shows how much the character at position i attends to each earlier
character. `python -m gpt.attention RUN_DIR --text ... --out attn.png` draws the same for any run."""),
    ("code", """from gpt.attention import attention_weights, plot_attention

sample = "ROMEO: But soft, what light"
weights = attention_weights(trained, torch.tensor([tokenizer.encode(sample)]))
display(Image(filename=str(plot_attention(weights, sample, run_dir / "attention.png"))))"""),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    return nb


if __name__ == "__main__":
    path = Path(__file__).with_name("walkthrough.ipynb")
    nbformat.write(build(), path)
    print(f"wrote {path}")
