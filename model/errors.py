"""The model package's exceptions: one base, errors that name the bad value."""


class PromptPixError(Exception):
    """Base class of every error promptpix raises on purpose."""


class CheckpointError(PromptPixError):
    """A checkpoint file is missing, corrupt, hostile or does not match this code."""


class GenerationStopped(PromptPixError):
    """`generate` was asked to stop by its `should_stop` callback; nothing is returned."""
