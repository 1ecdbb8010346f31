"""The small protocols through which callbacks and the CLI reach a stage.

Callbacks never poke into a stage's attributes: they check for one of these protocols
(``isinstance(module, NeedsTeacher)``) and call its methods. A stage opts in by defining the
attribute/methods; no inheritance is needed.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

#: Strategy class names that shard parameters across ranks.
_SHARDED_STRATEGY_NAMES: tuple[str, ...] = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def is_sharded_strategy(strategy: Any) -> bool:
    """True for FSDP / DeepSpeed / model-parallel strategies (checked by class name along the MRO).

    Names rather than ``isinstance`` so that DeepSpeed need not be importable. Why it matters:
    bitsandbytes int8 weights cannot be sharded, and under sharding every rank must keep calling
    the model's forward in lock step (parameters are gathered collectively).
    """
    return any(cls.__name__ in _SHARDED_STRATEGY_NAMES for cls in type(strategy).__mro__)


@runtime_checkable
class NeedsTeacher(Protocol):
    """A stage that scores with a live, frozen teacher.

    ``needs_teacher`` may be False at run time (e.g. when teacher scores are read from the data),
    in which case the teacher callback loads nothing.
    """

    needs_teacher: bool

    def attach_teacher(self, teacher: nn.Module) -> None:
        """Keep a reference to ``teacher`` without registering it as a submodule.

        The teacher arrives frozen (eval mode, no gradients: :func:`kdlab.models.served.freeze`,
        as :func:`kdlab.models.served.load_teacher` returns it); the stage does not change it.
        """


@runtime_checkable
class HasBatchLoss(Protocol):
    """A stage that can compute its training loss for a batch, used by the gradient-variance callback.

    ``batch_loss`` must draw any randomness it needs (e.g. on-policy rollouts) afresh on every
    call, so that M calls on one batch give M independent gradient estimates; it must not log,
    step optimisers or change the stage's state.
    """

    def batch_loss(self, batch: Any) -> torch.Tensor:
        """The scalar loss whose gradient is the stage's gradient estimate for ``batch``."""


@runtime_checkable
class ExportsPretrained(Protocol):
    """A stage whose trained (served) model can be saved as an ordinary Hugging Face directory."""

    def export_pretrained(self, directory: str) -> None:
        """Write ``save_pretrained`` output (model + tokenizer) of the served model to ``directory``."""


@runtime_checkable
class ChecksData(Protocol):
    """A stage that can tell, from its config and the data alone, that a run cannot work.

    The CLI calls ``check_options`` and then ``check_data`` on the stage *class* before any model is
    built — ``check_data`` after the data module has read and validated its files
    (``check_inputs``) — so a mistake surfaces as one line in seconds, not after a backbone has
    loaded or a first step has run. A stage may define either method alone.
    """

    @classmethod
    def check_options(cls, init_args: Any) -> None:
        """Raise :class:`kdlab.errors.ConfigError` when the options alone (a mapping of the stage's
        init arguments) cannot work: a value out of range, options that contradict each other."""

    @classmethod
    def check_data(cls, init_args: Any, datamodule: Any) -> None:
        """Raise :class:`kdlab.errors.ConfigError` when ``init_args`` (a mapping of the stage's init
        arguments) cannot train on ``datamodule``'s data."""


@runtime_checkable
class HasMainMetric(Protocol):
    """A stage that names the validation metric its best checkpoint is chosen by:
    ``main_metric = ("val/ndcg@10", "max")`` (the name it logs, and ``max`` or ``min``)."""

    main_metric: tuple[str, str]


@runtime_checkable
class DescribesData(Protocol):
    """A data module that can say what it read, for the run's ``manifest.json`` (the run record)."""

    def data_record(self) -> dict[str, Any]:
        """JSON-serialisable: each split's source (format, files) and how its candidates were chosen
        (a run file, or BM25 with its parameters), with query and document counts."""


def attach_unregistered(owner: nn.Module, name: str, module: nn.Module | None) -> None:
    """Store ``module`` on ``owner`` without making it a submodule.

    The teacher must never be in ``state_dict``, ``parameters()``, ``.to()`` or the DDP wrapper;
    writing through ``object.__setattr__`` bypasses ``nn.Module.__setattr__``'s registration.
    """
    object.__setattr__(owner, name, module)
