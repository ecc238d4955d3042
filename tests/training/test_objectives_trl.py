"""Our DPO against TRL's ``DPOTrainer`` on a tiny random GPT-2: the same batch (TRL's own tokenization and
collation) gives the same loss and rewards, and five steps at the same settings the same weights.

Settings that differ by default and are set equal here: the book's mean over a response's tokens is
``--logprob-reduction sum`` (TRL and the DPO paper sum them); TRL's mask starts at the completion, the
book's two tokens after the prompt (Alpaca's two newlines), so the pairs are given TRL's start; TRL
reports rewards times beta, the book without; TRL clips gradients at 1.0 (``--grad-clip 1``),
has no weight decay, keeps GPT-2's head tied (``--no-untie-head``) and autocasts to bf16 unless told not to
(both in fp32 here)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from job.config import DPOConfig
from job.core.observability import Metrics
from job.data.preference import Pair
from job.models.gpt2_weights import load_pretrained, save_hf
from job.training.objectives import DPOEvaluator, DPOObjective, Reference
from job.training.trainer import Task, Trainer

BETA, LR, STEPS = 0.1, 1e-3, 5


@pytest.fixture(scope="module")
def trl_setup(shared_data, tmp_path_factory):
    """A TRL DPOTrainer over four of the book's preference entries (one batch of all four), its tokenizer
    trained here, and policy and reference that differ (so rewards are not zero)."""
    from datasets import Dataset
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    entries = json.loads((shared_data / "instruction-data-with-preference.json").read_text())[:4]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    texts = [e["instruction"] + e["chosen"] + e["rejected"] for e in entries]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_embd=32, n_head=4, n_positions=128, vocab_size=50257)
    reference = GPT2LMHeadModel(GPT2Config(**shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    folders = {}
    for name, model in (("policy", policy), ("reference", reference)):
        folders[name] = tmp_path_factory.mktemp(f"trl-{name}")
        model.save_pretrained(folders[name], safe_serialization=True)
    # Both sides read the same files: TRL's models are the saved ones, as ours are.
    policy, reference = (GPT2LMHeadModel.from_pretrained(folders[n]) for n in ("policy", "reference"))
    data = Dataset.from_list(
        [{"prompt": e["instruction"], "chosen": e["chosen"], "rejected": e["rejected"]} for e in entries]
    )
    args = TRLConfig(
        output_dir=str(tmp_path_factory.mktemp("trl-out")),
        per_device_train_batch_size=4,
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        loss_type=["sigmoid"],
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,  # TRL's default is bf16 autocast; both sides in fp32 here
        seed=0,
    )
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch, folders


def _pairs(batch) -> list[Pair]:
    """TRL's rows ([chosen x B; rejected x B]) as our pairs: each sequence without its padding, scored from
    where TRL's completion starts."""
    ids, keep, completion = batch["input_ids"], batch["attention_mask"].bool(), batch["completion_mask"].bool()
    half = len(ids) // 2
    pairs = []
    for i in range(half):
        start = int(completion[i].nonzero()[0])
        assert start == int(completion[half + i].nonzero()[0])  # one prompt for both
        pairs.append(Pair(ids[i][keep[i]].tolist(), ids[half + i][keep[half + i]].tolist(), start, start))
    return pairs


def test_the_same_batch_gives_trls_loss_and_rewards(trl_setup):
    trainer, batch, folders = trl_setup
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}  # the model is in eval mode
    policy = load_pretrained(folders["policy"]).eval()
    objective = DPOObjective(_pairs(batch), 128, BETA, "sum", Reference(load_pretrained(folders["reference"])))
    with torch.no_grad():
        losses, chosen, rejected = objective.pair_losses(policy, objective.pairs, torch.device("cpu"))
    assert losses.mean().item() == pytest.approx(trl_loss, abs=1e-5)
    assert (BETA * chosen.mean()).item() == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert (BETA * rejected.mean()).item() == pytest.approx(metrics["rewards/rejected"], abs=1e-5)
    assert abs(metrics["rewards/chosen"]) > 1e-3  # the policy differs from the reference: a real comparison


def test_five_steps_give_trls_weights(trl_setup, tmp_path):
    from safetensors.torch import load_file

    trainer, batch, folders = trl_setup
    pairs = _pairs(batch)
    ours = load_pretrained(folders["policy"])
    objective = DPOObjective(pairs, 128, BETA, "sum", Reference(load_pretrained(folders["reference"])))
    task = Task(ours, objective, DPOEvaluator(objective, pairs, 4, 1), len(pairs), tokenizer=None, sample_prompt=None)
    cfg = DPOConfig(
        output=str(tmp_path / "ours"),
        batch_size=4,
        epochs=STEPS,
        lr=LR,
        weight_decay=0.0,
        grad_clip=1.0,
        untie_head=False,
        precision="fp32",
        eval_freq=1000,
        eval_iter=1,
        checkpoint_every=1000,
        beta=BETA,
        logprob_reduction="sum",
        data_order="seeded",
    )
    ours_trainer = Trainer(cfg, task, Metrics())
    ours_trainer.fit()
    trainer.train()
    save_hf(ours_trainer.trained_model(), tmp_path / "ours-hf")
    mine = load_file(str(tmp_path / "ours-hf" / "model.safetensors"))
    theirs = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    compared = [k for k in mine if k in theirs]
    assert len(compared) >= 10  # every block's weights, the embeddings
    worst = max((mine[k] - theirs[k]).abs().max().item() for k in compared)
    moved = max(
        (mine[k] - load_file(str(folders["policy"] / "model.safetensors"))[k]).abs().max().item() for k in compared
    )
    assert worst < 1e-5 and moved > 1e-3, (worst, moved)
