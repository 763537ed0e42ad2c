"""Exceptions raised by ringlet. Each names the offending file, tensor, field or value."""


class RingletError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class CheckpointError(RingletError):
    """A model path that is missing, unreadable, truncated, corrupted or disagrees with its config."""


class ConfigError(RingletError):
    """A model or engine configuration that cannot work (bad sizes, unsupported options)."""


class RequestError(RingletError):
    """A request the engine refuses: empty prompt, prompt beyond the context, bad sampling parameters."""
