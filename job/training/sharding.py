"""``--sharding fsdp``: torch's FSDP2 (``fully_shard``) over every process, on the same training loop.

Each transformer block and then the root (embeddings, final norm, head) are sharded over all processes,
as torchtitan's ``apply_fsdp`` does: each process holds 1/N of every weight, of its gradient and of
AdamW's moments, and gathers a block's weights only while that block runs. accelerate still launches the
processes and chooses the devices; it only switches to its own FSDP plugin on GPU-like devices, so the
sharding is applied here, and CPU tests over gloo prove the path that GPUs run over NCCL.

Gradients are reduce-scattered as averages over the processes, as DDP all-reduces them, so the loop's
loss scale is the same; clipping takes the norm over every shard (a DTensor's norm is reduced over the
group); the final model is gathered onto the main process (``gathered_model``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def start_group(device: torch.device) -> None:
    """A process group of one where accelerate started none (a single process): fsdp then shards over
    that one process, so one process writes and reads the same sharded state as several do."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shard_model(model: nn.Module, device: torch.device, bf16: bool) -> None:
    """``fully_shard`` each block of ``model`` and then its root over every process of the default group
    (in place). ``bf16`` (CUDA): blocks compute in bf16 on fp32 master weights, gradients reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh} | ({"mp_policy": policy} if policy else {})
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every process calls it), a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def placed_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Whole ``tensor`` (the same on every process) as ``like`` holds it: this process's shard of it
    where ``like`` is a DTensor (cut here, nothing sent), else ``tensor`` itself."""
    if not isinstance(like, DTensor):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients to ``max_norm`` of their global 2-norm, over every process's shards (torchtitan's
    ``clip_grad_norm_``: the norm of DTensor gradients is reduced across the group before it scales them)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = full_tensor(torch.nn.utils.get_total_norm(grads, 2.0, foreach=True))
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach=True)
    return total


@contextlib.contextmanager
def root_gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the root's own weights (embeddings, final norm, head) are whole, so the model's
    parts can be called outside its ``forward`` (the batched evaluation calls ``hidden_states`` and the
    head); the blocks still gather themselves as they run. A no-op for a model that is not sharded."""
    if not is_sharded(model):
        yield model
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (no memory) and whose buffers are
    real: what ``gathered_model`` fills with the trained weights once they are sharded. Tied parameters
    stay tied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def gathered_model(model: nn.Module, plain: nn.Module, keeps: bool) -> nn.Module | None:
    """The whole trained ``model`` (sharded) as the plain module ``plain`` (its ``skeleton``), on the CPU
    of the process that ``keeps`` it (None elsewhere). A collective: every process calls it."""
    whole = {}
    for name, tensor in model.state_dict().items():
        value = full_tensor(tensor).detach()  # every process takes part in every gather
        if keeps:
            whole[name] = value.cpu()
    if not keeps:
        return None
    tied = _tied_names(plain)
    plain.load_state_dict(whole, assign=True)  # the meta parameters replaced by the gathered ones
    for alias, first in tied.items():  # assign gives each name its own tensor: tie them back
        parent, _, leaf = alias.rpartition(".")
        setattr(plain.get_submodule(parent), leaf, plain.get_parameter(first))
    return plain


def _tied_names(model: nn.Module) -> dict[str, str]:
    """Each parameter name that shares its tensor with an earlier one -> that earlier name."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied
