"""The error every tokenizer backend raises, in a module of its own so that the backends
(megatron_llm/data/tokenizer.py, hf_tokenizer.py) need not import each other to share it."""


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used, with the path and the fix in the message."""
