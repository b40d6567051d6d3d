"""User-facing errors: the CLI prints these as one line, without a traceback."""


class JaxzeroError(Exception):
    """An error the user can fix; its message says what was found and what to do."""


class ConfigError(JaxzeroError):
    """A config file, key, type or value that is wrong."""


class DataError(JaxzeroError):
    """Malformed input data; the message names file, line and field."""


class CheckpointError(JaxzeroError):
    """A checkpoint that is missing, incomplete or of another architecture."""


class PeerLostError(JaxzeroError):
    """Another process of a multi-process run died (or stopped answering); this one cannot
    go on. The message names the processes lost and the last committed checkpoint."""

    def __init__(self, message: str, lost: list[int]):
        super().__init__(message)
        self.lost = lost
