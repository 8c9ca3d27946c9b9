"""Training: state, the jitted step, the loop, checkpoints and metric outputs."""

from dsjax.train.loop import evaluate, train_and_evaluate
from dsjax.train.state import TrainState, create_train_state
from dsjax.train.step import make_eval_step, make_train_step
from dsjax.train.tasks import Task, make_task

__all__ = ["Task", "TrainState", "create_train_state", "evaluate", "make_eval_step",
           "make_task", "make_train_step", "train_and_evaluate"]
