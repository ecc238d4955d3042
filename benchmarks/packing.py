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

from benchmarks.arguments import positive_int, writable_out
from job.data.instructions import PROMPT_STYLES, Collator, Example, load_entries, split_entries, tokenize
from job.data.order import SeededOrder
from job.data.packing import Packer
from job.models.gpt2 import GPTConfig, GPTModel, document_mask, gpt2_config
from job.models.tokenizer import load_tokenizer
from job.training.objectives import PackedSFTObjective, SFTObjective

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


def alpaca_like(count: int, seed: int) -> list[Example]:
    """Sequences with a long tail like Alpaca's 52k under the Alpaca prompt and GPT-2's tokenizer, synthesised
    (the data is not here): lengths log-normal with a median of 150 tokens and sigma 0.6 (mean about 180),
    clipped to 45..1024; token ids random, the prompt the first half."""
    g = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(count, generator=g) * 0.6 + torch.log(torch.tensor(150.0))).exp().clamp(45, 1024)
    return [Example(torch.randint(0, 50257, (int(n),), generator=g).tolist(), int(n) // 2) for n in lengths]


def measure_steps(model_cfg: GPTConfig, objective, batches: list[list[int]], repeats: int) -> dict:
    """Training steps (forward, backward, fused AdamW) over ``batches`` after one warm-up step: real tokens
    per second, the padding fraction of the positions computed, real tokens per step."""
    torch.manual_seed(123)
    model = GPTModel(model_cfg).train()
    model.untie_head()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1, fused=True)

    def step(batch):
        (objective.loss_sum(model, batch, torch.device("cpu")) / objective.units(batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches[1:]:
            step(batch)
        times.append(time.perf_counter() - started)
    real = sum(objective.real_tokens(b) for b in batches[1:])
    computed = sum(objective.positions(b) for b in batches[1:])
    return {
        "real_tokens_per_second": round(real / statistics.median(times), 1),
        "padding_fraction": round(1 - real / computed, 4),
        "real_tokens_per_step": round(real / (len(batches) - 1), 1),
        "steps": len(batches) - 1,
    }


class Padded(SFTObjective):
    def real_tokens(self, batch):
        return sum(min(len(self.train[i].token_ids), self.max_length) for i in batch)

    def positions(self, batch):
        return self.collate([self.train[i] for i in batch])[0].numel()


class Packed(PackedSFTObjective):
    def real_tokens(self, batch):
        return self.tokens(batch)

    def positions(self, batch):
        return self.packer(batch).inputs.numel()


def measure_training(name, examples, batch_size, pack_length, steps, model_cfg, repeats) -> dict:
    """Padded batches of ``batch_size`` sequences against packed rows at about the same real tokens per step."""
    collate = Collator(1024, False)
    padded = Padded(examples, collate, 1024)
    packed = Packed(Packer(examples, collate, pack_length, seed=123))
    real_per_sequence = sum(padded.real_tokens([i]) for i in range(len(examples))) / len(examples)
    real_per_row = packed.tokens(list(range(len(packed.packer.rows)))) / len(packed.packer.rows)
    rows = max(1, round(batch_size * real_per_sequence / real_per_row))
    figures = {"data": name, "batch_size": batch_size, "pack_length": pack_length, "rows_per_step": rows}
    for kind, objective, size, n in (("padded", padded, batch_size, len(examples)), ("packed", packed, rows, None)):
        order = SeededOrder(n or len(packed.packer.rows), size, 1, seed=123).epoch_batches(0)
        figures[kind] = measure_steps(model_cfg, objective, order[: steps + 1], repeats)
        print(name, batch_size, kind, json.dumps(figures[kind]), flush=True)
    figures["packed_vs_padded"] = round(
        figures["packed"]["real_tokens_per_second"] / figures["padded"]["real_tokens_per_second"], 2
    )
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks packing", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps: checks the harness")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--layers", type=int, default=None, help="blocks of the measured model (default 12)")
    parser.add_argument(
        "--steps", type=positive_int, default=3, help="timed training steps per case (after one warm-up)"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=None, help="repeats of each figure (default 5, quick 1)"
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    examples = book_examples(args.data_dir)
    out = writable_out(
        parser, args.out or REPO / "benchmarks" / f"results-cpu-packing{'-quick' if args.quick else ''}.json"
    )
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "attention": [], "training": []}
    for pack_length, rows in ((256, 2),) if args.quick else ((1024, 2), (256, 8)):
        report["attention"].append(measure_attention(examples, pack_length, rows, repeats))
        print(json.dumps(report["attention"][-1]), flush=True)
        out.write_text(json.dumps(report, indent=2) + "\n")  # after each figure: a cut-off run keeps its own
    model_cfg = gpt2_config("gpt2-small") if not args.quick else GPTConfig(emb_dim=64, n_heads=4, n_layers=2)
    if args.layers:  # GPT-2 small's width with fewer blocks: a loaded machine's budget
        model_cfg = GPTConfig(**{**model_cfg.__dict__, "n_layers": args.layers})
    report["model"] = model_cfg.__dict__
    steps = 1 if args.quick else args.steps
    cases = [("book", examples, 8, 256), ("book", examples, 32, 256), ("alpaca-like", alpaca_like(2000, 7), 8, 1024)]
    for name, data, batch_size, pack_length in cases:
        # one timing of --steps steps each: a step of gpt2-small at batch 32 takes seconds on 2 cores
        report["training"].append(measure_training(name, data, batch_size, pack_length, steps, model_cfg, 1))
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
