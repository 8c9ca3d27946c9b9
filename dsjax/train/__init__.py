"""Training: state, the jitted step, the loop, checkpoints and metric outputs."""

from dsjax.train.loop import evaluate, train_and_evaluate
from dsjax.train.state import TrainState, create_train_state
from dsjax.train.step import eval_step, make_train_step

__all__ = ["TrainState", "create_train_state", "eval_step", "evaluate", "make_train_step",
           "train_and_evaluate"]
