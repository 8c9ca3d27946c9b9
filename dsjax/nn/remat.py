"""A rematerialisation policy that keeps half-precision activations, recomputes float32 ones.

Under mixed precision the half-precision activations (layer outputs) are the cheap ones
to keep, half the bytes of their float32 counterparts, while the float32 intermediates
(matmul accumulators before rounding, LayerNorm statistics, softmax inputs) are cheap to
recompute from them. `save_half_residuals` saves exactly the former.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

HALF_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def _output_dtypes(prim: Any, avals: Sequence[Any], params: dict[str, Any]) -> list[Any]:
  """Infers the output dtypes of `prim` applied to `avals`.

  jax calls checkpoint policies with the equation's INPUT avals and params only, so the
  outputs have to be re-derived. Abstract evaluation is exact; the fallback covers
  primitives without a usable rule (the casts and dots that matter carry their dtype in
  params, everything else here is dtype-preserving).
  """
  try:
    out, _ = prim.abstract_eval(*avals, **params)
    outs = out if prim.multiple_results else [out]
    return [o.dtype for o in outs]
  except Exception:  # any failure falls back to the param-based rule below
    for key in ("new_dtype", "preferred_element_type"):
      if params.get(key) is not None:
        return [params[key]]
    return [a.dtype for a in avals if getattr(a, "dtype", None) is not None]


def save_half_residuals(prim: Any, *avals: Any, **params: Any) -> bool:
  """`jax.checkpoint` policy: save an equation's outputs iff all are float16/bfloat16.

  Follows the contract of `jax.checkpoint_policies` (called as
  `policy(primitive, *input_avals, **params)`, True = saveable). Integer, boolean and
  float32 values are recomputed in the backward pass from saved half values and the
  checkpointed function's arguments (which are always available).

  Args:
    prim: the primitive of a forward-pass equation.
    *avals: its input abstract values.
    **params: its parameters.

  Returns:
    Whether the equation's outputs may be saved as residuals.
  """
  dtypes = _output_dtypes(prim, avals, params)
  # isinstance: extended dtypes (PRNG keys) are not numpy dtypes and never saved.
  return bool(dtypes) and all(isinstance(d, np.dtype) and d in HALF_DTYPES for d in dtypes)


def remat(module_cls: type[nn.Module], **kwargs: Any) -> type[nn.Module]:
  """`nn.remat(module_cls, policy=save_half_residuals)`.

  Args:
    module_cls: a linen module class.
    **kwargs: further `nn.remat` options (prevent_cse, static_argnums, ...).

  Returns:
    The rematerialised module class.
  """
  return nn.remat(module_cls, policy=save_half_residuals, **kwargs)
