"""User-facing errors: one line, naming the file (and line or offset), with a distinct exit code each.

Exit codes of every command (README "Exit codes"; each is produced by a test in tests/faults/):
    0    success
    1    a bug: an unexpected exception (traceback)
    2    InfinitrainError, or a command-line usage error (Click)
    3    ConfigError: bad recipe, config, override or argument
    4    DataError: unreadable or malformed input data, tokenizer or model file
    5    CheckpointError: missing, corrupt, incompatible or unsafe (pickled code) checkpoint; failed save
    6    TrainingAborted: run.max_nonfinite non-finite steps in a row
    7    ShardCorruptError: a prepared shard's bytes do not match its index
    8    CollectiveError: a peer rank died or a collective timed out (run.timeout_s); resume with --resume auto
    128+N  Preempted by signal N after committing a checkpoint (143 SIGTERM, 130 SIGINT)
"""

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


class ShardCorruptError(DataError):
    """A prepared shard or index whose bytes do not match its recorded size, sha256 or zstd checksum."""

    code = 7


class CollectiveError(InfinitrainError):
    """A collective failed: a peer rank died, or it hung past run.timeout_s. The last committed checkpoint is
    intact; restart the job with --resume auto."""

    code = 8


class Preempted(InfinitrainError):
    """SIGTERM/SIGINT: a checkpoint was committed and the run stopped; exit code 128 + signal number."""

    code = 128 + 15  # SIGTERM; SIGINT gives 130

    def __init__(self, signum: int, path):
        import signal

        super().__init__(f"stopped by {signal.Signals(signum).name} after committing {path}")
        self.code = 128 + signum


EXIT_CODES = {cls.__name__: cls.code for cls in (InfinitrainError, ConfigError, DataError, CheckpointError,
                                                 TrainingAborted, ShardCorruptError, CollectiveError, Preempted)}
