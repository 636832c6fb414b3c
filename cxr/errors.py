"""Errors a user can act on, in a module of their own so that importing them (cxr.cli, which every
stage imports) does not make every stage depend on the fetch and split code."""

from __future__ import annotations


class FetchError(RuntimeError):
    """One or more files could not be fetched and verified."""


class LeakageError(RuntimeError):
    """A patient group, an identical file or the same picture sits on both sides of a split."""


class InputError(ValueError):
    """An input file or option that does not fit: arrays and manifests of different rows, a
    model and data of different sizes, labels the model does not know. A ValueError, so code
    that catches those still catches it."""


class BundleError(RuntimeError):
    """The model bundle (models/bundle.json) or a site calibration is missing, unreadable, or does
    not match the checkpoints beside it."""
