"""sft-job: instruction-finetune GPT-2 on a cluster, as in chapter 7 of the book."""

__version__ = "0.1.0"
