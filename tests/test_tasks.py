"""The task registry: tasks by name, built from the data, each checking its dataset."""

import dataclasses

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dsjax.errors import ConfigError
from dsjax.train import tasks


def _data_config(**fields):
  return ml_collections.ConfigDict({"name": "test", "augment": False, "mlm_probability": 0.15,
                                    "max_predictions": -1, **fields})


def test_task_by_name_is_the_registered_class():
  assert tasks.known_tasks() == ["classification", "ctr", "detection", "mlm"]
  assert type(tasks.Task("classification")) is tasks.ClassificationTask
  assert tasks.Task("classification") == tasks.ClassificationTask()
  assert tasks.Task(name="ctr") == tasks.CtrTask()
  mlm = tasks.Task("mlm", mask_id=4, vocab_size=9)
  assert isinstance(mlm, tasks.MlmTask) and mlm.mask_id == 4
  assert dataclasses.replace(mlm, max_predictions=0) == tasks.MlmTask(
      mask_id=4, vocab_size=9, max_predictions=0)


def test_unknown_task_names_the_known_ones():
  for build in (lambda: tasks.Task("segmentation"),
                lambda: tasks.make_task("segmentation", _data_config(), {})):
    with pytest.raises(ConfigError, match="unknown task 'segmentation'; known tasks: "
                                          "classification, ctr, detection, mlm"):
      build()
  with pytest.raises(ConfigError, match="registered as task 'classification', not 'mlm'"):
    tasks.ClassificationTask("mlm")


def test_make_task_reads_the_data_config_and_metadata():
  assert tasks.make_task("classification", _data_config(augment=True), {}) == (
      tasks.ClassificationTask(augment=True))
  assert tasks.make_task("ctr", _data_config(), {"bayes_auc": 0.8}) == tasks.CtrTask()
  mlm = tasks.make_task("mlm", _data_config(max_predictions=3),
                        {"mask_id": 4, "vocab_size": 99, "special_ids": [0, 2, 3]})
  assert mlm == tasks.MlmTask(mask_id=4, vocab_size=99, special_ids=(0, 2, 3), max_predictions=3)
  with pytest.raises(ConfigError, match=r"no token metadata \(mask_id, vocab_size, special_ids"):
    tasks.make_task("mlm", _data_config(), {})


def test_check_dataset_names_what_the_task_reads_and_the_dataset_lacks():
  images = {"train": {"image": np.zeros((2, 8, 8, 1)), "label": np.zeros(2)}}
  tasks.check_dataset(tasks.Task("classification"), images, "cnn-digits", "digits")
  with pytest.raises(ConfigError, match=r"bert-tiny \(mlm\) cannot train on dataset 'digits': "
                                        "it has no attention_mask, input_ids, token_type_ids"):
    tasks.check_dataset(tasks.Task("mlm"), images, "bert-tiny", "digits")
  clicks = {"train": {"dense": np.zeros((2, 13)), "sparse": np.zeros((2, 26))}}
  with pytest.raises(ConfigError, match="has no label"):
    tasks.check_dataset(tasks.Task("ctr"), clicks, "wide-deep", "ctr-synthetic")


def test_a_registered_task_trains_through_the_same_calls(monkeypatch):
  """A new task is one subclass: the base drops the example index and passes the inputs."""
  monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))

  @tasks.register_task
  @dataclasses.dataclass(frozen=True)
  class RegressionTask(tasks.Task):
    name: str = "regression"
    input_keys = ("x",)
    target_keys = ("y",)

    def score(self, outputs, batch):
      error = (outputs - batch["y"]) ** 2
      return {"loss": error, "correct": jnp.zeros_like(error), "weight": jnp.ones_like(error)}

  task = tasks.make_task("regression", _data_config(), {})
  assert type(task) is RegressionTask and "regression" in tasks.known_tasks()
  batch = {"x": jnp.ones(3), "y": jnp.zeros(3), tasks.EXAMPLE_INDEX: jnp.arange(3)}
  prepared = task.prepare(batch, None, train=False)
  assert set(prepared) == {"x", "y"}
  assert task.model_args(prepared)[0][0] is batch["x"]
  np.testing.assert_array_equal(task.score(*task.model_args(prepared)[0], prepared)["loss"],
                                np.ones(3))
  with pytest.raises(ValueError, match="registered twice"):
    tasks.register_task(RegressionTask)
