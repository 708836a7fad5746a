"""Errors that tftransfer raises for problems the user can fix.

The command line prints these as one clear message and exits non-zero, without a
traceback; from Python they are ordinary exceptions.
"""


class TransferError(Exception):
    """Base class: a problem with the user's input, data, files or environment."""


class SettingError(TransferError, ValueError):
    """A setting (an argument, an option, `TF_CONFIG`) has a value that cannot work."""


class DataError(TransferError, ValueError):
    """The image folder cannot be used as given (missing, empty, one class, ...)."""


class WeightsUnavailableError(TransferError, RuntimeError):
    """Pretrained weights were asked for but could not be found or downloaded."""


class RunFolderError(TransferError, FileExistsError):
    """A run folder already holds a finished run and `overwrite` was not given."""


class WorkerError(TransferError, RuntimeError):
    """Another worker of a multi-worker run stopped, or disagrees with this one."""


def check_choice(name: str, value, choices) -> None:
    """Raises `ValueError` naming `name`'s choices unless `value` is one of them."""
    if value not in choices:
        raise SettingError(
            f"`{name}` must be one of {choices}. Received: {name}={value!r}"
        )


class TrainingDiverged(TransferError, FloatingPointError):
    """The training loss became NaN or infinite: a rate too high, or bad images."""
