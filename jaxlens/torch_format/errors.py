"""The errors a lens file that jaxlens will not read raises."""

from __future__ import annotations


class LensFileError(ValueError):
    """A lens file that is truncated, corrupt, or not what a tuned-lens directory holds."""


class UnsafeLensFileError(LensFileError):
    """A lens file that reaches beyond a tensor state dict.

    Its pickle names a global a state dict never needs (loading it could run code from the file),
    or its zip archive holds a member outside the folder `torch.save` writes everything into.
    """
