"""The names of the models ``--model`` fetches, with no heavy imports: the CLI's choices come from here.

GPT-2's four sizes (book, 7.5) and the base models of the two families the book implements next (7.9:
Llama 3.2 and Qwen3), by their Hugging Face repositories."""

from typing import Literal, get_args

GPT2Name = Literal["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"]
HubName = Literal["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "llama3.2-1b", "llama3.2-3b"]
ModelName = Literal[GPT2Name, HubName]
MODEL_NAMES: tuple[ModelName, ...] = get_args(ModelName)
# OpenAI's folder names for the same sizes.
OPENAI_SIZE_NAMES: dict[GPT2Name, str] = {
    "gpt2-small": "124M",
    "gpt2-medium": "355M",
    "gpt2-large": "774M",
    "gpt2-xl": "1558M",
}
# The pretrained (base) checkpoints, as GPT-2 is one: instruction finetuning starts from a base model.
HUB_REPOS: dict[HubName, str] = {
    "qwen3-0.6b": "Qwen/Qwen3-0.6B-Base",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B-Base",
    "qwen3-4b": "Qwen/Qwen3-4B-Base",
    "qwen3-8b": "Qwen/Qwen3-8B-Base",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",  # gated: its license accepted on the hub, then HF_TOKEN
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
}
