"""Errors raised by the model package; callers map them to job error codes at their edge."""


class BoraModelError(Exception):
    """Base class of every error `model/` raises on purpose."""


class InvalidInput(BoraModelError, ValueError):
    """A request the model cannot serve (frames, size, steps, sampler...)."""


class NumericalError(BoraModelError):
    """The latent became non-finite during sampling."""


class Interrupted(BoraModelError):
    """Sampling stopped between steps because the caller asked to cancel."""


class CheckpointError(BoraModelError):
    """A checkpoint is unreadable, or its keys do not match the model."""


class DatasetError(BoraModelError):
    """Training data cannot be used as given (bad CSV row, missing, unreadable or too short video)."""
