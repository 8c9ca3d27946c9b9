"""`dsjax-train` as a user runs it: outputs, resume after SIGKILL, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_checkpoint import assert_trees_equal, final_state

from dsjax import cli

REPO = Path(__file__).resolve().parents[1]
TINY = f"--config={REPO}/configs/digits_cnn.py:tiny"


# These tests exercise the command line, not parallelism: they run on a one-device machine
# (tests/test_multihost.py runs the CLI on 8 devices and on two processes).
ONE_DEVICE = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
    "--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=1"))


def run_cli(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "dsjax.train", *args], cwd=REPO, env=ONE_DEVICE,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_seed_style_command_writes_all_outputs(tmp_path):
  result = run_cli("--model", "cnn-digits", "--precision", "fp32", "--batch-size", "32",
                   "--gradient-accumulation", "2", "--steps", "4", "--workdir", str(tmp_path),
                   "--config.train.log_every_steps=2", "--config.model.features=(4,8)")
  assert result.returncode == 0, result.stderr
  assert "final (4 steps): test_accuracy=" in result.stdout
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["train"]["batch_size"] == 32 and config["train"]["grad_accum_steps"] == 2
  assert config["model"]["features"] == [4, 8]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [2, 4]
  for key in ("loss", "accuracy", "learning_rate", "grad_norm", "examples_per_sec",
              "loss_scale", "skipped_steps", "fp16_matmul_flops_fraction", "step_ms",
              "data_wait_ms", "device_ms"):
    assert all(key in r for r in records), key
  assert all(0 < r["mfu"] <= 1 and r["tflops_per_device"] > 0 for r in records)
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["steps"] == 4 and 0 <= summary["eval_accuracy"] <= 1
  assert summary["flops_per_step"] > 0 and summary["memory"]["params_bytes"] > 0
  assert list(tmp_path.glob("events.out.tfevents.*"))
  assert (tmp_path / "checkpoints" / "4").is_dir()


@pytest.mark.slow
def test_profile_command_writes_a_report(tmp_path):
  result = subprocess.run([sys.executable, "-m", "dsjax.profile", TINY, "--steps", "4",
                           "--workdir", str(tmp_path)], cwd=REPO, env=ONE_DEVICE,
                          capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "step time" in result.stdout and "top bottleneck" in result.stdout
  report = json.loads((tmp_path / "profile.json").read_text())
  assert report["flops_per_step"] > 0 and 0 < report["mfu"] <= 1


def kill_after_first_checkpoint(args: list[str], workdir: Path) -> int:
  """Runs `dsjax-train ARGS` on one device, SIGKILLs it just after its first checkpoint
  (somewhere between checkpoints, possibly inside a save); returns the newest complete
  checkpoint's step."""
  process = subprocess.Popen([sys.executable, "-m", "dsjax.train", *args], cwd=REPO,
                             env=ONE_DEVICE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  checkpoints = workdir / "checkpoints"
  while time.time() < deadline and process.poll() is None:
    if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
      break
    time.sleep(0.01)
  time.sleep(0.1)
  assert process.poll() is None, "the run finished before it could be killed"
  os.kill(process.pid, signal.SIGKILL)
  assert process.wait() == -signal.SIGKILL
  return final_state(workdir)[0]


@pytest.mark.slow
def test_sigkill_mid_run_resumes_to_identical_parameters(tmp_path):
  # The tiny CNN: 300 steps take about a second, checkpoints every 50 leave a window of
  # five saves to be killed in; start-up and compilation are most of each run.
  args = [TINY, "--steps", "300", "--batch-size", "32", "--config.checkpoint.every_steps=50",
          "--config.train.log_every_steps=50", "--config.train.eval_every_steps=300"]
  straight = run_cli(*args, "--workdir", str(tmp_path / "straight"))
  assert straight.returncode == 0, straight.stderr

  workdir = tmp_path / "killed"
  killed_at = kill_after_first_checkpoint([*args, "--workdir", str(workdir)], workdir)
  assert 0 < killed_at < 300

  resumed = run_cli(*args, "--workdir", str(workdir))
  assert resumed.returncode == 0, resumed.stderr
  step_a, state_a = final_state(tmp_path / "straight")
  step_b, state_b = final_state(workdir)
  assert step_a == step_b == 300
  assert_trees_equal(state_a, state_b)


@pytest.mark.slow
def test_extending_steps_matches_a_longer_fresh_run(tmp_path):
  """The issue's check: --steps N, then --steps 2N on the same workdir == fresh 2N run."""
  common = [TINY, "--config.train.eval_every_steps=100", "--config.train.log_every_steps=3"]
  assert run_cli(*common, "--steps", "3", "--workdir", str(tmp_path / "w")).returncode == 0
  extended = run_cli(*common, "--steps", "6", "--workdir", str(tmp_path / "w"))
  assert extended.returncode == 0, extended.stderr
  fresh = run_cli(*common, "--steps", "6", "--workdir", str(tmp_path / "fresh"))
  assert fresh.returncode == 0, fresh.stderr
  assert_trees_equal(final_state(tmp_path / "w")[1], final_state(tmp_path / "fresh")[1])


def test_model_flag_alone_picks_the_models_config_file_and_argument():
  argv = cli._with_default_config(["dsjax-train", "--model", "bert-mini", "--steps", "3"])
  assert argv == ["dsjax-train", f"--config={REPO}/configs/bert_tiny.py:model=bert-mini",
                  "--model", "bert-mini", "--steps", "3"]


BAD_INPUTS = [
    (["--model", "resnet-9000"], "unknown model 'resnet-9000'; known models: bert-base, "
     "bert-mini, bert-tiny, centernet-dnas, centernet-resnet, cnn-cifar10, cnn-digits"),
    ([TINY, "--config.train.stepz=3"],
     "--config.train.stepz: the config has no key 'stepz' (did you mean 'steps'?)"),
    ([TINY, "--config.train.steps=abc"], "flag --config.train.steps=abc: invalid literal"),
    ([TINY, "--batch-size", "30", "--gradient-accumulation", "4"],
     "train.batch_size=30 does not split into train.grad_accum_steps=4"),
    ([TINY, "--precision", "fp8"], "flag --precision=fp8: value should be one of"),
    ([TINY, "--steps", "0"], "train.steps must be >= 1, got 0"),
    (["--config", "configs/no_such_file.py"], "config file configs/no_such_file.py not found"),
    ([f"--config={REPO}/configs/digits_cnn.py:huge"], "unknown config variant 'huge'"),
    ([f"--config={REPO}/configs/cifar10_cnn.py:tiny"], "cifar10 needs --config.data.data_dir"),
    ([f"--config={REPO}/configs/cifar10_cnn.py:tiny", "--config.data.data_dir=/nonexistent"],
     "/nonexistent"),
    ([TINY, "--model", "cnn-cifar10"], "--model cnn-cifar10 differs from the config file's"),
    ([TINY, "--no-such-flag=1"], "Unknown command line flag 'no-such-flag'"),
    (["--model", "dnas-digits"], "model dnas-digits is a DNAS supernet: run dsjax-search first"),
    ([TINY, "--architecture", "a.json"], "--architecture applies to DNAS models (dnas-*)"),
    ([f"--config={REPO}/configs/digits_dnas.py:tiny", "--architecture", "/nonexistent.json"],
     "architecture file /nonexistent.json does not exist"),
]


@pytest.mark.parametrize("args, expected", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_input_one_line_error(tmp_path, args, expected):
  result = run_cli(*args, "--workdir", str(tmp_path / "w"))
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("dsjax-train: error: ") and expected in lines[0], lines[0]
  assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_search_then_retrain_via_cli(tmp_path):
  dnas = f"--config={REPO}/configs/digits_dnas.py:tiny"
  searched = subprocess.run([sys.executable, "-m", "dsjax.nas", dnas, "--workdir",
                             str(tmp_path / "search")], cwd=REPO, env=ONE_DEVICE,
                          capture_output=True,
                            text=True, timeout=300)
  assert searched.returncode == 0, searched.stderr
  assert "ops (most probable first)" in searched.stdout
  architecture = json.loads((tmp_path / "search" / "architecture.json").read_text())
  assert architecture["params"] > 0 and len(architecture["blocks"]) == 2
  result = run_cli(dnas, "--architecture", str(tmp_path / "search" / "architecture.json"),
                   "--workdir", str(tmp_path / "retrain"))
  assert result.returncode == 0, result.stderr
  summary = json.loads((tmp_path / "retrain" / "summary.json").read_text())
  assert summary["memory"]["params_bytes"] == 4 * architecture["params"]


def test_missing_workdir_is_an_error():
  result = run_cli(TINY)
  assert result.returncode == 2
  assert result.stderr.strip() == ("dsjax-train: error: --workdir is required: the folder for "
                                   "checkpoints and logs (rerunning on the same folder resumes)")


@pytest.mark.slow
def test_corrupt_checkpoint_via_cli(tmp_path):
  assert run_cli(TINY, "--workdir", str(tmp_path)).returncode == 0
  for path in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  result = run_cli(TINY, "--steps", "4", "--workdir", str(tmp_path))
  assert result.returncode == 2
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert "checkpoints/2 cannot be restored" in result.stderr
  assert "left untouched" in result.stderr


@pytest.mark.parametrize("module, program", [("dsjax.train", "dsjax-train"),
                                             ("dsjax.profile", "dsjax-profile"),
                                             ("dsjax.nas", "dsjax-search")])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_answers_help(module, program, flag):
  result = subprocess.run([sys.executable, "-m", module, flag], cwd=REPO, env=ONE_DEVICE,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and result.stderr == "", result.stderr
  text = result.stdout
  assert text.startswith(f"usage: {program} ")
  command = {"dsjax-train": cli.TRAIN, "dsjax-profile": cli.PROFILE,
             "dsjax-search": cli.SEARCH}[program]
  for name in command.flags:  # Each flag it takes, with its meaning and default.
    assert f"\n  --{name}" in text, name
  assert " ".join(text.split()).count("(default: ") == len(command.flags)
  assert "--config FILE[:variant] loads an experiment file" in text
  assert "--config.section.field=value" in text and f"example:\n  {program} " in text
  models = ["dnas-digits", "dnas-cifar10"] if program == "dsjax-search" else [
      "cnn-digits", "bert-base", "wide-deep", "resnet20"]
  assert all(f"\n  {name} " in text for name in models)


def test_helpfull_adds_absls_flags():
  result = subprocess.run([sys.executable, "-m", "dsjax.train", "--helpfull"], cwd=REPO,
                          env=ONE_DEVICE, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and "all flags (absl):" in result.stdout
  assert "--undefok" in result.stdout


@pytest.mark.parametrize("module, args, expected", [
    ("dsjax.train", ["--trace"], "dsjax-train does not take --trace: a jax.profiler trace is "
     "taken by dsjax-profile"),
    ("dsjax.nas", ["--grad-compression", "topk:0.1"], "dsjax-search does not take "
     "--grad-compression: the search step exchanges its gradients densely"),
    ("dsjax.nas", ["--init-from", "x"], "dsjax-search does not take --init-from"),
    ("dsjax.nas", ["--config.train.grad_accum_steps=2"], "train.grad_accum_steps=2: the "
     "search takes whole batches"),
    ("dsjax.nas", ["--config.mesh.data=3"], "has 3 devices but there are 1"),
])
def test_a_flag_that_cannot_act_is_refused(tmp_path, module, args, expected):
  result = subprocess.run([sys.executable, "-m", module, *args, "--workdir", str(tmp_path)],
                          cwd=REPO, env=ONE_DEVICE, capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert expected in result.stderr, result.stderr


def test_search_steps_flag_sets_the_search_length(tmp_path):
  """`dsjax-search --steps N` is the search's own length (search.steps), not train.steps."""
  argv = ["dsjax-search", f"--config={REPO}/configs/digits_dnas.py:tiny", "--steps", "7",
          "--workdir", str(tmp_path)]
  config = cli._parse(cli.SEARCH, argv)
  assert config.search.steps == 7 and config.train.steps != 7


def test_config_file_is_found_among_the_installed_configs(tmp_path, monkeypatch):
  """From any folder: `--config digits_cnn.py:tiny` or `configs/digits_cnn.py:tiny`."""
  monkeypatch.chdir(tmp_path)
  for name in ("digits_cnn.py:tiny", "configs/digits_cnn.py:tiny"):
    argv = cli._with_default_config(["dsjax-train", "--steps", "3", "--config", name])
    assert argv == ["dsjax-train", f"--config={cli.CONFIGS_DIR / 'digits_cnn.py'}:tiny",
                    "--steps", "3"]


@pytest.mark.slow
def test_plot_command(tmp_path):
  assert run_cli(TINY, "--workdir", str(tmp_path / "run")).returncode == 0
  plot = [sys.executable, "-c", "from dsjax.cli import plot_main; plot_main()"]
  result = subprocess.run([*plot, str(tmp_path / "run"), "--out", str(tmp_path / "png")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert f"wrote {tmp_path / 'png' / 'curves.png'}" in result.stdout
  assert (tmp_path / "png" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  helped = subprocess.run([*plot, "--help"], capture_output=True, text=True, timeout=60)
  assert helped.returncode == 0 and helped.stdout.startswith("usage: dsjax-plot WORKDIR")
  for args, expected in ((["--out", "x"], "give at least one WORKDIR"),
                         ([str(tmp_path / "none")], "metrics.jsonl")):
    failed = subprocess.run([*plot, *args], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 2 and len(failed.stderr.strip().splitlines()) == 1
    assert failed.stderr.startswith("dsjax-plot: error: ") and expected in failed.stderr


@pytest.mark.slow
def test_export_command(tmp_path):
  """dsjax-export through its entry point: --help, a StableHLO export of a CLI run, and
  one-line errors (the library's exports are tested in tests/test_export.py)."""
  export = [sys.executable, "-c", "from dsjax.cli import export_main; export_main()"]
  helped = subprocess.run([*export, "--help"], capture_output=True, text=True, timeout=60)
  assert helped.returncode == 0 and helped.stdout.startswith("usage: dsjax-export --workdir")
  assert run_cli(TINY, "--workdir", str(tmp_path / "run")).returncode == 0
  result = subprocess.run([*export, "--workdir", str(tmp_path / "run"), "--format", "stablehlo"],
                          cwd=REPO, env=ONE_DEVICE, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "stablehlo  model.stablehlo" in result.stdout
  assert (tmp_path / "run" / "export" / "model.stablehlo").stat().st_size > 0
  for args, expected in ((["--workdir", str(tmp_path / "run"), "--format", "tflite"],
                          "unknown export format 'tflite'"),
                         (["--format", "onnx"], "--workdir is required"),
                         (["--workdir", str(tmp_path / "none")], "does not exist")):
    failed = subprocess.run([*export, *args], cwd=REPO, env=ONE_DEVICE, capture_output=True,
                            text=True, timeout=120)
    assert failed.returncode == 2 and len(failed.stderr.strip().splitlines()) == 1
    assert failed.stderr.startswith("dsjax-export: error: ") and expected in failed.stderr
