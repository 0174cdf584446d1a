"""Writes notebooks/walkthrough.ipynb from the cells below, executed, with its outputs (the notebook
is generated, not hand-edited).

    python notebooks/make_walkthrough.py            # about a minute on 2 cores

Keeping the cells here keeps the notebook reviewable as plain text; the committed notebook carries
the outputs of a run, so a learner has something to compare against. tests/test_teach.py checks
that it is up to date with this file and executes it again.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """# From text to a GPT, with the toolkit's own code

This notebook walks the path of the step-by-step tutorial the project grew out of: characters →
a bigram baseline → the averaging trick → one attention head → multi-head attention →
feed-forward → residual connections and LayerNorm → the full model → training → generation.
Each step uses the toolkit's own classes (`gpt/`, `launch/`), every piece computed by hand is
checked against the module that implements it, and the outputs below are what a run on a CPU
gives (about a minute on 2 cores), so you can compare your own. The name map from the tutorial to
the code, and every place the code differs from it, are in `docs/walkthrough.md`."""),
    ("code", """import math
import sys
import tempfile
from pathlib import Path

ROOT = Path.cwd() if (Path.cwd() / "gpt").is_dir() else Path.cwd().parent
sys.path.insert(0, str(ROOT))
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from IPython.display import Image, display

warnings.filterwarnings("ignore", message="IProgress not found")  # a progress-bar library's notebook nag

