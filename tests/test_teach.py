"""The teaching material: the notebook runs, the pictures are real PNGs, the hand-built head is exact."""

import struct
import subprocess
import sys
from xml.etree import ElementTree

import pytest
import torch

from conftest import ROOT, subprocess_env
from gpt.config import ModelConfig
from gpt.model import GPT
from gpt.pictures import attention_weights, head_by_hand


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_hand_built_head_matches_the_attention_module():
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=16, embedding_dim=32, num_heads=4, num_layers=2, vocab_size=65)).eval()
    x = torch.randn(2, 10, 32)
    attn = model.blocks[0].attn
    heads = [head_by_hand(attn, x, i) for i in range(4)]
    for weights, _ in heads:
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 10))
        assert (weights.triu(1) == 0).all()  # causal
    with torch.no_grad():
        by_hand = attn.proj(torch.cat([out for _, out in heads], dim=-1))
        module, _ = attn(x, None, None)
    torch.testing.assert_close(by_hand, module, atol=1e-5, rtol=0)
    assert attention_weights(model, torch.randint(0, 65, (1, 7))).shape == (2, 4, 7, 7)


def test_loss_curve_png(run_dir, tmp_path):
    out = tmp_path / "loss.png"
    proc = subprocess.run([sys.executable, "-m", "launch.plot", str(run_dir), "--out", str(out)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    width, height = png_size(out)
    assert 600 <= width <= 2000 and 400 <= height <= 1500
    svg = tmp_path / "loss.svg"  # the same curves without matplotlib, as training writes them
    assert subprocess.run([sys.executable, "-m", "launch.plot", str(run_dir), "--out", str(svg)], cwd=ROOT,
                          env=subprocess_env()).returncode == 0
    assert svg.read_text() == (run_dir / "loss.svg").read_text()  # training drew it at the end of the run
    root = ElementTree.fromstring(svg.read_text())  # well-formed, with a point per evaluation
    evaluations = sum("val_loss" in line for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    assert len(list(root.iter("{http://www.w3.org/2000/svg}circle"))) == 2 * evaluations >= 4


@pytest.mark.slow
def test_attention_and_position_pngs(run_dir, tmp_path, capsys):
    attn, pos = tmp_path / "attn.png", tmp_path / "pos.png"
    proc = subprocess.run([sys.executable, "-m", "gpt.pictures", str(run_dir), "--text", "ROMEO: But soft",
                           "--out", str(attn), "--positions-out", str(pos)], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    width, height = png_size(attn)
    assert 800 <= width <= 4000 and 400 <= height <= 4000  # 2 layers x 4 heads of 15 characters
    assert png_size(pos)[0] >= 400
    from gpt.pictures import run

    assert run([str(run_dir), "--text", "x" * 100]) == 2  # the command's own entry point, in this process
    assert capsys.readouterr().err == "error: --text must be 1 to 32 tokens (the model's block_size)\n"


def test_notebook_is_generated_from_its_source():
    sys.path.insert(0, str(ROOT / "notebooks"))
    import nbformat
    from make_walkthrough import build

    on_disk = nbformat.read(ROOT / "notebooks" / "walkthrough.ipynb", as_version=4)
    assert [c.source for c in on_disk.cells] == [c.source for c in build().cells], \
        "notebooks/walkthrough.ipynb is stale: run python notebooks/make_walkthrough.py"


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_and_its_figures_hold():
    import nbformat

    sys.path.insert(0, str(ROOT / "notebooks"))
    from make_walkthrough import build, execute

    nb = execute(build(), ROOT)
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "matches CausalSelfAttention" in outputs and "ROMEO:" in outputs
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # the qkv split, the loss curve, the attention maps, the position similarity
    check = dict(item.split("=") for item in outputs.split("CHECK ")[1].split())
    v = {k: float(x) for k, x in check.items()}
    assert v["vocab"] == 65
    assert abs(v["step0_loss"] - v["ln_v"]) < 0.1  # an untrained model guesses uniformly
    assert v["head_gap"] < 0.05  # an untrained head attends like tril / tril.sum(1)
    assert v["bigram"] > v["trained"]  # 300 steps of a transformer beat counting pairs
    assert v["gap_dropout"] < v["gap_no_dropout"]  # dropout narrows the train-validation gap
    committed = nbformat.read(ROOT / "notebooks" / "walkthrough.ipynb", as_version=4)
    shown = [o for c in committed.cells if c.cell_type == "code" for o in c.outputs]
    assert "CHECK vocab=65" in "".join(o.get("text", "") for o in shown) and \
        sum("image/png" in o.get("data", {}) for o in shown) == 4, \
        "the committed notebook lacks its outputs: run python notebooks/make_walkthrough.py"
