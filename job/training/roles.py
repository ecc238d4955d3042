"""Who does what when the job runs as a group of processes (one per GPU, on one node or several).

Every process enters every stage, and every process reaches every collective (a barrier, DDP's
all-reduce, a checkpoint): a duty below is a branch inside a stage, never a return before a
collective, or the group waits forever for the process that left.

Three roles: the main process (global rank 0), each node's first process (local rank 0, the main
process among them), every process.

- preflight: the main process checks, takes the run's lock, writes config.yaml and the manifest;
  the others wait at the barrier.
- download: the main process fetches into its node's cache and records the stage; each other node's
  first process fetches into its own node's cache what it lacks.
- finetune: each node's first process fetches the newest good checkpoint from the bucket into its
  scratch folder (and makes the smoke model there); every process trains its share of each batch and
  its RNG state goes into each checkpoint (over several nodes, gathered to the main process); the main
  process writes a checkpoint's shared files, uploads it, logs evaluations and samples, records the stage
  and writes the outputs.
- generate, judge, report: the main process alone; the others return once training's outputs are written.
- metrics: the main process serves /metrics and pushes to the Pushgateway.

Whether a training stage runs is the main process's to say (its manifest may mark it done): it tells
every process (``main_decides``), so a rerun of a finished run does not leave the others training alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

T = TypeVar("T")


class Group(Protocol):
    """What accelerate's ``PartialState`` and ``Accelerator`` both are."""

    is_main_process: bool
    is_local_main_process: bool
    process_index: int
    num_processes: int

    def wait_for_everyone(self) -> None: ...


@dataclass(frozen=True)
class Roles:
    """The duties of this process in ``group``, by the table above."""

    group: Group

    @property
    def keeps_run(self) -> bool:
        """The main process: the lock, the manifest, config.yaml, uploads, logs of record, the outputs,
        and the stages after training."""
        return self.group.is_main_process

    @property
    def prepares_node(self) -> bool:
        """Each node's first process: what its machine's processes read from disk (the cache, the
        scratch folder's checkpoint, the smoke model), ready before the barrier that follows."""
        return self.group.is_local_main_process

    @property
    def rank(self) -> int:
        return self.group.process_index

    @property
    def world(self) -> int:
        return self.group.num_processes

    def together(self) -> None:
        """The barrier: no process goes on before every process got here."""
        self.group.wait_for_everyone()

    def main_decides(self, decide: Callable[[], T]) -> T:
        """``decide()`` on the main process, its answer given to every process (a collective): what only the
        main process can know (the manifest) but every process must act on (whether a stage runs)."""
        if self.world == 1:
            return decide()
        from accelerate.utils import broadcast_object_list

        box = [decide() if self.keeps_run else None]
        broadcast_object_list(box, from_process=0)
        return box[0]
