"""python -m benchmarks sharding [--quick] [--out FILE]: ``--sharding fsdp``'s memory and speed on the CPU, in one call.

1. Memory: the gpt2-medium and qwen3-0.6b shapes (random weights, fp32) trained one step on 1, 2 and 4
   processes over gloo with the job's own ``shard_model`` (``fully_shard`` per block and the root) and fused
   AdamW, as ``place_model`` does for ``--sharding fsdp``: each process's bytes of weights, gradients and
   AdamW's state, counted from the storage its local shards hold (padding included) after that real step,
   against the 1/N ideal of the one-process figure; and each process's peak RSS (``ru_maxrss``), at each
   phase (torch imported, the whole model built, sharded, after the step).
2. Speed: the step time (forward, backward, AdamW) of ``fsdp`` against ``ddp`` (torch's
   ``DistributedDataParallel``, what ``accelerator.prepare`` wraps the model in) at 2 processes, in the same
   call, as a ratio: the median of a few steps after a warm-up, every process on its own batch.

Every process builds the whole model before sharding it, as the job does, so the load's peak is the whole
model's. A configuration runs only when MemAvailable holds ``--headroom`` times its estimated need (the
machine is shared), one at a time; one that does not fit is reported as such, not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.arguments import finite_non_negative, positive_int, writable_out
from job.models.gpt2 import GPTConfig, GPTModel, gpt2_config
from job.models.llama import LlamaConfig, LlamaModel
from job.models.registry import model_entry

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
# Qwen/Qwen3-0.6B-Base's config.json (the registry names the repository; its config states the shape)
QWEN3_06B = {
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
# --quick: the same families at a few MB, so the harness is checked in seconds
TINY = {
    "gpt2-medium": GPTConfig(vocab_size=1024, context_length=128, emb_dim=64, n_heads=4, n_layers=2),
    "qwen3-0.6b": QWEN3_06B
    | {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "head_dim": 16},
}
BASE_RSS = 0.35 * GIB  # a process with torch imported, before any model (measured: 0.32 GiB)


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration: a model shape on ``processes`` processes, sharded (``fsdp``) or replicated (``ddp``)."""

    model: str
    processes: int
    sharding: str
    layers: int | None = None  # the shape with fewer blocks (a step-time case that must fit the machine)
    quick: bool = False
    timed_steps: int = 0  # steps timed after the counted one (0: memory only)
    batch: int = 2
    tokens: int = 64

    @property
    def label(self) -> str:
        depth = f"/{self.layers}" if self.layers else ""
        return f"{self.model}{depth} {self.sharding} x{self.processes}"


def build_model(case: Case) -> nn.Module:
    """The shape's model with random weights, as the job builds it: a GPT-2 size from its registry shape with
    its head untied (``choose_trained``'s default, the book's way), a Qwen3 from its config.json's fields."""
    family = model_entry(case.model).family
    if family == "gpt2":
        cfg = TINY[case.model] if case.quick else gpt2_config(case.model)
        if case.layers:
            cfg = GPTConfig(**{**cfg.__dict__, "n_layers": case.layers})
        model = GPTModel(cfg)
        model.untie_head()
        return model
    config = TINY[case.model] if case.quick else QWEN3_06B
    if case.layers:
        config = config | {"num_hidden_layers": case.layers}
    return LlamaModel(LlamaConfig.from_hf(config))


def parameter_count(case: Case) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(case).parameters())


