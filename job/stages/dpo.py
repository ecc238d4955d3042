"""The DPO stage (the book's ch07/04, "Direct Preference Optimization from scratch"): the finetuned model
preference-tuned on chosen and rejected responses, trained by the same ``Trainer`` as finetuning with the
DPO objective; the reference is a frozen copy of the starting model, or with LoRA its own base."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

from job.core.observability import Metrics, get_logger
from job.data.formats import Layout, pair_style
from job.data.preference import fitting_pairs, preference_problem
from job.data.trl_preference import prompt_text
from job.stages.dpo_config import DPOConfig
from job.stages.generate import saved_prompt_style
from job.training.binding import run_binding
from job.training.objectives import DPOEvaluator, DPOObjective, Reference
from job.training.outputs import plot_reward_margins
from job.training.stage_io import StartingModel, load_inputs, save_outputs, write_config_once
from job.training.starting_model import starting_model
from job.training.trainer import Task, Trainer

log = get_logger(__name__)


def dpo_prompt_style(named: str | None, finetuned_with: str | None) -> str:
    """The prompt style DPO lays the book's pairs out with, the one decision ``sft-job dpo`` and ``run --dpo``
    share: --prompt-style where named, else the one the model was finetuned with (its config.json records it;
    ``generate``'s default too), else alpaca. The DPO model records it; the export follows that record."""
    return named or finetuned_with or "alpaca"


def with_model_style(cfg: DPOConfig) -> DPOConfig:
    """``cfg`` with the prompt style DPO uses (``dpo_prompt_style``)."""
    recorded = saved_prompt_style(cfg.model_dir) if cfg.model_dir else None
    return cfg.model_copy(update={"prompt_style": dpo_prompt_style(cfg.prompt_style, recorded)})


def warn_if_style_differs(cfg: DPOConfig, how: Layout) -> None:
    """A --prompt-style that differs from the one the model recorded is the user's choice: used, with a warning
    (the DPO model then records it). Only where the style lays the pairs out: conversational pairs have their
    template, whatever the style."""
    recorded = saved_prompt_style(cfg.model_dir) if cfg.model_dir else None
    if how.data_format == "alpaca" and recorded is not None and recorded != cfg.prompt_style:
        log.warning(
            "prompt_style_differs_from_model",
            prompt_style=cfg.prompt_style,
            finetuned_with=recorded,
            model_dir=cfg.model_dir,
        )


def dpo_task(cfg: DPOConfig, start: StartingModel | None = None) -> tuple[Task, str]:
    """The dataset first (a bad one fails before any model loads), then the tokenizer and the model ``start``
    names (``cfg``'s where not given); the task, and the book-style name of the model's size."""
    cfg = with_model_style(cfg)
    inputs = load_inputs(cfg, start or starting_model(cfg), preference_problem, pairs=True)
    model, tokenizer, max_length = inputs.model, inputs.tokenizer, inputs.max_length
    warn_if_style_differs(cfg, inputs.layout)
    style = pair_style(inputs.layout)
    limits = (cfg.allowed_max_length, model.cfg.context_length)
    pairs, val_pairs = fitting_pairs(inputs.train, inputs.val, tokenizer, style, limits, cfg.batch_size, inputs.path)
    # Full DPO holds the starting model, frozen; with LoRA the reference is the base under the adapters.
    reference = Reference(None if cfg.lora_rank else copy.deepcopy(model))
    objective = DPOObjective(pairs, max_length, cfg.beta, cfg.logprob_reduction, reference, tokenizer.eot_token)
    task = Task(
        model=model,
        objective=objective,
        evaluator=DPOEvaluator(objective, val_pairs, cfg.batch_size, cfg.eval_iter),
        train_size=len(pairs),
        tokenizer=tokenizer,
        sample_prompt=prompt_text(style, inputs.val[min(2, len(inputs.val) - 1)]),  # the book's: val_data[2]
        companions=(reference.frozen,) if reference.frozen is not None else (),
        layout=inputs.layout,
    )
    return task, inputs.model_name


def run_dpo(
    cfg: DPOConfig,
    metrics: Metrics | None = None,
    saved_config: dict | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    binding: dict | None = None,
) -> dict[str, Path]:
    """The stage, as ``run_finetune``: validate and load, train (resuming from checkpoints), save; the
    outputs also hold the book's reward-margin plot."""
    metrics = metrics or Metrics()
    cfg = with_model_style(cfg)  # before anything records the options: config.yaml, the binding, the model
    start = starting_model(cfg)
    task, name = dpo_task(cfg, start)  # may fail: nothing has been written yet
    binding = binding or run_binding(cfg, (saved_config or {}).get("run_id"))
    trainer = Trainer(cfg, task, metrics, saved_config=saved_config, on_checkpoint=on_checkpoint, binding=binding)
    if trainer.roles.keeps_run:
        write_config_once(trainer)
        log.info(
            "dpo_start",
            model=name,
            prompt_style=cfg.prompt_style,
            train_pairs=task.train_size,
            steps=trainer.total_steps,
            trainable_parameters=trainer.parameter_counts["trainable"],
            processes=trainer.roles.world,
            reference="base without adapters" if cfg.lora_rank else "frozen copy",
            beta=cfg.beta,
            logprob_reduction=cfg.logprob_reduction,
        )
    trainer.fit()
    outputs = save_outputs(trainer, cfg, start, model_name=name, kind="dpo")
    if trainer.roles.keeps_run:
        margins = trainer.output / "reward-margins-plot.png"
        plot_reward_margins(trainer.state.history, trainer.state.step / trainer.batches_per_epoch, margins)
        outputs["margins_plot"] = margins
        last = trainer.state.history[-1] if trainer.state.history else {}
        log.info(
            "dpo_done",
            steps=trainer.state.step,
            tokens_seen=trainer.state.tokens_seen,
            loop_seconds=round(trainer.loop_seconds, 2),
            final_val_loss=last.get("val_loss"),
            final_val_reward_margin=last and last["val_chosen_reward"] - last["val_rejected_reward"],
        )
    return outputs
