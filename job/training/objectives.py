"""What training minimises, batch by batch, and how an evaluation estimates it: the parts of the loop
that belong to the objective. The trainer asks an ``Objective`` for each micro-batch's summed loss and
an ``Evaluator`` for the figures of an evaluation; supervised finetuning (the book's chapter 7) is here,
preference tuning plugs in the same way.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from job.data.instructions import IGNORE_INDEX, Collator, Example
from job.data.packing import Packer
from job.data.preference import Pair, collate_pairs
from job.models.gpt2 import GPTModel, head_loss
from job.models.lora import adapters_off
from job.models.tokenizer import END_OF_TEXT_ID


class Objective(Protocol):
    """A batch's loss as a sum over its units (targets, pairs), and the units' count: each micro-batch's
    sum divided by the whole batch's count is the book's mean whatever the split into processes and
    micro-batches."""

    def units(self, batch: list[int]) -> int:
        """What the batch's loss is the mean over (every process knows it: each holds the data)."""

    def loss_sum(self, model: torch.nn.Module, micro: list[int], device: torch.device) -> torch.Tensor:
        """The summed loss of examples ``micro`` (a scalar that backpropagates)."""

    def tokens(self, batch: list[int]) -> int:
        """The input tokens of ``batch`` as the book counts them (``tokens_seen``)."""


class Evaluator(Protocol):
    def __call__(self, model: GPTModel, estimate: list[list[int]]) -> dict[str, float]:
        """The figures of one evaluation (``train_loss``, ``val_loss``, ...), training's estimated on the
        batches ``estimate`` (indices into the training split)."""


class SFTObjective:
    """The book's ``calc_loss_batch``: cross entropy over the batch's targets (-100 left out)."""

    def __init__(self, train: list[Example], collate: Collator, max_length: int):
        self.train, self.collate, self.max_length = train, collate, max_length
        # Targets each training example contributes: independent of what it is batched with.
        self.target_counts = [int((collate([e])[1] != IGNORE_INDEX).sum()) for e in train]

    def units(self, batch: list[int]) -> int:
        return sum(self.target_counts[j] for j in batch)

    def loss_sum(self, model: torch.nn.Module, micro: list[int], device: torch.device) -> torch.Tensor:
        inputs, targets = self.collate([self.train[j] for j in micro])
        return model(inputs.to(device), targets=targets.to(device), reduction="sum")

    def tokens(self, batch: list[int]) -> int:
        # The book's count: the global batch padded to its longest example (capped), whatever the split.
        longest = max(len(self.train[j].token_ids) for j in batch)
        return len(batch) * min(longest, self.max_length)


class SFTEvaluator:
    """The book's ``evaluate_model``: the mean of per-batch mean losses over the training estimate's batches
    and the first --eval-iter validation batches; a forward per batch, or with --batched-eval one for all."""

    def __init__(self, train: list[Example], val: list[Example], collate: Collator, batch_size: int, cfg):
        self.train, self.collate, self.batched = train, collate, cfg.batched_eval
        self.val = [val[i : i + batch_size] for i in range(0, len(val), batch_size)][: cfg.eval_iter]

    @torch.no_grad()
    def __call__(self, model: GPTModel, estimate: list[list[int]]) -> dict[str, float]:
        batches = [[self.train[j] for j in batch] for batch in estimate]
        losses = self.batch_losses(model, batches + self.val).tolist()  # one device sync per evaluation
        train, val = losses[: len(batches)], losses[len(batches) :]
        return {"train_loss": sum(train) / len(train), "val_loss": sum(val) / len(val)}

    def batch_losses(self, model: GPTModel, batches: list[list[Example]]) -> torch.Tensor:
        """Each batch's mean loss (the terms of the book's ``calc_loss_loader``), (n,) on the model's device."""
        device = next(model.parameters()).device
        collated = [self.collate(batch) for batch in batches]
        if not self.batched:
            return torch.stack([model(x.to(device), targets=y.to(device)).float() for x, y in collated])
        width = max(x.shape[1] for x, _ in collated)
        # Every batch padded to the longest, after its real tokens (targets ignored): one (R, T) forward.
        inputs = torch.cat([F.pad(x, (0, width - x.shape[1]), value=self.collate.end_id) for x, _ in collated])
        targets = torch.cat([F.pad(y, (0, width - y.shape[1]), value=IGNORE_INDEX) for _, y in collated])
        rows = torch.cat([torch.full((len(x),), i) for i, (x, _) in enumerate(collated)])  # (R,) batch of each row
        inputs, targets, rows = inputs.to(device), targets.to(device), rows.to(device)
        keep = targets != IGNORE_INDEX  # (R, T)
        # The head only where a target counts: (N,) losses in keep's order.
        per_target = head_loss(model.lm_head, model.hidden_states(inputs), targets, True, reduction="none")
        owner = rows[:, None].expand_as(targets)[keep]  # (N,) the batch of each target
        sums = torch.zeros(len(batches), device=device).index_add_(0, owner, per_target.float())
        counts = torch.zeros(len(batches), device=device).index_add_(0, owner, torch.ones_like(per_target.float()))
        return sums / counts


