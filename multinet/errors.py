"""Errors that multinet raises on bad input.

Each carries a one-line message meant for the user, so the CLI can print it as is and exit 2.
"""


class MultinetError(Exception):
    """Base class: a problem with the user's input, not a bug in multinet."""


class TraceError(MultinetError):
    """The model cannot be traced by torch.fx (data-dependent control flow, unsupported calls)."""


class InputShapeError(MultinetError):
    """The example inputs do not fit the model."""


class PruneError(MultinetError):
    """A pruning request that cannot be carried out (bad group, bad indices, zero channels)."""
