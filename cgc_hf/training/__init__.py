"""Training: the Accelerate loop and the pieces it is made of.

- :mod:`.loop`: :class:`CGCTrainer`, the loop alone;
- :mod:`.checkpoints`: atomic checkpoints, pruning, resume state;
- :mod:`.run_folder`: what a run folder holds and when it may be replaced;
- :mod:`.optim`: parameter groups, optimizer and learning-rate schedule;
- :mod:`.loaders`: seeded labeled / unlabeled / eval loaders;
- :mod:`.stream`: a streamed unlabeled pool (``IterableDataset``) and what resume means for it;
- :mod:`.guards`: non-finite steps and out-of-memory advice.
"""

from .checkpoints import COMPLETE, TrainerState, complete_checkpoints, latest_checkpoint
from .loaders import loader_options
from .loop import CGCTrainer, set_seed

__all__ = [
    "COMPLETE",
    "CGCTrainer",
    "TrainerState",
    "complete_checkpoints",
    "latest_checkpoint",
    "loader_options",
    "set_seed",
]
