"""chattune: fine-tune chat LLMs on your own conversations (Qwen finetune.py workflow, for every chat model)."""

__version__ = "0.1.0"
