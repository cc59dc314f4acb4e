"""The errors a user can cause, in one light module (the CLI catches them without
importing torch or MLflow first). Each message is one line naming the file or field."""


class ConfigError(ValueError):
    """Bad input: a spec, a setting or an option. The message names the file and the field."""


class DataError(RuntimeError):
    """Missing, truncated or corrupt data. The message names the directory or file."""


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or written. The message names the URI."""


class DeviceError(RuntimeError):
    """The device asked for (CUDA, MPS) is not on this machine. The message names it."""


class MissingExtra(ConfigError):
    """An optional part of cnnbench (a pyproject extra: report, ui, postgres) is not
    installed. The message names the extra and the pip command that installs it."""


class StorageError(RuntimeError):
    """The machine let a running study down: no space left, a read-only, vanished or
    forbidden folder, a store that is not a database. The message names the path or
    store and the cause; the study stopped cleanly and the same command resumes it once
    the cause is fixed (exit status 1: ran but could not finish)."""


class Unfinished(RuntimeError):
    """A study or sweep ran but could not finish: its worker processes kept dying, say.
    The message says what is left and why (exit status 1)."""