torch.manual_seed(1337)
torch.set_num_threads(1)
OUT = Path(tempfile.mkdtemp())  # pictures and runs go here"""),
    ("md", """## 1. The text and its vocabulary

The model reads characters. The vocabulary is every distinct character of the corpus, sorted; a
character's id is its index. `gpt.data.resolve_corpus` finds TinyShakespeare (or downloads and
verifies it), and `CharTokenizer` maps text to ids and back. **You should see 65 characters.**"""),
    ("code", """from gpt.config import DataConfig
from gpt.data import resolve_corpus
from gpt.tokenizer import CharTokenizer

text = resolve_corpus(DataConfig()).read_text(encoding="utf-8")
tokenizer = CharTokenizer.from_text(text)
V = tokenizer.vocab_size
print(f"{len(text):,} characters, vocabulary of {V}:")
print(repr("".join(tokenizer.chars)))
ids = tokenizer.encode("ROMEO:")
print(ids, "->", repr(tokenizer.decode(ids)))"""),
    ("md", """## 2. Inputs and targets, position by position

A window of `block_size + 1` characters holds `block_size` training examples at once: at every
position the input is the characters so far and the target is the next one. So the target tensor
is the input shifted left by one. `gpt.data.prepare` tokenizes the corpus once (the first 90% for
training, the last 10% held out), and `get_batch` draws windows that depend only on (seed, step,
shard), so a resumed run sees the same data."""),
    ("code", """from gpt.data import get_batch, prepare

corpus = prepare(DataConfig())
window = corpus.train[:9].tolist()
for t in range(1, 9):
    print(f"input {tokenizer.decode(window[:t])!r:12} -> target {tokenizer.decode([window[t]])!r}")
x, y = get_batch(corpus.train, batch_size=4, block_size=8, seed=0, split="train", step=0, shard=0)
print("x", tuple(x.shape), "y", tuple(y.shape), "| y[:, :-1] == x[:, 1:]:", bool((y[:, :-1] == x[:, 1:]).all()))"""),
    ("md", """## 3. The baseline: a bigram model from counts

Before any neural network: predict the next character from the current one alone, with
probabilities counted on the training split (plus one, so nothing has probability zero). Its
loss on the held-out split is the number every later model has to beat. The loss of guessing
uniformly is ln V = ln 65 ≈ 4.17."""),
    ("code", """train, val = np.asarray(corpus.train, dtype=np.int64), np.asarray(corpus.val, dtype=np.int64)
counts = np.ones((V, V))
np.add.at(counts, (train[:-1], train[1:]), 1)  # counts[a, b]: how often b follows a
probs = counts / counts.sum(1, keepdims=True)
bigram_loss = float(-np.log(probs[val[:-1], val[1:]]).mean())
print(f"bigram validation loss {bigram_loss:.3f} nats per character; uniform guess ln V = {math.log(V):.3f}")"""),
    ("md", """## 4. The averaging trick

A token should gather information from the tokens before it. The simplest way: average them. With
a lower-triangular matrix of weights, one matrix product averages every prefix at once; putting
−∞ above the diagonal and taking a softmax over each row gives the same matrix, and that is the
form attention uses, with learned scores in place of zeros."""),
    ("code", """T = 5
tril = torch.tril(torch.ones(T, T))
average = tril / tril.sum(1, keepdim=True)          # row i: weight 1/(i+1) on positions 0..i
scores = torch.zeros(T, T).masked_fill(tril == 0, float("-inf"))
print(average.numpy().round(2))
print("softmax over masked zeros gives the same weights:", torch.allclose(F.softmax(scores, dim=-1), average))
xs = torch.randn(2, T, 3)
loop = torch.stack([xs[:, :i + 1].mean(1) for i in range(T)], 1)
print("one matrix product == a loop of prefix means:", torch.allclose(average @ xs, loop, atol=1e-6))"""),
    ("md", """## 5. Token and position embeddings

Each id picks a learned vector (the token embedding, `(B, T) -> (B, T, C)`). Attention mixes a
*set* of vectors: the weighted sum does not depend on their order. Below, "tops" and "pots" (the
same four characters, the same last one) give the same output at the last position of an
attention layer fed token vectors alone; adding a vector per position (the position embedding)
tells them apart. The layer here has larger random weights than a fresh model's, so its scores
are not flat (training makes them so; with flat scores every order averages alike).
(`attn(x, mask, past)` returns the output and this call's keys and values, the KV cache;
`None, None` means the default causal mask and no cache.)"""),
    ("code", """import copy

from gpt.config import ModelConfig
from gpt.model import GPT

config = ModelConfig(block_size=32, embedding_dim=32, num_heads=4, num_layers=2, vocab_size=V)
model = GPT(config).eval()
attn = model.blocks[0].attn
a, b = torch.tensor([tokenizer.encode("tops")]), torch.tensor([tokenizer.encode("pots")])
sharp = copy.deepcopy(attn)
torch.nn.init.normal_(sharp.qkv.weight, std=0.3)
token_vectors, position_vectors = torch.nn.Embedding(V, 32), torch.nn.Embedding(4, 32)  # N(0, 1) entries


def last_output_difference(xa, xb):  # attention outputs at the last position, relative to their size
    with torch.no_grad():
        oa, ob = sharp(xa, None, None)[0][:, -1], sharp(xb, None, None)[0][:, -1]
    return ((oa - ob).abs().max() / oa.abs().max()).item()


with torch.no_grad():
    ta, tb, p = token_vectors(a), token_vectors(b), position_vectors(torch.arange(4))
print(f"'tops' vs 'pots', token vectors only: last outputs differ by {last_output_difference(ta, tb):.0e}")
print(f"with position vectors added: they differ by {last_output_difference(ta + p, tb + p):.2f}")"""),
    ("md", """## 6. Why scores are divided by √D

With queries and keys of unit variance, q·k sums D products, so its variance is D. Large scores
make the softmax put almost all weight on one key (and its gradient vanishes); dividing by √D
brings the variance back to 1, so a fresh head spreads its attention."""),
    ("code", """D = 64
q, k = torch.randn(1000, 16, D), torch.randn(1000, 16, D)
raw = (q @ k.transpose(1, 2))
scaled = raw / math.sqrt(D)
print(f"Var(q·k) = {raw.var():.1f} (D = {D}); Var(q·k/√D) = {scaled.var():.2f}")
print(f"mean largest softmax weight over 16 keys: unscaled {F.softmax(raw, -1).max(-1).values.mean():.2f}, "
      f"scaled {F.softmax(scaled, -1).max(-1).values.mean():.2f}")"""),
    ("md", """## 7. One attention head, by hand

Each block first normalises its input (LayerNorm, `ln_1`; section 9 shows why), then a head:

1. projects every token to a **query** (what am I looking for?), a **key** (what do I offer?) and a
   **value** (what do I pass on);
2. scores each query against each key: q·k / √D;
3. hides the future: a token may only look at itself and earlier tokens (the causal mask);
4. takes a softmax over the **keys** (the last axis), so each query's weights sum to 1;
5. outputs the weighted sum of the values.

The model makes Q, K and V for all heads with one Linear, `qkv`, whose weight is `(3C, C)`: output
features 0..C−1 are the queries, C..2C−1 the keys, 2C..3C−1 the values, and within each, head h
owns features h·D..(h+1)·D−1. So head 0's query is the first D columns of `qkv(h)`."""),
    ("code", """from gpt.pictures import plot_qkv_split

display(Image(filename=str(plot_qkv_split(attn, OUT / "qkv.png"))))"""),
    ("code", """x = model.token_embedding(a) + model.position_embedding(torch.arange(a.shape[1]))  # (B, T, C)
h = model.blocks[0].ln_1(x)                         # (B, T, C)
B, T, C = h.shape
D = attn.head_dim
q_all, k_all, v_all = attn.qkv(h).split(C, dim=2)   # (B, T, C) each: all heads side by side
q, k, v = (t[..., :D] for t in (q_all, k_all, v_all))  # head 0: (B, T, D)
scores = q @ k.transpose(1, 2) / math.sqrt(D)       # (B, T, T): query rows, key columns
scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
weights = F.softmax(scores, dim=-1)                 # over keys: each row sums to 1
head0 = weights @ v                                 # (B, T, D)
print(weights[0].detach().numpy().round(3))
tril = torch.tril(torch.ones(T, T))
gap = (weights[0] - tril / tril.sum(1, keepdim=True)).abs().max().item()
print(f"an untrained head attends almost exactly like the prefix average: max |difference| = {gap:.4f}")"""),
    ("md", """## 8. Multi-head attention

Several heads run side by side, each with its own slice of Q, K and V, so each can attend to
something different. Their outputs are concatenated back to width C and mixed by one more Linear
(`proj`). Doing that by hand for all heads reproduces `CausalSelfAttention`, which computes the
same thing with one fused kernel (`scaled_dot_product_attention`) on all heads at once, `(B, H, T, D)`."""),
    ("code", """from gpt.pictures import head_by_hand

heads = [head_by_hand(attn, h, i)[1] for i in range(attn.num_heads)]   # each (B, T, D)
by_hand = attn.proj(torch.cat(heads, dim=-1))                            # (B, T, C)
module, _ = attn(h, None, None)                                          # (output, this call's keys and values)
torch.testing.assert_close(heads[0], head0)
torch.testing.assert_close(by_hand, module, atol=1e-5, rtol=0)
print("hand-built multi-head attention matches CausalSelfAttention: max |diff| =",
      f"{(by_hand - module).abs().max().item():.1e}")"""),
    ("md", """## 9. A block: feed-forward, residual connections, LayerNorm

After attention (tokens talking to each other) comes a feed-forward network applied to each token
alone (widen to 4C, GELU, back to C). Each sub-layer reads a LayerNorm'd copy of the stream and
**adds** its result to it (a residual connection), so gradients flow straight through the stack.
Normalising before each sub-layer (pre-LN, as GPT-2) rather than after (the original paper's
post-LN) keeps deep stacks stable without a careful warmup."""),
    ("code", """block = model.blocks[0]
by_hand = x + block.attn(block.ln_1(x), None, None)[0]
by_hand = by_hand + block.mlp(block.ln_2(by_hand))
module, _ = block(x, None, None)
torch.testing.assert_close(by_hand, module)
print("x + attn(ln_1(x)), then + mlp(ln_2(.)) matches Block:", tuple(module.shape))"""),
    ("md", """## 10. The full model, untrained

Embeddings, the stack of blocks, a final LayerNorm and the LM head, which turns each position's
vector into one score (logit) per vocabulary entry: `(B, T) -> (B, T, V)`. Weights start as small
random numbers (standard deviation 0.02), so every logit starts near 0, the softmax is nearly
uniform, and the loss is near ln V. **You should see a loss within 0.1 of 4.17.**"""),
    ("code", """inputs = torch.tensor([tokenizer.encode("ROMEO: But")])
targets = torch.tensor([tokenizer.encode("OMEO: But ")])
with torch.no_grad():
    out = model(inputs, targets=targets)
step0_loss = out.loss.item()
print("logits", tuple(out.logits.shape), f"std {out.logits.std():.3f};",
      f"loss {step0_loss:.3f} vs ln(V) = {math.log(V):.3f}")
print(f"{model.num_parameters():,} parameters, {model.flops_per_token():,.0f} training FLOPs per token")"""),
    ("md", """## 11. The mask with a KV cache

Generating, the model keeps the keys and values of the P tokens it has seen and feeds only the T
new ones. Query i (of the new tokens) sits at position P + i, so it may see keys 0..P + i: the
visible region is a triangle aligned to the **bottom-right**. `scaled_dot_product_attention(is_causal=True)`
aligns its triangle to the top-left, which hides cached tokens from the new ones; the toolkit
builds the mask from positions instead. Below, P = 3 and T = 2, and the logits each mask gives."""),
    ("code", """import gpt.model as gm

P, Tn = 3, 2
positions = torch.arange(P + Tn).expand(1, -1)
right_mask = gm.attention_mask_from_positions(positions[:, P:], positions, None)[0, 0]
top_left = torch.ones(Tn, P + Tn, dtype=torch.bool).tril()
print("from positions (toolkit):\\n", right_mask.int().numpy(), "\\nis_causal=True:\\n", top_left.int().numpy())
seq = torch.tensor([tokenizer.encode("ROMEO")])
with torch.no_grad():
    full = model(seq).logits[:, P:]
    cached = model(seq[:, P:], past=model(seq[:, :P], use_cache=True).present).logits
    real = gm.attention_mask_from_positions
    gm.attention_mask_from_positions = lambda q, k, valid: top_left[None, None].expand(q.shape[0], 1, -1, -1)
    try:
        wrong = model(seq[:, P:], past=model(seq[:, :P], use_cache=True).present).logits
    finally:
        gm.attention_mask_from_positions = real
print(f"max |logit error| with a cache: positions mask {(cached - full).abs().max():.1e}, "
      f"top-left triangle {(wrong - full).abs().max():.1e}")"""),
    ("md", """## 12. A short training run

The toolkit's own training loop (`launch.train`): AdamW with warmup and cosine decay, evaluation
on held-out text (at step 0 too), checkpoints. 300 steps of a small model take well under a
minute on a CPU (`configs/shakespeare_char_cpu.yaml` goes further: 1.851 after 480 steps with Muon). The
plot marks the uniform guess and the bigram baseline."""),
    ("code", """from launch.plot import plot_losses
from launch.train import main, setup


def train(name, *overrides):
    run_config, start = setup(str(ROOT / "configs" / "tiny.yaml"), [f"--train.out_dir={OUT / name}", *overrides],
                              resume=False)
    return main(run_config, start)


result = train("walkthrough", "--model.block_size=64", "--model.embedding_dim=64", "--train.batch_size=16",
               "--train.max_iters=300", "--train.eval_interval=100", "--train.checkpoint_interval=300",
               "--train.log_interval=100")
trained_loss = result.metrics["val_loss"]
print(f"\\nval loss {trained_loss:.3f} after {result.metrics['step']} steps; bigram {bigram_loss:.3f}; "
      f"ln V {math.log(V):.3f}")"""),
    ("code", """references = {"uniform guess, ln V": math.log(V), "bigram": bigram_loss}
display(Image(filename=str(plot_losses(OUT / "walkthrough", references=references))))"""),
    ("md", """## 13. Dropout and overfitting

On a small text a model soon learns the training set by heart: its training loss keeps falling
while the validation loss stalls. Dropout (zeroing a random fraction of activations during
training) makes memorising harder. Two short runs on 20,000 characters, without and with dropout:
compare the gap between train and validation loss. Dropout narrows it; in a run this short it
also slows learning, so its validation loss need not be lower yet. (The CPU configs use no
dropout: the whole TinyShakespeare is large enough for their short runs. The GPU config, which
passes over the text about 80 times, uses 0.2.)"""),
    ("code", """small = OUT / "small.txt"
small.write_text(text[:20_000])
gaps = {}
for dropout in (0.0, 0.2):
    r = train(f"dropout{dropout}", f"--data.path={small}", "--data.val_fraction=0.25", "--model.block_size=64",
              "--model.embedding_dim=64", f"--model.dropout={dropout}", "--train.batch_size=32",
              "--train.max_iters=250", "--train.eval_interval=250", "--train.checkpoint_interval=250",
              "--train.log_interval=250", "--train.eval_iters=8")
    gaps[dropout] = r.metrics["val_loss"] - r.metrics["eval_train_loss"]
    print(f"dropout {dropout}: train {r.metrics['eval_train_loss']:.3f}, val {r.metrics['val_loss']:.3f}, "
          f"gap {gaps[dropout]:.3f}")"""),
    ("md", """## 14. Generation

Generation feeds the model its own output, one character at a time. The KV cache keeps the keys
and values of earlier positions, so each step costs one position instead of the whole context;
recomputing the whole window every step (`generate_uncached`) gives the same tokens. Past
`block_size` both keep the last half of the window and continue (the tutorial slides a full
window instead: one full recomputation per token)."""),
    ("code", """from gpt.generate import generate, generate_uncached
from gpt.sampling import SamplingParams

trained = result.model.eval()
prompt = tokenizer.encode("ROMEO:")
params = SamplingParams(temperature=0.8, top_k=40)
tokens = list(generate(trained, prompt, 200, params, seed=1))
assert tokens == list(generate_uncached(trained, prompt, 200, params, seed=1))
print("ROMEO:" + tokenizer.decode(tokens))"""),
    ("md", """## 15. What the trained model attends to

Each panel is one head: row i shows how the character at position i spreads its attention over
itself and the characters before it (grey: the masked future, which it cannot see). Look for
heads that attend to the previous character (a bright line just below the diagonal), heads that
stay on the current one (the diagonal), and heads that look back to the start of a word or line.
`python -m gpt.pictures RUN_DIR --text ... --out attn.png` draws the same for any run."""),
    ("code", """from gpt.pictures import attention_weights, plot_attention

sample = "ROMEO: But soft, what light"
weights = attention_weights(trained, torch.tensor([tokenizer.encode(sample)]))
display(Image(filename=str(plot_attention(weights, sample, OUT / "attention.png"))))"""),
    ("md", """## 16. What the position embeddings learned

Cosine similarity between the position vectors of every two positions, for the untrained model
and the trained one. Untrained, positions are unrelated random vectors: only the diagonal (each
position with itself) is similar. After 300 steps, neighbouring positions have become more alike
than unrelated ones (the printed mean), and the early positions of the window have drifted apart
from the later ones, which a model uses to know how much context it has."""),
    ("code", """from gpt.pictures import plot_positions, position_similarity

untrained = GPT(trained.config)
band = lambda m: torch.diagonal(position_similarity(m), 1).mean().item()  # noqa: E731
print(f"mean similarity of neighbouring positions: untrained {band(untrained):.2f}, trained {band(trained):.2f}")
display(Image(filename=str(plot_positions({"untrained": untrained, "trained": trained}, OUT / "positions.png"))))"""),
    ("code", """# the figures the text above quotes, checked (tests/test_teach.py reads this line)
print(f"CHECK vocab={V} step0_loss={step0_loss:.4f} ln_v={math.log(V):.4f} head_gap={gap:.4f} "
      f"bigram={bigram_loss:.4f} trained={trained_loss:.4f} gap_no_dropout={gaps[0.0]:.4f} "
      f"gap_dropout={gaps[0.2]:.4f}")"""),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


if __name__ == "__main__":
    import time

    path = Path(__file__).with_name("walkthrough.ipynb")
    started = time.perf_counter()
    nb = execute(build(), path.parent.parent)
    for cell in nb.cells:  # keep the file stable between runs: no timings or execution metadata
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)
    print(f"wrote {path} (executed in {time.perf_counter() - started:.0f} s)")
