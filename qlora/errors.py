"""QloraError: the base of every error qlora raises about its input (files, flags, recipes, data),
and the errors raised on more than one floor (CheckpointError, TrainingError).

    try:
        qlora.load_model(path)
    except qlora.QloraError as e:   # CheckpointError, DataError, ConfigError, TrainingError, InputError, ...
        print(e)                    # one line: the file (and tensor, line or byte) at fault, what to do

The subclasses keep the builtin base they always had (ValueError, RuntimeError), so existing
`except ValueError` code still catches them. The `qlora` command prints a QloraError as one
line and exits 2; `--debug` (or QLORA_DEBUG=1) shows the traceback.
"""
from __future__ import annotations


class QloraError(Exception):
    """Input that qlora cannot use; the message names what is at fault and says what to do."""


class CheckpointError(QloraError, ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and what to do."""


class TrainingError(QloraError, RuntimeError):
    """The run cannot continue; the message says why and what to do."""


class InputError(QloraError, ValueError):
    """An argument or flag value qlora cannot use (files, data, recipes and quant states have
    their own subclasses: CheckpointError, DataError, ConfigError, QuantStateError)."""
