"""Who does what in a group of processes: the roles by rank and node, and the main process's decisions
given to every process, in a real group of processes (gloo on the CPU, as on a cluster without GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from job.training.roles import Roles
from tests.helpers import REPO, free_port


@dataclass
class FakeGroup:
    """A process of a group as accelerate describes it; counts its barriers."""

    process_index: int
    num_processes: int
    local_index: int
    barriers: list[int] = field(default_factory=list)

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @property
    def is_local_main_process(self) -> bool:
        return self.local_index == 0

    def wait_for_everyone(self) -> None:
        self.barriers.append(self.process_index)


# Two nodes of two processes each: (global rank, local rank) -> (keeps the run, prepares its node).
TWO_NODES = {(0, 0): (True, True), (1, 1): (False, False), (2, 0): (False, True), (3, 1): (False, False)}


@pytest.mark.parametrize(("rank", "local"), sorted(TWO_NODES))
def test_the_main_process_keeps_the_run_and_each_nodes_first_process_prepares_its_node(rank, local):
    roles = Roles(FakeGroup(rank, 4, local))
    assert (roles.keeps_run, roles.prepares_node) == TWO_NODES[(rank, local)]
    assert (roles.rank, roles.world) == (rank, 4)
    roles.together()
    assert roles.group.barriers == [rank]


def test_a_single_process_holds_every_role_and_decides_without_a_collective():
    roles, asked = Roles(FakeGroup(0, 1, 0)), []
    assert roles.keeps_run and roles.prepares_node
    assert roles.main_decides(lambda: asked.append("main") or {"finetune": True}) == {"finetune": True}
    assert asked == ["main"]


PROBE = """
import json
from accelerate import PartialState
from job.training.roles import Roles

roles = Roles(PartialState(cpu=True))
asked = []
answer = roles.main_decides(lambda: asked.append(roles.rank) or {"decided_by": roles.rank})
roles.together()
print(json.dumps({"rank": roles.rank, "world": roles.world, "keeps_run": roles.keeps_run,
                  "prepares_node": roles.prepares_node, "answer": answer, "asked": asked}))
"""


def test_in_a_real_group_of_two_nodes_every_process_acts_on_the_main_processs_decision(tmp_path):
    """Three processes over gloo as two nodes (ranks 0 and 1 on the first, rank 2 alone on the second), as
    torchrun starts them: only the main one decides, and every one gets its answer."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    port, nodes = free_port(), {0: (0, 2), 1: (1, 2), 2: (0, 1)}  # rank -> (local rank, processes on its node)
    procs = []
    for rank, (local, local_world) in nodes.items():
        env = os.environ | {
            "PYTHONPATH": str(REPO),
            "RANK": str(rank),
            "WORLD_SIZE": "3",
            "LOCAL_RANK": str(local),
            "LOCAL_WORLD_SIZE": str(local_world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(subprocess.Popen([sys.executable, script], env=env, stdout=subprocess.PIPE, text=True))
    results = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert [(r["rank"], r["world"], r["keeps_run"], r["prepares_node"]) for r in results] == [
        (0, 3, True, True),
        (1, 3, False, False),
        (2, 3, False, True),
    ]
    assert [r["answer"] for r in results] == [{"decided_by": 0}] * 3
    assert [r["asked"] for r in results] == [[0], [], []]