class PackedSFTObjective:
    """``--packing``: the book's cross entropy over packed rows (``Packer``), a batch a list of rows. Each
    sequence's targets are those it has padded, so a step's loss (the summed losses over the summed counted
    targets) is that of the same sequences in a padded batch."""

    def __init__(self, packer: Packer):
        self.packer = packer
        counts = [int((packer.sequence(e)[1] != IGNORE_INDEX).sum()) for e in packer.examples]
        self.target_counts = [sum(counts[i] for i in row) for row in packer.rows]  # per row

    def units(self, batch: list[int]) -> int:
        return sum(self.target_counts[r] for r in batch)

    def loss_sum(self, model: torch.nn.Module, micro: list[int], device: torch.device) -> torch.Tensor:
        rows = self.packer(micro).to(device)
        return model(
            rows.inputs, targets=rows.targets, reduction="sum", positions=rows.positions, documents=rows.documents
        )

    def tokens(self, batch: list[int]) -> int:
        return sum(self.packer.row_tokens(r) for r in batch)  # real tokens: a row's padding is not counted


class PackedSFTEvaluator(SFTEvaluator):
    """The book's ``evaluate_model`` with ``--packing``: the training loss estimated on the packed rows trained on
    (each batch of rows' mean over its counted targets), the validation loss on the book's padded batches."""

    def __init__(self, packer: Packer, val: list[Example], collate: Collator, batch_size: int, cfg):
        super().__init__(packer.examples, val, collate, batch_size, cfg)
        self.packer = packer

    @torch.no_grad()
    def __call__(self, model: GPTModel, estimate: list[list[int]]) -> dict[str, float]:
        device = next(model.parameters()).device
        train = []
        for batch in estimate:
            rows = self.packer(batch).to(device)
            train.append(
                model(rows.inputs, targets=rows.targets, positions=rows.positions, documents=rows.documents).float()
            )
        losses = torch.cat([torch.stack(train), self.batch_losses(model, self.val)]).tolist()  # one device sync
        train, val = losses[: len(estimate)], losses[len(estimate) :]
        return {"train_loss": sum(train) / len(train), "val_loss": sum(val) / len(val)}


# --- preference tuning (the book's ch07/04, DPO) -------------------------------------------------


