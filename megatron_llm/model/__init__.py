from megatron_llm.model.config import ModelConfig
from megatron_llm.model.gpt import GPT

__all__ = ["GPT", "ModelConfig"]
