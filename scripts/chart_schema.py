"""The `config` part of helm/sft-job/values.schema.json, generated from `sft-job run`'s own options, so
the chart refuses at `helm install`/`helm template` what the job would refuse in the pod (exit 2).

    python scripts/chart_schema.py           # rewrite the schema's `config`
    python scripts/chart_schema.py --check   # exit 1 if the schema differs from what the options give

Each option's key with its type (an integer is no number, a flag a boolean), a choice's values, a
duration's form (300, 300s, 5m, 1h) and no other key. The judge's API key is left to the chart's
template, which refuses it with the reason (a secret goes in judge.existingSecret, not the ConfigMap).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

SCHEMA = Path(__file__).resolve().parent.parent / "helm" / "sft-job" / "values.schema.json"
# parse_duration's form (job/config.py): what judge_wait, s3_retry_timeout and lock_lease take.
DURATION = r"^\s*\d{1,12}(\.\d{1,9})?\s*[smh]?\s*$"
NOT_IN_A_CONFIG_FILE = {"config"}  # a config file cannot name another
CHECKED_BY_THE_TEMPLATE = {"judge_api_key"}  # refused by configmap.yaml, with the reason


def _property(param: click.Parameter) -> dict:
    kind = param.type
    if isinstance(kind, click.Choice):
        schema: dict = {"enum": list(kind.choices)}
    elif isinstance(kind, click.types.BoolParamType):
        schema = {"type": "boolean"}
    elif isinstance(kind, click.types.IntParamType):
        schema = {"type": "integer"}
    elif isinstance(kind, click.types.FloatParamType):
        schema = {"type": "number"}
    else:  # a string; YAML reads `run_id: 42` or `judge_wait: 300` as a number, which the job takes too
        schema = {"type": ["string", "number"]}
        if isinstance(param.default, str) and re.fullmatch(DURATION, param.default) and param.default[-1] in "smh":
            schema |= {"pattern": DURATION, "minimum": 0}  # the pattern for a string, the minimum for a number
    if param.default is None:  # unset: the option's own default
        schema = {"anyOf": [schema, {"type": "null"}]}
    return schema


def config_schema() -> dict:
    """The schema of the chart's `config`: one property per option of `sft-job run`, nothing else."""
    from job.cli import main

    params = [p for p in main.commands["run"].params if p.name not in NOT_IN_A_CONFIG_FILE]
    properties = {p.name: _property(p) for p in params}
    for name in CHECKED_BY_THE_TEMPLATE:
        properties[name] = {"description": "refused by the chart: the key comes from judge.existingSecret"}
    properties["metrics_port"]["anyOf"][0] |= {"minimum": 0, "maximum": 65535}
    return {
        "type": "object",
        "description": "Options of `sft-job run`, keyed as in --config job.yaml (generated: scripts/chart_schema.py)",
        "properties": properties,
        "additionalProperties": False,
    }


def main(argv: list[str]) -> int:
    schema = json.loads(SCHEMA.read_text())
    wanted = {**schema, "properties": {**schema["properties"], "config": config_schema()}}
    if "--check" in argv:
        if schema != wanted:
            print(f"{SCHEMA}: config differs from the options: run python scripts/chart_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(json.dumps(wanted, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
