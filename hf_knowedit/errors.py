"""Typed errors raised by hf-knowedit.

Every error subclasses the built-in exception that fits, so ``except ValueError`` keeps working, and every message
says what was given, what was expected, and how to fix it.
"""


class KnowEditError(Exception):
    """Base class of every error raised on purpose by hf-knowedit."""


class EditRequestError(KnowEditError, ValueError):
    """An edit request is malformed: missing subject, empty target, prompt too long for the model, ..."""


class ContradictoryRequestsError(EditRequestError):
    """Requests of one edit call ask for different targets of the same subject and prompt, which a method that solves
    for all of them at once (ROME, MEMIT, AlphaEdit) cannot satisfy together.

    Attributes:
        conflicts (`list[tuple[int, int]]`): `(first, later)` positions in the call's requests: each `later` request
            contradicts the `first` one with its prompt and subject. Editing all but the `later` ones works.
    """

    def __init__(self, message: str, conflicts: list[tuple[int, int]]):
        super().__init__(message)
        self.conflicts = conflicts


class EditConfigError(KnowEditError, ValueError):
    """An edit config has a field out of range, or belongs to another method than the one asked for."""


class ArchitectureNotSupportedError(KnowEditError, ValueError):
    """The model's structure could not be resolved into blocks, MLP projections, norms and head."""


class BaseModelMismatchError(KnowEditError, ValueError):
    """An artifact (edit, statistics, trained editor) was made for another base model than the one given."""


class ArtifactError(KnowEditError, OSError):
    """An artifact on disk or on the Hub is missing, truncated, corrupted, or not an hf-knowedit artifact."""


class EditNotFoundError(KnowEditError, KeyError):
    """A named edit does not exist on this model."""

    def __str__(self):  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class EditFailedError(KnowEditError, RuntimeError):
    """An editing method could not produce a valid update (NaN or Inf, singular system, ...); nothing was changed."""


class OffloadedWeightsError(KnowEditError, RuntimeError):
    """An operation must write a weight that accelerate has offloaded (to CPU memory or disk) and loads per forward."""


class StatisticsError(KnowEditError, ValueError):
    """Second-moment statistics cannot be computed or used as asked."""


class CorpusNotFoundError(StatisticsError):
    """No text corpus was given and none could be found (no `HF_KNOWEDIT_STATS_CORPUS`, no WikiText via `datasets`)."""


class InsufficientTokensError(StatisticsError):
    """The corpus (or `num_tokens`) gives fewer key vectors than the layer's width, so the second moment is singular."""


class SingularStatisticsError(StatisticsError):
    """The second moment is singular (some directions of the key space were never seen), so it cannot be inverted."""


__all__ = [
    "KnowEditError",
    "EditRequestError",
    "EditConfigError",
    "ArchitectureNotSupportedError",
    "BaseModelMismatchError",
    "ArtifactError",
    "EditNotFoundError",
    "EditFailedError",
    "StatisticsError",
    "CorpusNotFoundError",
    "InsufficientTokensError",
    "SingularStatisticsError",
]
