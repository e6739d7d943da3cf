"""User-facing errors: each one is reported by the CLI as one line with a non-zero exit."""
from __future__ import annotations


class LayerpipeError(Exception):
    """An error the user can cause and fix (bad input, missing data, diverged training)."""


class PlanError(LayerpipeError):
    """The model, partition, schedule or delays do not form a valid pipeline."""


class DataError(LayerpipeError):
    """A dataset is missing, corrupt or unknown."""


class TrainingDiverged(LayerpipeError):
    """The loss became NaN or infinite."""


class DistributedError(LayerpipeError):
    """A stage process failed, timed out or could not be reached."""


class MissingExtra(LayerpipeError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str, what: str):
    """Import `module`, or raise MissingExtra naming `pip install 'layerpipe[extra]'`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{what} needs {module.split('.')[0]}, which is not installed: "
                           f"pip install 'layerpipe[{extra}]'") from None