def estimated_need(case: Case) -> int:
    """Bytes the whole configuration may hold at its peak, all processes together: each process its shards of
    weights, gradients and AdamW's two moments (16 / N bytes a parameter) and up to 4 more for the whole model
    it builds before sharding and what the step gathers (gpt2-medium measured 17.0, 10.1 and 7.2 bytes a
    parameter at 1, 2 and 4 processes); ddp holds all 16 and DDP's gradient buckets (4 more)."""
    n, params = case.processes, parameter_count(case)
    per_process = 20 * params if case.sharding == "ddp" else 16 * params / n + 4 * params
    return int(n * (BASE_RSS + per_process))


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def held_bytes(tensors) -> int:
    """Bytes of the storage behind ``tensors`` (a DTensor's local shard, its padding included), each once."""
    from torch.distributed.tensor import DTensor

    storages = {}
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        storage = local.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def place(case: Case, model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``place_model``'s path: fsdp shards the model with the job's ``shard_model`` (fp32 on the CPU) and AdamW
    holds the shards; ddp wraps it in DDP as accelerate does. Fused AdamW either way, the job's settings."""
    from job.training.sharding import shard_model

    if case.sharding == "fsdp":
        shard_model(model, torch.device("cpu"), bf16=False)
        wrapped = model
    else:
        wrapped = nn.parallel.DistributedDataParallel(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return wrapped, torch.optim.AdamW(trainable, lr=5e-5, weight_decay=0.1, fused=True)


def random_batch(case: Case, vocab_size: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + rank)  # each process its own batch, as data parallelism has
    ids = torch.randint(0, vocab_size, (case.batch, case.tokens + 1), generator=generator)
    return ids[:, :-1], ids[:, 1:]


def worker(rank: int, case: Case, port: int, threads: int, out_dir: str) -> None:
    """One process of ``case``: build, place, one counted step, then the timed steps; its figures to a file."""
    import torch.distributed as dist

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=case.processes)
    torch.set_num_threads(threads)
    figures = {"rank": rank, "rss_peak_imported": peak_rss()}
    torch.manual_seed(123)  # the same weights on every process, as a loaded checkpoint gives
    model = build_model(case).train()
    figures["rss_peak_built"] = peak_rss()
    wrapped, optimizer = place(case, model)
    figures["rss_peak_placed"] = peak_rss()
    inputs, targets = random_batch(case, model.lm_head.out_features, rank)

    def step(count: bool) -> float:
        started = time.perf_counter()
        loss = wrapped(inputs, targets=targets, reduction="sum") / targets.numel()
        loss.backward()
        if count:  # the gradients as the optimizer gets them, before zero_grad frees them
            figures["gradient_bytes"] = held_bytes(p.grad for p in model.parameters() if p.grad is not None)
        optimizer.step()
        if count:
            figures["weight_bytes"] = held_bytes(model.parameters())
            figures["optimizer_bytes"] = held_bytes(t for s in optimizer.state.values() for t in s.values())
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    figures["first_step_seconds"] = step(count=True)  # also the warm-up of the timed steps
    figures["step_seconds"] = [step(count=False) for _ in range(case.timed_steps)]
    figures |= {"rss_peak": peak_rss(), "rss_after_step": current_rss()}
    dist.barrier()
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(figures))


def run_case(case: Case, headroom: float, wait: float) -> dict:
    """``case`` on its processes (spawned, one at a time) once ``headroom`` times its need is free (waiting up
    to ``wait`` seconds for it), or why it was not run."""
    import torch.multiprocessing as mp

    need = estimated_need(case)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    deadline = time.monotonic() + (wait if headroom * need <= total else 0)  # no wait for what can never fit
    while (available := available_bytes()) < headroom * need and time.monotonic() < deadline:
        time.sleep(10)  # the machine is shared: others' runs end
    result = {"case": dataclasses.asdict(case), "parameters": parameter_count(case), "estimated_need_bytes": need}
    result["available_bytes_before"] = available
    if available < headroom * need:
        result["not_run"] = (
            f"did not fit: needs about {need / GIB:.1f} GiB, {available / GIB:.1f} GiB available, {headroom:g}x asked"
        )
        return result
    threads = max(1, (os.cpu_count() or 1) // case.processes)
    result["threads_per_process"] = threads
    with tempfile.TemporaryDirectory() as out_dir:
        started = time.perf_counter()
        try:
            mp.spawn(worker, args=(case, free_port(), threads, out_dir), nprocs=case.processes, join=True)
        except mp.ProcessExitedException as exc:  # the kernel's OOM killer's SIGKILL: reported, the others run
            result["not_run"] = f"a process ended by signal {exc.signal_name} (out of memory?): {exc}"
            return result
        result["wall_seconds"] = time.perf_counter() - started
        result["processes"] = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(case.processes)]
    return result


def memory_table(results: list[dict]) -> list[dict]:
    """Each fsdp memory case's per-process figures (the largest over its processes) against 1/N of the same
    model's one-process figure."""
    ones = {r["case"]["model"]: r for r in results if r["case"]["processes"] == 1 and "processes" in r}
    rows = []
    for result in results:
        case = result["case"]
        row = {"model": case["model"], "processes": case["processes"], "parameters": result["parameters"]}
        if "not_run" in result:
            rows.append(row | {"not_run": result["not_run"]})
            continue
        procs, one = result["processes"], ones.get(case["model"])
        for kind in ("weight", "gradient", "optimizer"):
            largest = max(p[f"{kind}_bytes"] for p in procs)
            row[f"{kind}_bytes"] = largest
            row[f"{kind}_bytes_per_parameter"] = largest / result["parameters"]
            if one:
                row[f"{kind}_vs_ideal"] = largest / (one["processes"][0][f"{kind}_bytes"] / case["processes"])
        for phase in ("imported", "built", "placed"):
            row[f"rss_peak_{phase}"] = max(p[f"rss_peak_{phase}"] for p in procs)
        row["rss_peak"] = max(p["rss_peak"] for p in procs)
        row["rss_after_step"] = max(p["rss_after_step"] for p in procs)
        if one:
            row["rss_peak_vs_ideal"] = row["rss_peak"] / (one["processes"][0]["rss_peak"] / case["processes"])
        rows.append(row)
    return rows


