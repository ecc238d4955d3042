"""``python -m job.launch ARGS``: ``accelerate launch ARGS`` with the exit-code contract kept
(``python -m job.launch --torchrun ARGS``: ``torchrun ARGS``, which reads its rendezvous from the
``PET_*`` variables that Kubeflow Trainer sets).

accelerate launch runs torchrun's agent, which exits 1 whatever its workers exit with, so a pod or
a Slurm step would read "bad data" where a worker meant "try again" (75). On SIGTERM the agent
also kills its workers after a short grace. This wrapper starts the launcher, passes SIGTERM,
SIGUSR1 and SIGINT to the training processes themselves (each finishes its step, writes the checkpoint
and exits 75), and exits with the most telling code its workers reported (each writes its code to
``SFT_JOB_EXIT_DIR`` on the way out): bad config (2), bad data (1), try again (75), a bug (70).
A launcher that failed with no worker's code (a worker killed by the kernel, say) is a 70; one that failed
before any worker started (accelerate refusing its own flags: ``--cpu`` with ``--multi_gpu``) is a bad flag, 2.

The group's failure is one ``Error:`` line, printed here: each worker writes its line beside its code
instead of to stderr (torch's elastic agent passes every worker's stderr through as it comes, and stops
the others with SIGTERM when one fails, so no worker can know whether its line is the one that speaks
for the group). The line printed is that of the lowest rank whose code is the group's: a refusal every
process reaches is said once, and one only a non-main process reaches (its own shard missing) still is.
Each worker's error stays in its JSON log (``stage_failed`` with its rank).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil  # accelerate's own dependency

from job.core.errors import STOP_SIGNALS, ExitCode

# The order in which a worker's code speaks for the group: a config or data error fails the whole
# job whoever saw it first; "try again" beats a bug elsewhere (a peer lost mid-collective).
PRIORITY = (ExitCode.BAD_CONFIG, ExitCode.BAD_DATA, ExitCode.RETRY, ExitCode.INTERNAL)


def group_exit_code(launcher_code: int, worker_codes: list[int], signalled: bool = False, started: bool = True) -> int:
    if launcher_code == 0:
        return 0
    for code in PRIORITY:
        if code in worker_codes:
            return int(code)
    if signalled:  # stopped before any worker could checkpoint (still starting): the rerun starts over, try again
        return int(ExitCode.RETRY)
    return int(ExitCode.INTERNAL if started else ExitCode.BAD_CONFIG)


def group_error_line(
    result: int, codes: dict[int, int], lines: dict[int, str], signalled: bool = False, started: bool = True
) -> str:
    """The one ``Error:`` line of a group that exits ``result``: the line of the lowest rank whose code
    (``codes``, by rank) is the group's, else the lowest rank's line, else why no worker said anything."""
    speaking = sorted(rank for rank in lines if codes.get(rank) == result) or sorted(lines)
    if speaking:
        return lines[speaking[0]]
    if signalled:
        return "Error: stopped by a signal while the processes were starting: rerun the same command"
    if not started:
        return (
            "Error: the launcher stopped before starting any process: its own message above says why (a launch "
            "flag it refused, such as --cpu with --multi_gpu)"
        )
    return (
        "Error: the launcher failed and no process said why (one killed, by the kernel for memory say, or "
        "never started): see the launcher's output above"
    )


def _reports(exits: Path) -> tuple[dict[int, int], dict[int, str]]:
    """Each worker's exit code and ``Error:`` line, by rank, as ``job.cli`` wrote them on the way out."""
    codes = {int(p.name[5:]): int(p.read_text()) for p in exits.glob("rank-*")}
    lines = {int(p.name[5:]): p.read_text() for p in exits.glob("line-*")}
    return codes, lines


def _workers(launcher: subprocess.Popen) -> list:
    """The training processes under the launcher (not torchrun's agent): those running job.cli."""
    try:
        children = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in children if _is_worker(p)]


def _is_worker(process) -> bool:
    try:
        return "job.cli" in process.cmdline()
    except psutil.Error:
        return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    module = "accelerate.commands.launch"
    if args[:1] == ["--torchrun"]:
        module, args = "torch.distributed.run", args[1:]
    with tempfile.TemporaryDirectory(prefix="sft-job-exit-") as exits:
        env = {**os.environ, "SFT_JOB_EXIT_DIR": exits}
        launcher = subprocess.Popen([sys.executable, "-m", module, *args], env=env)

        signalled = []

        def forward(signum, frame):
            signalled.append(signum)
            workers = _workers(launcher)
            for process in workers or [launcher]:  # no worker yet: stop the launcher itself
                try:
                    process.send_signal(signum)
                except (OSError, psutil.Error):
                    pass  # gone already

        # SIGINT too: left to Python's default, it ended this wrapper alone and the workers trained on
        for s in STOP_SIGNALS:
            signal.signal(s, forward)
        code = launcher.wait()
        codes, lines = _reports(Path(exits))
        started = any(Path(exits).glob("started-*"))
    result = group_exit_code(code, list(codes.values()), bool(signalled), started)
    if result != code:
        print(f"sft-job: launcher exit {code}, workers {sorted(set(codes.values()))}: exit {result}", file=sys.stderr)
    if result != 0:
        print(group_error_line(result, codes, lines, bool(signalled), started), file=sys.stderr)
    return result


if __name__ == "__main__":
    sys.exit(main())
