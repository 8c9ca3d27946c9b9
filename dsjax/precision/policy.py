"""Precision policies: which dtype parameters are stored, computed and returned in.

A `Policy` names three dtypes: `param_dtype` for the master weights (and so the optimizer
state), `compute_dtype` for activations and matmul inputs, and `output_dtype` for what a
model returns (float32 logits keep the softmax and the loss accurate). Policies are
written as strings like `"p=f32,c=bf16,o=f32"`; `get_policy` also accepts the names of
the `Preset`s in `PRESETS`, and `check_policy` says which policies a run can honour.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.errors import ConfigError

# Canonical short name first: `str(policy)` writes it.
_DTYPE_NAMES = {
    "f32": "float32", "float32": "float32",
    "f16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "f64": "float64", "float64": "float64",
}
_SHORT_NAMES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64"}
_KEYS = {"p": "param_dtype", "params": "param_dtype",
         "c": "compute_dtype", "compute": "compute_dtype",
         "o": "output_dtype", "output": "output_dtype"}
_ACCEPTED = ("expected comma-separated key=dtype pairs like 'p=f32,c=bf16,o=f32'; "
             "keys: p/params, c/compute, o/output; dtypes: f32/float32, f16/float16/half, "
             "bf16/bfloat16, f64/float64")


def _is_float_array(x: Any) -> bool:
  # Only arrays: Python scalars stay weakly typed, and PRNG keys (uint32 or typed key
  # dtypes) and integer/bool leaves are not floating.
  return (isinstance(x, (np.ndarray, jax.Array, np.generic))
          and jnp.issubdtype(x.dtype, jnp.floating))


def _cast_tree(tree: Any, dtype: jnp.dtype) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if _is_float_array(x) else x, tree)


@dataclasses.dataclass(frozen=True)
class Policy:
  """The dtypes of parameters, computation and outputs.

  Frozen and hashable, so it can be a static `jax.jit` argument or a Flax module
  attribute. Dtypes are normalised to `numpy.dtype`, so `Policy(jnp.float32, ...)` equals
  `Policy(jnp.dtype("float32"), ...)`.

  Args:
    param_dtype: dtype of the stored (master) parameters.
    compute_dtype: dtype of activations and matmul inputs.
    output_dtype: dtype of the model's outputs.
  """

  param_dtype: jnp.dtype
  compute_dtype: jnp.dtype
  output_dtype: jnp.dtype

  def __post_init__(self):
    for field in dataclasses.fields(self):
      dtype = jnp.dtype(getattr(self, field.name))
      if not jnp.issubdtype(dtype, jnp.floating):
        raise ConfigError(f"precision policy {field.name} must be a floating dtype, "
                          f"got {dtype}; use one of f32, f16, bf16, f64")
      object.__setattr__(self, field.name, dtype)

  def cast_to_param(self, tree: Any) -> Any:
    """Casts the floating-point array leaves of `tree` to `param_dtype`.

    Args:
      tree: any pytree; integer, bool, PRNG-key and non-array leaves are returned as is.

    Returns:
      The tree with floating leaves in `param_dtype`.
    """
    return _cast_tree(tree, self.param_dtype)

  def cast_to_compute(self, tree: Any) -> Any:
    """Casts the floating-point array leaves of `tree` to `compute_dtype`.

    Args:
      tree: any pytree; integer, bool, PRNG-key and non-array leaves are returned as is.

    Returns:
      The tree with floating leaves in `compute_dtype`.
    """
    return _cast_tree(tree, self.compute_dtype)

  def cast_to_output(self, tree: Any) -> Any:
    """Casts the floating-point array leaves of `tree` to `output_dtype`.

    Args:
      tree: any pytree; integer, bool, PRNG-key and non-array leaves are returned as is.

    Returns:
      The tree with floating leaves in `output_dtype`.
    """
    return _cast_tree(tree, self.output_dtype)

  def with_output_dtype(self, dtype: Any) -> Policy:
    """Returns a copy of this policy with another output dtype.

    Args:
      dtype: the new output dtype.

    Returns:
      The new policy.
    """
    return dataclasses.replace(self, output_dtype=dtype)

  def __str__(self) -> str:
    return (f"p={_short_name(self.param_dtype)},c={_short_name(self.compute_dtype)},"
            f"o={_short_name(self.output_dtype)}")


def _short_name(dtype: jnp.dtype) -> str:
  return _SHORT_NAMES.get(dtype.name, dtype.name)


def parse_policy(text: str) -> Policy:
  """Parses a policy string such as `"p=f32,c=bf16,o=f32"`.

  Keys are `p`/`params`, `c`/`compute` and `o`/`output`; a missing key means float32, so
  `"c=bf16"` is `"p=f32,c=bf16,o=f32"`. Preset names such as `"bf16"` are not policy
  strings; `get_policy` accepts both.

  Args:
    text: the policy string.

  Returns:
    The policy; `str()` of it gives the canonical spelling.

  Raises:
    ConfigError: the string is empty, or has an unknown key, an unknown dtype or a
      repeated key.
  """
  if not isinstance(text, str) or not text.strip():
    raise ConfigError(f"empty precision policy {text!r}; {_ACCEPTED}")
  dtypes: dict[str, str] = {}
  for part in text.split(","):
    key, sep, value = (s.strip().lower() for s in part.partition("="))
    if not sep:
      raise ConfigError(f"precision policy {text!r}: {part.strip()!r} is not key=dtype; "
                        f"{_ACCEPTED} (presets {', '.join(PRESETS)} are accepted where a "
                        f"policy or preset is asked for)")
    if key not in _KEYS:
      raise ConfigError(f"precision policy {text!r}: unknown key {key!r}; {_ACCEPTED}")
    if value not in _DTYPE_NAMES:
      raise ConfigError(f"precision policy {text!r}: unknown dtype {value!r}; {_ACCEPTED}")
    field = _KEYS[key]
    if field in dtypes:
      raise ConfigError(f"precision policy {text!r}: {field} is given twice; {_ACCEPTED}")
    dtypes[field] = _DTYPE_NAMES[value]
  return Policy(**{name: jnp.dtype(dtypes.get(name, "float32"))
                   for name in ("param_dtype", "compute_dtype", "output_dtype")})


@dataclasses.dataclass(frozen=True)
class Preset:
  """A named precision setting (`--precision NAME`): its policy and what it turns on.

  Every preset keeps float32 master weights and float32 outputs. Whether a run scales its
  loss follows from the policy (`needs_loss_scaling`: float16 compute), not from the name.

  Attributes:
    name: what `--precision` and `precision.policy` call it.
    policy: its policy string.
    gpu_policy: its policy string on GPUs, where float16 is fast; None: `policy`.
    adaptive: whether the per-layer precision controller runs when `precision.adaptive`
      is None (`dsjax.precision.controller_enabled`).
  """

  name: str
  policy: str
  gpu_policy: str | None = None
  adaptive: bool = False

  def policy_on(self, platform: str | None = None) -> Policy:
    """Returns the preset's policy on `platform` (`cpu`, `gpu`, `tpu`; None: the default
    backend, asked only when the preset depends on it)."""
    if self.gpu_policy is None:
      return parse_policy(self.policy)
    platform = (platform or jax.default_backend()).lower()
    return parse_policy(self.gpu_policy if platform in ("gpu", "cuda", "rocm") else self.policy)


# `mixed` computes in float16 on GPUs and bfloat16 elsewhere, since float16 is emulated on
# CPUs and not fast on TPUs, and adapts the plan layer by layer.
_PRESETS = {preset.name: preset for preset in (
    Preset("fp32", "c=f32"), Preset("bf16", "c=bf16"), Preset("fp16", "c=f16"),
    Preset("mixed", "c=bf16", gpu_policy="c=f16", adaptive=True))}
PRESETS = tuple(_PRESETS)


def get_preset(name: str) -> Preset | None:
  """Returns the preset called `name`, or None when `name` is not a preset (a policy
  string, say)."""
  return _PRESETS.get(name)


def get_policy(name: str, platform: str | None = None) -> Policy:
  """Returns the policy of a preset name or a policy string.

  Every preset keeps float32 master weights and float32 outputs: `fp32` computes in
  float32, `bf16` in bfloat16, `fp16` in float16, and `mixed` in float16 on GPUs and
  bfloat16 elsewhere (see `Preset`).

  Args:
    name: one of PRESETS, or a string `parse_policy` accepts.
    platform: `cpu`, `gpu` or `tpu`; the default backend when None. Only `mixed`
      depends on it.

  Returns:
    The policy.

  Raises:
    ConfigError: `name` is neither a preset nor a valid policy string.
  """
  preset = get_preset(name)
  return preset.policy_on(platform) if preset is not None else parse_policy(name)


def check_policy(policy: Policy) -> list[str]:
  """Says what in `policy` a run cannot honour, so that no policy trains other than it says.

  The master weights (and the optimizer state, which follows them) are stored in
  `param_dtype`, float32 or bfloat16; activations and matmul inputs are in
  `compute_dtype`; models return float32.

  Args:
    policy: the parsed policy.

  Returns:
    One message per refused field, naming it and the fix; empty when all are honoured.
  """
  problems = []
  for field in dataclasses.fields(policy):
    if getattr(policy, field.name) == jnp.dtype(jnp.float64):
      problems.append(
          f"policy {policy}: {field.name} float64 is not supported (dsjax's layers "
          "accumulate in float32, and JAX computes float32 unless jax_enable_x64 is set); "
          "use f32")
  if policy.param_dtype == jnp.dtype(jnp.float16):
    problems.append(
        f"policy {policy}: param_dtype float16 is not supported: gradients and the "
        "optimizer state follow the parameters' dtype, so gradients below 6e-8 vanish "
        "(loss scaling cannot help once they are unscaled into float16) and Adam's squared "
        "gradients below 2e-4 underflow to 0; use p=f32, or p=bf16 for half-size master "
        "weights")
  if policy.output_dtype != jnp.dtype(jnp.float32):
    problems.append(
        f"policy {policy}: output_dtype {policy.output_dtype.name} is not supported: "
        "models return float32 outputs, which the softmax and the loss need; drop o= "
        "or write o=f32")
  return problems


def needs_loss_scaling(policy: Policy) -> bool:
  """Says whether training under `policy` needs loss scaling.

  Float16 gradients underflow to zero below 6e-8; bfloat16 has float32's exponent range,
  so only a float16 compute dtype needs its loss scaled.

  Args:
    policy: the precision policy.

  Returns:
    True iff the compute dtype is float16.
  """
  return policy.compute_dtype == jnp.dtype(jnp.float16)
