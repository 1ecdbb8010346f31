"""Lightning callbacks of kdlab, installed as ``kdlab.callbacks`` (the source lives in the
top-level ``callbacks/`` folder). They reach a stage only through :mod:`kdlab.protocols`."""

from kdlab.callbacks.grad_variance import GradVariance
from kdlab.callbacks.predictions import RankingPredictionWriter
from kdlab.callbacks.run_record import RunRecord
from kdlab.callbacks.teacher import TeacherLoader

__all__ = ["GradVariance", "RankingPredictionWriter", "RunRecord", "TeacherLoader"]