def sequence_logprobs(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """The book's ``compute_logprobs``: (B,) log-probabilities of each row's masked-in tokens, from
    ``log_softmax(logits[:, :-1])`` at ``tokens[:, 1:]`` with the mask shifted alike; their mean (the book's)
    or their sum (TRL's and the DPO paper's)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, vocab)
    picked = logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    keep = mask[:, 1:]
    total = (picked * keep).sum(-1)
    return total / keep.sum(-1) if reduction == "mean" else total


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The book's ``compute_dpo_loss`` per pair (B,): ``-logsigmoid(beta * (policy log-ratio - reference
    log-ratio))``, and the chosen and rejected rewards (policy minus reference log-probabilities)."""
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    losses = -F.logsigmoid(beta * logits)
    return losses, (policy_chosen - reference_chosen).detach(), (policy_rejected - reference_rejected).detach()


class Reference:
    """DPO's reference model: a frozen copy of the starting model, or (``frozen`` None, with LoRA) the
    policy's own base with its adapters switched off, so no second copy is held."""

    def __init__(self, frozen: GPTModel | None):
        self.frozen = frozen.eval().requires_grad_(False) if frozen is not None else None

    @torch.no_grad()
    def logits(self, policy: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        if self.frozen is not None:
            return self.frozen.to(inputs.device)(inputs)  # (a no-op once on the device)
        base = getattr(policy, "module", policy)  # inside DDP's wrapper
        training = base.training
        base.eval()
        try:
            with adapters_off(base):
                return base(inputs)
        finally:
            base.train(training)


class DPOObjective:
    """The book's DPO loss over preference pairs, each the mean over the batch: the summed pair losses
    divided by the batch's pairs, as the loop divides."""

    def __init__(
        self,
        pairs: list[Pair],
        max_length: int,
        beta: float,
        reduction: str,
        reference: Reference,
        end_id: int = END_OF_TEXT_ID,
    ):
        self.pairs, self.max_length, self.beta, self.reduction = pairs, max_length, beta, reduction
        self.reference, self.end_id = reference, end_id  # end_id: the tokenizer's, the pairs' padding

    def units(self, batch: list[int]) -> int:
        return len(batch)

    def loss_sum(self, model: torch.nn.Module, micro: list[int], device: torch.device) -> torch.Tensor:
        losses, _, _ = self.pair_losses(model, [self.pairs[j] for j in micro], device)
        return losses.sum()

    def pair_losses(self, model: torch.nn.Module, pairs: list[Pair], device: torch.device):
        """(losses, chosen rewards, rejected rewards), each (B,), of ``pairs`` under ``model``."""
        chosen, rejected, chosen_mask, rejected_mask = (
            t.to(device) for t in collate_pairs(pairs, self.max_length, self.end_id)
        )
        policy = [
            sequence_logprobs(model(x), x, m, self.reduction)
            for x, m in ((chosen, chosen_mask), (rejected, rejected_mask))
        ]
        reference = [
            sequence_logprobs(self.reference.logits(model, x), x, m, self.reduction)
            for x, m in ((chosen, chosen_mask), (rejected, rejected_mask))
        ]
        return dpo_losses(*policy, *reference, self.beta)

    def tokens(self, batch: list[int]) -> int:
        # The book counts batch["chosen"].numel(): the pairs times the longest chosen-or-rejected + 1 (capped).
        width = max(max(len(self.pairs[j].chosen), len(self.pairs[j].rejected)) + 1 for j in batch)
        return len(batch) * min(width, self.max_length)


class DPOEvaluator:
    """The book's ``evaluate_dpo_loss_loader``: the DPO loss and the chosen and rejected rewards, each the
    mean of per-batch means over the training estimate's batches and the first --eval-iter validation ones."""

    def __init__(self, objective: DPOObjective, val: list[Pair], batch_size: int, eval_iter: int):
        self.objective = objective
        self.val = [val[i : i + batch_size] for i in range(0, len(val), batch_size)][:eval_iter]

    @torch.no_grad()
    def __call__(self, model: GPTModel, estimate: list[list[int]]) -> dict[str, float]:
        device = next(model.parameters()).device
        train = [[self.objective.pairs[j] for j in batch] for batch in estimate]
        figures = {}
        for split, batches in (("train", train), ("val", self.val)):
            means = torch.stack(
                [torch.stack([t.mean() for t in self.objective.pair_losses(model, b, device)]) for b in batches]
            )  # (batches, 3): loss, chosen reward, rejected reward
            loss, chosen, rejected = means.mean(0).tolist()
            figures |= {f"{split}_loss": loss, f"{split}_chosen_reward": chosen, f"{split}_rejected_reward": rejected}
        return figures
