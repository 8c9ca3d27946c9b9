"""Training and search: resolve, state, the step builders and cache, the loop, checkpoints
and metric outputs."""

from dsjax.train.evaluation import evaluate
from dsjax.train.loop import train_and_evaluate
from dsjax.train.resolve import RunPlan, resolve
from dsjax.train.search import search_architecture
from dsjax.train.state import TrainState, create_train_state
from dsjax.train.step import make_eval_step, make_search_step, make_train_step
from dsjax.train.tasks import Task, make_task

__all__ = ["RunPlan", "Task", "TrainState", "create_train_state", "evaluate",
           "make_eval_step", "make_search_step", "make_task", "make_train_step", "resolve",
           "search_architecture", "train_and_evaluate"]
