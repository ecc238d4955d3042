"""The names of GPT-2's four sizes (book, 7.5), with no heavy imports: the CLI's choices come from here."""

from typing import Literal, get_args

ModelName = Literal["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"]
MODEL_NAMES: tuple[ModelName, ...] = get_args(ModelName)
# OpenAI's folder names for the same sizes.
OPENAI_SIZE_NAMES: dict[ModelName, str] = {
    "gpt2-small": "124M",
    "gpt2-medium": "355M",
    "gpt2-large": "774M",
    "gpt2-xl": "1558M",
}
