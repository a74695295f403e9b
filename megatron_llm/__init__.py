"""megatron_llm: distributed pretraining of GPT-style language models."""

__version__ = "0.1.0"
