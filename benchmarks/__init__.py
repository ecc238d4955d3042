"""Speed of sft-job against the book's code (llms-from-scratch) and Hugging Face transformers."""
