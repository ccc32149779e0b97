"""Data and model for benchmarks/lm_convergence.py: byte-level text that ships with CPython, and
a small decoder-only transformer written with plain torch modules."""

import math
import random
import sysconfig
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.nn import functional as F

SPLIT_SEED = 0  # the train/validation split by file; never changes with the run seed
VALIDATION_FRACTION = 0.1


def _split(names: List[str]) -> Tuple[List[str], List[str]]:
    """Sorted names, shuffled with a fixed seed: the first 10% validate, the rest train. The
    result depends only on the names, never on the machine's file-system order."""
    names = sorted(names)
    random.Random(SPLIT_SEED).shuffle(names)
    cut = max(1, round(VALIDATION_FRACTION * len(names)))
    return sorted(names[cut:]), sorted(names[:cut])


def _join(parts: List[bytes]) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8).clone()


def stdlib_corpus() -> Dict[str, object]:
    """The standard library's own .py sources (site-packages excluded), split by file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    ]
    if len(names) < 10:
        raise RuntimeError(
            f"found only {len(names)} .py files under {root}; need the stdlib sources"
        )
    train, val = _split(names)
    return {
        "name": f"CPython stdlib .py sources ({root})",
        "train": _join([(root / n).read_bytes() for n in train]),
        "val": _join([(root / n).read_bytes() for n in val]),
        "units": f"{len(train)} / {len(val)} files",
    }


def topics_corpus() -> Dict[str, object]:
    """pydoc_data.topics (the reference text behind help('topic')), split by topic."""
    from pydoc_data.topics import topics

    train, val = _split(list(topics))
    return {
        "name": "pydoc_data.topics",
        "train": _join([topics[n].encode("utf-8") for n in train]),
        "val": _join([topics[n].encode("utf-8") for n in val]),
        "units": f"{len(train)} / {len(val)} topics",
    }


CORPORA = {"stdlib": stdlib_corpus, "topics": topics_corpus}


def batch_starts(length: int, context: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, length - context - 1, (batch,), generator=generator)


def windows(
    data: torch.Tensor, starts: torch.Tensor, context: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets, (B, context) each, as int64."""
    index = starts[:, None] + torch.arange(context + 1)[None, :]
    chunk = data[index].long()
    return chunk[:, :-1], chunk[:, 1:]


class Block(nn.Module):
    """Pre-LayerNorm block: causal self-attention with separate square q, k, v and output
    projections, then a 4x MLP (GELU). Every Linear has a bias: 1-D parameters beside the
    LayerNorm vectors, as in GPT-2."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (
            m(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for m in (self.q, self.k, self.v)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class ByteLM(nn.Module):
    """(B, T) bytes -> (B, T, 256) next-byte logits. Learned token and position embeddings; the
    output layer is the token embedding, transposed (tied, as in GPT-2)."""

    def __init__(self, layers: int, d: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        # GPT-2's initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2L)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = (
                    0.02 / math.sqrt(2 * layers)
                    if name.endswith(("o.weight", "proj.weight"))
                    else 0.02
                )
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h) @ self.tok.weight.T


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, object]]:
    """Weight decay on the matrices (projections and embeddings), none on the 1-D parameters
    (LayerNorm gains and biases, every bias): the usual GPT recipe. Both groups go to the one
    optimizer; the same groups for every optimizer."""
    params = list(model.parameters())  # the tied embedding appears once
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