def step_seconds(result: dict) -> float | None:
    """The median over the timed steps of the slowest process's time (a step ends when every process's does)."""
    if "processes" not in result:
        return None
    per_step = zip(*(p["step_seconds"] for p in result["processes"]), strict=True)
    return statistics.median(max(times) for times in per_step)


def speed_table(results: list[dict]) -> list[dict]:
    """fsdp's step time over ddp's, per shape, at the same world size and in the same call."""
    by_shape: dict[tuple, dict] = {}
    for result in results:
        case = result["case"]
        shape = (case["model"], case["layers"], case["processes"])
        by_shape.setdefault(shape, {})[case["sharding"]] = result
    rows = []
    for (model, layers, processes), pair in by_shape.items():
        parameters = next(iter(pair.values()))["parameters"]
        row = {"model": model, "layers": layers, "processes": processes, "parameters": parameters}
        for kind, result in pair.items():
            row[f"{kind}_step_seconds"] = step_seconds(result)
            if "not_run" in result:
                row[f"{kind}_not_run"] = result["not_run"]
            else:
                row[f"{kind}_rss_peak"] = max(p["rss_peak"] for p in result["processes"])
        if row.get("fsdp_step_seconds") and row.get("ddp_step_seconds"):
            row["fsdp_over_ddp"] = row["fsdp_step_seconds"] / row["ddp_step_seconds"]
        rows.append(row)
    return rows


def plan(quick: bool, steps: int, models=("gpt2-medium", "qwen3-0.6b")) -> tuple[list[Case], list[Case]]:
    """The memory cases (fsdp on 1, 2 and 4 processes) of ``models`` and the speed cases (fsdp and ddp on 2)."""
    # quick: 1 and 2 processes, one speed pair (each start of a process costs seconds on a busy machine)
    memory = [Case(m, n, "fsdp", quick=quick) for m in models for n in ((1, 2) if quick else (1, 2, 4))]
    # ddp on the full shapes holds 20 bytes a parameter in each of 2 processes (15 and 22 GiB): more than a shared
    # 24 GiB machine has, so the pair is timed on the same widths with fewer blocks
    depths = [(models[0], None)] if quick else [("gpt2-medium", 8), ("qwen3-0.6b", 4)]
    speed = [Case(m, 2, kind, layers, quick, steps) for m, layers in depths for kind in ("ddp", "fsdp")]
    return memory, speed


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count()}
    with open("/proc/cpuinfo") as cpuinfo:
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "")
    info["total_memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks sharding", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes of both families: checks the harness")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the figures (its folder must exist)")
    parser.add_argument(
        "--steps", type=positive_int, default=3, help="timed steps of each speed case, after one warm-up"
    )
    parser.add_argument(
        "--headroom", type=finite_non_negative, default=2.0, help="run a case only with this many times its need free"
    )
    parser.add_argument(
        "--wait", type=finite_non_negative, default=600, help="seconds a case waits for its memory to be free"
    )
    parser.add_argument(
        "--memory-models", nargs="+", choices=["gpt2-medium", "qwen3-0.6b"], default=["gpt2-medium", "qwen3-0.6b"]
    )
    parser.add_argument("--only", choices=["memory", "speed"], default=None)
    args = parser.parse_args(argv)
    out = writable_out(
        parser, args.out or REPO / "benchmarks" / f"results-cpu-sharding{'-quick' if args.quick else ''}.json"
    )
    memory, speed = plan(args.quick, args.steps, tuple(args.memory_models))
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": ["sharding", *(argv or [])]}
    report |= {"load_average_before": os.getloadavg(), "memory": [], "speed": []}
    for section, cases in (("memory", memory), ("speed", speed)):
        if args.only and args.only != section:
            continue
        for case in cases:
            report[section].append(run_case(case, args.headroom, args.wait))
            done = report[section][-1]
            print(case.label, done.get("not_run") or f"{done['wall_seconds']:.1f} s", flush=True)
            report["load_average_after"] = os.getloadavg()
            report["memory_table"], report["speed_table"] = memory_table(report["memory"]), speed_table(report["speed"])
            out.write_text(json.dumps(report, indent=2) + "\n")  # after each case: a cut-off run keeps its own
    print(json.dumps({"memory": report["memory_table"], "speed": report["speed_table"]}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
