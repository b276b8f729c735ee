"""User-facing errors: one line, naming the file (and line or offset), with a distinct exit code each."""

from __future__ import annotations


class InfinitrainError(Exception):
    """An error caused by the user's input or environment; the CLI prints ``str(err)`` and exits ``code``."""

    code = 2

    def __init__(self, message: str):
        super().__init__(message)


class ConfigError(InfinitrainError):
    """A bad config, recipe, override or argument value."""

    code = 3


class DataError(InfinitrainError):
    """Unreadable, malformed or corrupt input data or shards (names file and line/offset)."""

    code = 4


class CheckpointError(InfinitrainError):
    """A missing, corrupt or incompatible checkpoint or model directory."""

    code = 5


class TrainingAborted(InfinitrainError):
    """Training stopped on purpose (too many skipped non-finite steps)."""

    code = 6


EXIT_CODES = {cls.__name__: cls.code for cls in (InfinitrainError, ConfigError, DataError, CheckpointError, TrainingAborted)}


class ShardCorruptError(DataError):
    """A prepared shard or index whose bytes do not match its recorded size, sha256 or zstd checksum."""

    code = 7


EXIT_CODES[ShardCorruptError.__name__] = ShardCorruptError.code
