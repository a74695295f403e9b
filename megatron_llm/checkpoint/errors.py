"""The one error type of unusable checkpoints (its own module: io.py and shards.py raise it)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the path and what is wrong."""
