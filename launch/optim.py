"""The optimizers: AdamW (nanoGPT's), or Muon for the blocks' matrices with AdamW for the rest.

    make_optimizers()   the optimizers for train.optimizer, as a list (AdamW alone, or Muon then AdamW),
                        each group carrying its peak `base_lr`, which the schedule scales every step
    Muon                torch.optim.Muon's algorithm (momentum, Nesterov, Newton–Schulz
                        orthogonalisation, "match_rms_adamw" learning-rate scaling), written here so that:
                        - the iteration runs in fp32 on a CPU and bf16 on CUDA (torch's is bf16 always,
                          about 30x slower per step on a CPU without bf16 hardware);
                        - matrices of the same shape are orthogonalised together, one batched matmul per
                          shape, instead of one small matmul at a time.
                        Its state (one momentum buffer per matrix) is a plain optimizer state dict, which
                        Accelerate saves in every checkpoint. Under DDP every rank sees the same averaged
                        gradient and computes the same update, so the weights stay identical.

Muon (Jordan et al., 2024, https://kellerjordan.github.io/posts/muon/) updates a weight matrix by the
orthogonalised momentum of its gradient: roughly U V^T of its SVD, found by five steps of a quintic
Newton–Schulz iteration. It suits the hidden matrices; embeddings, the LM head, LayerNorm gains and
biases stay on AdamW, as in the modded-nanogpt records and nanochat.
"""

from __future__ import annotations

import math
from collections import defaultdict
from itertools import chain

import torch

from launch.sharding import local

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (Keller Jordan's quintic)
NS_STEPS = 5
EPS = 1e-7


def newton_schulz(updates: torch.Tensor, dtype: torch.dtype, steps: int = NS_STEPS) -> torch.Tensor:
    """Orthogonalise a batch of same-shape matrices (n, A, B) as torch.optim.Muon does one at a time:
    each scaled to Frobenius norm 1, then `steps` quintic iterations, in `dtype`."""
    a, b, c = NS_COEFFICIENTS
    x = updates.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=EPS)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def adjusted_lr(lr: float, shape: torch.Size) -> float:
    """torch.optim.Muon's "match_rms_adamw": an update as large (RMS) as AdamW's would be, so Muon
    takes AdamW's learning rates."""
    return lr * 0.2 * math.sqrt(max(shape[0], shape[1]))


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters (see the module's note); `dtype`: the Newton–Schulz iteration's."""

    def __init__(self, params, lr: float, momentum: float = 0.95, weight_decay: float = 0.0, nesterov: bool = True,
                 dtype: torch.dtype = torch.float32):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov})
        self.dtype = dtype
        for group in self.param_groups:
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon takes 2-D matrices only; give the others to AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            by_shape: dict[tuple, list] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)  # a DTensor for a sharded p
                buf, grad = local(state["momentum_buffer"]), local(p.grad)
                buf.lerp_(grad, 1 - group["momentum"])
                update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                by_shape[tuple(p.shape)].append((p, update))
            wholes = gather_whole(list(chain(*by_shape.values())))  # one collective for all, when sharded
            for shape, pairs in by_shape.items():
                ortho = newton_schulz(torch.stack([wholes[id(p)] for p, _ in pairs]), self.dtype)
                lr = adjusted_lr(group["lr"], torch.Size(shape))
                for (p, _), o in zip(pairs, ortho):
                    mine = local(p)
                    mine.mul_(1 - group["lr"] * group["weight_decay"])
                    mine.add_(own_rows(p, o).to(mine.dtype), alpha=-lr)
        return loss


# Under FSDP2 (launch/sharding.py) a parameter, its gradient and its momentum are DTensors split by
# rows over the ranks. Newton–Schulz needs the whole matrix: each rank gathers the whole update,
# orthogonalises it (the same on every rank) and applies its own rows.

def gather_whole(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """{id(p): the whole update matrix} from (p, this rank's rows of its update) pairs. Sharded, every
    rank's rows of all the matrices travel in one all-gather (each padded to FSDP2's chunk of
    ceil(rows / ranks), as equal sizes must be), then are cut back into whole matrices."""
    if not pairs or not hasattr(pairs[0][0], "to_local"):
        return {id(p): u for p, u in pairs}
    import torch.distributed as dist

    mesh = pairs[0][0].device_mesh
    world = mesh.size()
    chunks = [-(-p.shape[0] // world) for p, _ in pairs]
    send = torch.cat([torch.nn.functional.pad(u, (0, 0, 0, c - u.shape[0])).reshape(-1)
                      for (_, u), c in zip(pairs, chunks)])
    received = torch.empty(world * send.numel(), dtype=send.dtype, device=send.device)
    dist.all_gather_single(received, send, group=mesh.get_group())
    per_rank = received.view(world, -1)
    out, offset = {}, 0
    for (p, _), c in zip(pairs, chunks):
        n, width = p.shape
        block = per_rank[:, offset:offset + c * width].reshape(world * c, width)  # rank r's chunk at rows r*c
        out[id(p)] = block[:n]  # the padding of the last chunks lies past row n
        offset += c * width
    return out


def own_rows(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a whole matrix, as FSDP2 splits them (torch.chunk along dim 0)."""
    if not hasattr(p, "to_local"):
        return full
    n, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    start = rank * -(-p.shape[0] // n)
    return full[start:start + p.to_local().shape[0]]


def muon_dtype(device: torch.device) -> torch.dtype:
    """bf16 where matmuls are fast in it (CUDA), fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def make_optimizers(model, train, device: torch.device) -> list[torch.optim.Optimizer]:
    """train.optimizer "adamw": nanoGPT's AdamW (matrices and embeddings decayed, gains and biases
    not). "muon": the blocks' 2-D matrices on Muon (train.learning_rate, train.weight_decay,
    train.muon_momentum), then AdamW for the embeddings and head (train.embedding_lr,
    train.embedding_weight_decay) and for gains and biases (train.scalar_lr, no decay)."""
    betas = (train.beta1, train.beta2)
    if train.optimizer == "adamw":
        groups = model.optimizer_groups(train.weight_decay)
        for g in groups:
            g["base_lr"] = train.learning_rate
        # fused AdamW: one kernel for all parameters, on CUDA and (since torch 2.4) on CPU
        return [torch.optim.AdamW(groups, lr=train.learning_rate, betas=betas, fused=True)]
    matrices, embeddings, scalars, seen = [], [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # a tied head is the embedding: once
            continue
        seen.add(id(p))
        if name.startswith("blocks.") and p.dim() == 2:
            matrices.append(p)
        elif p.dim() >= 2:
            embeddings.append(p)
        else:
            scalars.append(p)
    embedding_lr = train.embedding_lr if train.embedding_lr is not None else train.learning_rate
    scalar_lr = train.scalar_lr if train.scalar_lr is not None else train.learning_rate
    embedding_wd = train.embedding_weight_decay if train.embedding_weight_decay is not None else train.weight_decay
    muon = Muon([{"params": matrices, "base_lr": train.learning_rate}], lr=train.learning_rate,
                momentum=train.muon_momentum, weight_decay=train.weight_decay, dtype=muon_dtype(device))
    adamw = torch.optim.AdamW([{"params": embeddings, "weight_decay": embedding_wd, "base_lr": embedding_lr},
                               {"params": scalars, "weight_decay": 0.0, "base_lr": scalar_lr}],
                              lr=embedding_lr, betas=betas, fused=True)
    return [muon, adamw]


def set_lr(optimizers: list[torch.optim.Optimizer], scale: float) -> None:
    """Each group at its peak learning rate times the schedule's factor for this step."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale
