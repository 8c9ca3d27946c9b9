"""The Colab notebooks in notebooks/: each .ipynb matches its jupytext .py, is committed
without outputs and opens in Colab from its badge; and each runs top to bottom on CPU
with its CPU parameters, in a fresh kernel of this interpreter, as a Colab user would."""

import os
import re
import sys
import time
from pathlib import Path

import jupytext
import nbclient
import nbformat
import pytest
from jupyter_client import KernelManager

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("01_quickstart", "02_dnas_search", "03_mixed_precision", "04_parallelism")
BADGE = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
         "(https://colab.research.google.com/github/dsjax/dsjax/blob/main/notebooks/{}.ipynb)")
# Seconds a single cell may run before the kernel is interrupted and the test fails.
CELL_TIMEOUT = 300


def _cells(notebook):
  return [(cell.cell_type, cell.source, cell.metadata.get("tags", []))
          for cell in notebook.cells]


def test_every_notebook_is_listed():
  assert sorted(path.stem for path in NOTEBOOKS.glob("*.py")) == sorted(NAMES)
  assert sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_matches_py_and_has_no_outputs(name):
  source = jupytext.read(NOTEBOOKS / f"{name}.py")
  paired = jupytext.read(NOTEBOOKS / f"{name}.ipynb")
  assert _cells(paired) == _cells(source), (
      f"notebooks/{name}.ipynb differs from its .py: run `jupytext --sync notebooks/{name}.py`")
  raw = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  for cell in raw.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, (
          f"notebooks/{name}.ipynb stores outputs: strip them (jupytext --sync does)")
  assert raw.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_layout(name):
  """A title with the Colab badge; an install cell that pips only what is missing; one
  cell tagged `parameters`."""
  cells = jupytext.read(NOTEBOOKS / f"{name}.py").cells
  assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# ")
  assert BADGE.format(name) in cells[0].source
  install = next(cell for cell in cells if cell.cell_type == "code")
  assert 'REPO_URL = "https://github.com/dsjax/dsjax"' in install.source
  assert re.search(r"try:\n +import dsjax\b.*\nexcept ImportError:", install.source)
  assert '"dsjax[plot] @ git+" + REPO_URL' in install.source
  assert [cell.cell_type for cell in cells if "parameters" in cell.metadata.get("tags", [])] \
      == ["code"]


def test_python3_kernel_is_this_interpreter():
  """nbclient's "python3" kernel starts this venv's python (ipykernel's spec says
  `python`, which jupyter_client replaces by sys.executable), so the notebooks import the
  dsjax under test."""
  assert KernelManager(kernel_name="python3").format_kernel_cmd()[0] == sys.executable


def _kernel_env():
  """The test process's environment (conftest's XLA flags and compilation cache) without
  its 8 simulated devices: a Colab CPU runtime has one, and 04 must add them itself."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(flag for flag in env.get("XLA_FLAGS", "").split()
                              if not flag.startswith("--xla_force_host_platform_device_count"))
  env["JAX_PLATFORMS"] = "cpu"
  # Whatever the venv's install mode, the kernel imports this checkout (and never pips).
  root = str(NOTEBOOKS.parent)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
  return env


def _execute(name, tmp_path):
  notebook = jupytext.read(NOTEBOOKS / f"{name}.py")
  # A last cell proving the kernel ran this interpreter and this checkout's dsjax.
  notebook.cells.append(nbformat.v4.new_code_cell(
      "import sys, dsjax\nprint(sys.prefix, dsjax.__file__)"))
  client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  start = time.perf_counter()
  client.execute(env=_kernel_env())  # Raises CellExecutionError naming the failing cell.
  print(f"{name}: executed in {time.perf_counter() - start:.1f} s")
  prefix, dsjax_file = notebook.cells[-1].outputs[0].text.split()
  assert prefix == sys.prefix
  assert Path(dsjax_file).resolve().is_relative_to(NOTEBOOKS.parent)
  return notebook


def _outputs(notebook, kind):
  return [output for cell in notebook.cells if cell.cell_type == "code"
          for output in cell.outputs if kind in output.get("data", {})]


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
  notebook = _execute("01_quickstart", tmp_path)
  # Curves, learning rate, predicted test images.
  assert len(_outputs(notebook, "image/png")) == 3
  assert (tmp_path / "runs/quickstart/summary.json").exists()


@pytest.mark.slow
def test_dnas_search_runs(tmp_path):
  notebook = _execute("02_dnas_search", tmp_path)
  assert len(_outputs(notebook, "image/png")) == 2  # Probabilities, curves.
  assert len(_outputs(notebook, "text/markdown")) == 1  # The comparison table.
  assert (tmp_path / "runs/dnas/architecture.json").exists()


@pytest.mark.slow
def test_mixed_precision_runs(tmp_path):
  notebook = _execute("03_mixed_precision", tmp_path)
  assert len(_outputs(notebook, "image/png")) == 3  # Curves, loss scale, plan.
  for run in ("fp32", "bf16", "mixed", "mixed-fp16"):
    assert (tmp_path / "runs" / run / "summary.json").exists()


@pytest.mark.slow
def test_parallelism_runs(tmp_path):
  notebook = _execute("04_parallelism", tmp_path)
  printed = "".join(output.get("text", "") for cell in notebook.cells
                    if cell.cell_type == "code" for output in cell.outputs)
  assert "8 devices" in printed and "pipe=2,data=2,fsdp=1,model=2" in printed
  assert len(_outputs(notebook, "text/html")) == 2  # visualize_array_sharding (rich).
  assert len(_outputs(notebook, "image/png")) == 1  # Curves.
