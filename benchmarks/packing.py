"""python -m benchmarks packing [--quick]: ``--packing`` on the CPU, in one call.

1. Attention within documents (forward and backward at GPT-2 small's heads, on rows packed from the book's
   data): SDPA with the boolean block-diagonal causal mask, SDPA with the same mask additive (float), one SDPA
   call per sequence (what a variable-length kernel computes, in a loop), FlexAttention's document mask and
   ``torch.nn.attention.varlen``'s kernel where the CPU runs them; SDPA's plain causal attention on the same
   sequences padded, for scale.
2. Training steps (the finetune stage's objectives, forward, backward and AdamW) packed against padded at about
   the same real tokens per step: real tokens per second and the padding fraction of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from job.data.instructions import PROMPT_STYLES, Collator, Example, load_entries, split_entries, tokenize
from job.data.packing import Packer
from job.models.gpt2 import document_mask
from job.models.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent


def book_examples(data_dir: str) -> list[Example]:
    """The book's training split, tokenized as the finetune stage does (Alpaca style, GPT-2's tokenizer)."""
    tokenizer = load_tokenizer(Path(data_dir) / "gpt2")
    train = split_entries(load_entries(Path(data_dir) / "instruction-data.json"))[0]
    return tokenize(train, tokenizer, PROMPT_STYLES["alpaca"], 1024)


def median_ms(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 2)


def per_document(q, k, v, documents):
    """One causal SDPA call per sequence of each row (a variable-length kernel's work, in a Python loop)."""
    rows = []
    for b in range(q.shape[0]):
        counts = torch.unique_consecutive(documents[b], return_counts=True)[1].tolist()
        pieces = zip(*(t[b].split(counts, dim=1) for t in (q, k, v)), strict=True)  # each (H, L, hd)
        rows.append(torch.cat([F.scaled_dot_product_attention(*p, is_causal=True) for p in pieces], dim=1))
    return torch.stack(rows)


def attention_candidates() -> dict:
    """name -> f(q, k, v, documents): attention within documents on packed rows."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def sdpa_bool(q, k, v, documents):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(documents))

    def sdpa_float(q, k, v, documents):
        additive = torch.zeros(document_mask(documents).shape, dtype=q.dtype).masked_fill(
            ~document_mask(documents), float("-inf")
        )
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive)

    def flex(q, k, v, documents):
        def same_document(b, h, i, j):
            return (documents[b, i] == documents[b, j]) & (j <= i)

        B, _, T, _ = q.shape
        return flex_attention(q, k, v, block_mask=create_block_mask(same_document, B, None, T, T, device="cpu"))

    def varlen(q, k, v, documents):
        from torch.nn.attention.varlen import varlen_attn

        counts = torch.unique_consecutive(documents.flatten(), return_counts=True)[1]
        cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        flat = [t.transpose(1, 2).flatten(0, 1) for t in (q, k, v)]  # (B*T, H, hd)
        longest = int(counts.max())
        return varlen_attn(*flat, cu, cu, longest, longest, window_size=(-1, 0))

    return {"sdpa_bool_mask": sdpa_bool, "sdpa_float_mask": sdpa_float, "per_sequence_sdpa": per_document,
            "flex_attention": flex, "varlen_attn": varlen}  # fmt: skip


def measure_attention(examples: list[Example], pack_length: int, rows: int, repeats: int) -> dict:
    """Forward and backward of each candidate on ``rows`` packed rows (GPT-2 small's 12 heads of 64), in ms."""
    packer = Packer(examples, Collator(1024, False), pack_length, seed=123)
    batch = packer(list(range(rows)))
    members = [i for r in range(rows) for i in packer.rows[r]]
    torch.manual_seed(0)
    B, T = batch.inputs.shape
    qkv = [torch.randn(B, 12, T, 64, requires_grad=True) for _ in range(3)]
    figures = {"rows": rows, "pack_length": pack_length, "sequences": len(members)}
    for name, attend in attention_candidates().items():
        try:
            figures[name] = median_ms(lambda a=attend: a(*qkv, batch.documents).sum().backward(), repeats)
        except Exception as exc:  # noqa: BLE001  (a candidate the CPU cannot run is reported, not fatal)
            figures[name] = f"not on this CPU: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    longest = max(packer.lengths[i] for i in members)
    padded = [torch.randn(len(members), 12, longest, 64, requires_grad=True) for _ in range(3)]
    figures["padded_sdpa_causal"] = median_ms(
        lambda: F.scaled_dot_product_attention(*padded, is_causal=True).sum().backward(), repeats
    )
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks packing", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps: checks the harness")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else 5
    examples = book_examples(args.data_dir)
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "attention": []}
    for pack_length, rows in ((1024, 2), (256, 8)):
        report["attention"].append(measure_attention(examples, pack_length, rows, repeats))
        print(json.dumps(report["attention"][-1]), flush=True)
    out = args.out or REPO / "benchmarks" / f"results-cpu-packing{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
