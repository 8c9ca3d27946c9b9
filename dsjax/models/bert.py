"""BERT for masked-language-model pretraining, built from Hugging Face checkpoints too.

The module computes what Hugging Face `BertForMaskedLM` computes (post-LN encoder, exact
erf GELU, MLM head tied to the word embeddings), on `dsjax.nn` layers so the precision
policy and plan apply: float32 parameters, matmuls in the compute dtype with float32
accumulation, float32 softmax, LayerNorm statistics and logits. The encoder layers are
one `nn.scan`, so parameters carry a leading "layers" axis and compile once whatever the
depth. `from_pretrained` builds it from a `save_pretrained` folder (`bert_hf` reads it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import pallas_kernels
from dsjax import measure
from dsjax import nn as dsnn
from dsjax.errors import ConfigError
from dsjax.models import bert_hf, layer_stack, registry
from dsjax.nn.layers import sow_stats
from dsjax.parallel import pipeline
from dsjax.precision import LayerPrecision, PrecisionPlan

ACTIVATION_AXES = ("batch", "length", "embed")
LAYERS = layer_stack.LAYERS  # The encoder's scanned layer stack; `layers_{i}` unscanned.
_INIT = nn.initializers.normal(stddev=0.02)  # As BERT (initializer_range).


def _gelu(x: jax.Array) -> jax.Array:
  # The exact erf form (Hugging Face "gelu"), evaluated in float32 and rounded once.
  return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


class MergeHeadsDense(nn.Module):
  """A dense layer contracting the trailing [heads, head_dim] axes: the attention output.

  `dsjax.nn.Dense` contracts one input axis; this keeps the kernel as [heads, kv, embed]
  so "heads" can be sharded on its own. Otherwise it computes as `Dense` does: float32
  accumulation and bias, one rounding to the layer dtype, the same precision statistics.

  Attributes:
    features: output width.
    kernel_axes: logical names of the [heads, head_dim, features] kernel.
    precision: compute dtype, plan and matmul implementation (see `dsjax.nn.Dense`).
    param_dtype: dtype the parameters are created in.
  """

  features: int
  kernel_axes: tuple[str | None, ...] = ("heads", "kv", "embed")
  precision: LayerPrecision = LayerPrecision()
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    dtype = self.precision.dtype(self)
    heads, head_dim = inputs.shape[-2:]
    kernel = self.param("kernel", nn.with_logical_partitioning(_INIT, self.kernel_axes),
                        (heads, head_dim, self.features), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), self.kernel_axes[-1:]), (self.features,), self.param_dtype)
    flat = inputs.reshape(*inputs.shape[:-2], heads * head_dim).astype(dtype)
    flat_kernel = kernel.reshape(heads * head_dim, self.features).astype(dtype)
    if self.precision.matmul_impl == "pallas":
      y = pallas_kernels.matmul(flat, flat_kernel, bias=bias.astype(jnp.float32), out_dtype=dtype)
    else:
      y = dsnn.matmul.dot_general(flat, flat_kernel, (((flat.ndim - 1,), (0,)), ((), ())))
      y = (y + bias.astype(jnp.float32)).astype(dtype)
    sow_stats(self, y, 2.0 * (flat.size // flat.shape[-1]) * kernel.size, [inputs])
    return y


class BertSelfAttention(nn.Module):
  """Self-attention with q/k/v/output biases and an additive float32 mask bias.

  Its own plan entry governs the attention logits (as in `dsjax.nn.MultiHeadAttention`);
  the softmax always runs in float32.

  Attributes:
    num_heads: number of heads.
    head_dim: width of each head.
    dropout_rate: dropout on the attention weights.
    precision: compute dtype, plan, and the matmul implementation of the four projections.
    attention_impl: one of `dsjax.nn.ATTENTION_IMPLS` (see `dsjax.nn.attend`).
  """

  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  precision: LayerPrecision = LayerPrecision()
  attention_impl: str = "explicit"

  @nn.compact
  def __call__(self, x: jax.Array, attention_bias: jax.Array, *, train: bool) -> jax.Array:
    dtype = self.precision.dtype(self)

    def project(name: str) -> jax.Array:
      return dsnn.Dense((self.num_heads, self.head_dim), kernel_axes=("embed", "heads", "kv"),
                        kernel_init=_INIT, precision=self.precision, name=name)(x)

    query, key, value = project("query"), project("key"), project("value")
    # Scaling q before the product keeps float16 logits in range; HF scales after, which
    # is the same up to float32 rounding.
    query = query * jnp.asarray(self.head_dim**-0.5, query.dtype)
    context = dsnn.attend(self, query, key, value, attention_bias, dtype=dtype,
                          dropout_rate=self.dropout_rate, deterministic=not train,
                          impl=self.attention_impl)
    return MergeHeadsDense(x.shape[-1], precision=self.precision, name="out")(context)


class BertLayer(nn.Module):
  """One post-LN encoder layer: attention, add & norm, GELU MLP, add & norm.

  Attributes:
    num_heads: attention heads; the width is the input's last axis.
    mlp_dim: width of the MLP's hidden layer.
    dropout_rate: dropout on both residual branches (and the attention weights unless
      `attention_dropout_rate` is set).
    layer_norm_eps: LayerNorm epsilon.
    precision: compute dtype, plan and matmul implementation. Plan paths omit the layer
      index: one entry per scanned sub-layer governs that sub-layer in every layer.
    attention_impl: one of `dsjax.nn.ATTENTION_IMPLS`.
    attention_dropout_rate: dropout on the attention weights; None: `dropout_rate`.
  """

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-12
  precision: LayerPrecision = LayerPrecision()
  attention_impl: str = "explicit"
  attention_dropout_rate: float | None = None

  @nn.compact
  def __call__(self, x: jax.Array, attention_bias: jax.Array, *, train: bool) -> jax.Array:
    """Maps x [batch, length, embed] to the same shape and dtype (the scan carry)."""
    hidden = x.shape[-1]
    dense = {"kernel_init": _INIT, "precision": self.precision}
    norm = {"epsilon": self.layer_norm_eps, "precision": self.precision}
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    carry_dtype = x.dtype
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    attention_dropout = (self.dropout_rate if self.attention_dropout_rate is None
                         else self.attention_dropout_rate)
    attended = BertSelfAttention(self.num_heads, hidden // self.num_heads, attention_dropout,
                                 self.precision, self.attention_impl,
                                 name="attention")(x, attention_bias, train=train)
    x = dsnn.LayerNorm(name="attention_norm", **norm)(x + dropout(attended))
    y = dsnn.Dense(self.mlp_dim, kernel_axes=("embed", "mlp"), name="mlp_in", **dense)(x)
    y = nn.with_logical_constraint(_gelu(y), ("batch", "length", "mlp"))
    y = dsnn.Dense(hidden, kernel_axes=("mlp", "embed"), name="mlp_out", **dense)(y)
    x = dsnn.LayerNorm(name="mlp_norm", **norm)(x + dropout(y))
    # A scan carry keeps one dtype: a plan that promotes a norm to float32 still hands
    # the next layer the dtype this one received.
    return nn.with_logical_constraint(x.astype(carry_dtype), ACTIVATION_AXES)


class BertEncoder(nn.Module):
  """`num_layers` BertLayers as one `nn.scan` named "layers" (parameters [layers, ...]).

  Kept apart from `Bert` so a pipeline-parallel stack can take its place.

  Attributes:
    num_layers: depth.
    num_heads: attention heads per layer.
    mlp_dim: MLP hidden width.
    dropout_rate: dropout rate inside each layer.
    layer_norm_eps: LayerNorm epsilon.
    precision: compute dtype, plan and matmul implementation of every layer.
    remat: recompute each layer's activations in the backward pass.
    scan_unroll: layers per iteration of the scan's loop; 0 (the default) or
      `num_layers`: every layer, no loop. The parameters stay stacked [layers, ...]
      either way; unrolling lets XLA fuse across layers and drops the loop's per-layer
      slicing of the parameters and stacking of the residuals (on the 2-core CPU, bert-base
      bf16 steps ran 15% faster unrolled; docs/benchmarks.md), for a longer compile.
    attention_impl: one of `dsjax.nn.ATTENTION_IMPLS`.
    attention_dropout_rate: dropout on the attention weights; None: `dropout_rate`.
    scan_layers: False: no scan, `num_layers` separate layers `layers_0`, `layers_1`, ...
      with parameters of their own (MaxText's `scan_layers`). Each layer then reads its
      own kernels, where a stacked one is sliced per layer in the forward pass and the
      gradients are stacked back in the backward pass: copies of every encoder weight,
      twice a step (on the 2-core CPU ~4% of a bert-base float32 step). Checkpoints
      and pretrained weights stay in the scan layout (`dsjax.models.layer_stack`), so a
      run resumes with either value; the dropout masks of a step follow the module paths
      and differ between the two.
  """

  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-12
  precision: LayerPrecision = LayerPrecision()
  remat: bool = False
  scan_unroll: int = 0
  attention_impl: str = "explicit"
  attention_dropout_rate: float | None = None
  scan_layers: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, attention_bias: jax.Array, *, train: bool) -> jax.Array:
    """Runs the stack on x [batch, length, embed] with bias [batch, 1, 1, length]."""
    layer_args = (self.num_heads, self.mlp_dim, self.dropout_rate, self.layer_norm_eps,
                  self.precision, self.attention_impl, self.attention_dropout_rate)
    # Lifted transforms pass arguments positionally: `train` is argument 3 of the body
    # (after the layer, the carry and the bias), broadcast to every step and static.
    def body(layer: BertLayer, carry: jax.Array, bias: jax.Array,
             train: bool) -> tuple[jax.Array, None]:
      return layer(carry, bias, train=train), None

    if self.remat:
      body = nn.remat(body, static_argnums=(3,), prevent_cse=False)
    if not self.scan_layers:
      for index in range(self.num_layers):
        x, _ = body(BertLayer(*layer_args, name=f"{LAYERS}_{index}"), x, attention_bias, train)
      return x
    stack = nn.scan(body, variable_axes={"params": 0, dsnn.STATS: 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast, nn.broadcast), length=self.num_layers,
                    unroll=min(self.scan_unroll or self.num_layers, self.num_layers),
                    metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(BertLayer(*layer_args, name=LAYERS), x, attention_bias, train)
    return x


class Bert(nn.Module):
  """BERT with its masked-language-model head (Hugging Face `BertForMaskedLM`).

  Attributes:
    vocab_size: vocabulary size (rows of the tied word embedding).
    hidden: model width.
    num_layers: encoder depth.
    num_heads: attention heads; must divide `hidden`.
    mlp_dim: MLP hidden width.
    max_position: longest sequence (rows of the position embedding).
    type_vocab_size: token-type (segment) ids.
    dropout_rate: dropout on embeddings, residual branches and (unless
      `attention_dropout_rate` is set) attention weights.
    layer_norm_eps: LayerNorm epsilon.
    precision: compute dtype, per-layer plan and the dense layers' matmul implementation
      (`dsjax.precision.LayerPrecision`), handed to every layer.
    remat: recompute encoder-layer activations in the backward pass.
    scan_unroll: encoder layers per loop iteration; 0: all of them (see `BertEncoder`).
    scan_layers: False (the registry's default): separate encoder layers, not a scan
      (see `BertEncoder`). A pipeline (`num_stages` > 1) runs the stacked layers in its
      stages either way: its stages are slices of the stack.
    num_stages: pipeline stages of the encoder (the `pipe` mesh axis); 1: one scan.
    num_microbatches: pipeline micro-batches per (gradient-accumulation) batch.
    num_repeats: circular pipeline repeats (`dsjax.parallel.pipeline`); 1 is GPipe.
    attention_impl: one of `dsjax.nn.ATTENTION_IMPLS` (see `dsjax.nn.attend`).
    attention_dropout_rate: dropout on the attention weights; None: `dropout_rate`. The
      fused attention implementations need 0.
  """

  vocab_size: int
  hidden: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  max_position: int = 512
  type_vocab_size: int = 2
  dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-12
  precision: LayerPrecision = LayerPrecision()
  remat: bool = False
  scan_unroll: int = 0
  scan_layers: bool = True
  num_stages: int = 1
  num_microbatches: int = 1
  num_repeats: int = 1
  attention_impl: str = "explicit"
  attention_dropout_rate: float | None = None

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, *, train: bool = False,
               mlm_positions: jax.Array | None = None) -> jax.Array:
    """Returns float32 MLM logits [batch, length, vocab_size].

    Args:
      input_ids: [batch, length] token ids.
      attention_mask: [batch, length], 1 for real tokens and 0 for padding; None: all 1.
      token_type_ids: [batch, length] segment ids; None: all 0.
      train: enables dropout (needs a "dropout" rng).
      mlm_positions: [batch, predictions] int positions: the head (its dense, norm and
        vocabulary projection) runs on these positions only, as NVIDIA's BERT does in
        pretraining, and the logits are [batch, predictions, vocab_size]. None: every
        position.

    Returns:
      The logits, float32.

    Raises:
      ConfigError: the sequence is longer than `max_position`.
    """
    length = input_ids.shape[-1]
    if length > self.max_position:
      raise ConfigError(f"sequence length {length} exceeds the model's max_position "
                        f"{self.max_position}: shorten data.seq_len or raise model.max_position")
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    precision = self.precision
    norm = {"epsilon": self.layer_norm_eps, "precision": precision}
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)

    word = dsnn.Embed(self.vocab_size, self.hidden, _INIT, ("vocab", "embed"), precision,
                      name="word_embeddings")
    position = dsnn.Embed(self.max_position, self.hidden, _INIT, (None, "embed"), precision,
                          name="position_embeddings")
    token_type = dsnn.Embed(self.type_vocab_size, self.hidden, _INIT, (None, "embed"),
                            precision, name="token_type_embeddings")
    x = (word(input_ids).astype(jnp.float32)
         + position(jnp.arange(length)[None, :]).astype(jnp.float32)
         + token_type(token_type_ids).astype(jnp.float32))
    x = dropout(dsnn.LayerNorm(name="embeddings_norm", **norm)(x))
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    # Additive float32 bias [batch, 1, 1, keys]: padding keys get the most negative float,
    # as Hugging Face does, so their softmax weight is exactly 0.
    attention_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0,
                               jnp.finfo(jnp.float32).min).astype(jnp.float32)
    if self.num_stages > 1:
      # GPipe over the `pipe` mesh axis; the same "encoder/layers" parameters as the scan.
      layer = BertLayer(self.num_heads, self.mlp_dim, self.dropout_rate, self.layer_norm_eps,
                        precision, self.attention_impl, self.attention_dropout_rate)
      x = pipeline.Pipeline(layer, self.num_layers, self.num_stages, self.num_microbatches,
                            self.remat, self.num_repeats, name="encoder")(x, attention_bias,
                                                                          train=train)
    else:
      x = BertEncoder(self.num_layers, self.num_heads, self.mlp_dim, self.dropout_rate,
                      self.layer_norm_eps, precision, self.remat, self.scan_unroll,
                      self.attention_impl, self.attention_dropout_rate, self.scan_layers,
                      name="encoder")(x, attention_bias, train=train)
    if mlm_positions is not None:
      # Gathered before the head: its vocabulary projection is the costliest matmul of a
      # small BERT, and training scores only the ~15% masked positions.
      x = jnp.take_along_axis(x, mlm_positions[..., None].astype(jnp.int32), axis=1)
      x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    x = dsnn.Dense(self.hidden, kernel_axes=("embed", None), kernel_init=_INIT,
                   precision=precision, name="mlm_dense")(x)
    x = dsnn.LayerNorm(name="mlm_norm", **norm)(_gelu(x))
    bias = self.param("mlm_bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("vocab",)), (self.vocab_size,), jnp.float32)
    logits = word.attend(x).astype(jnp.float32) + bias
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def from_pretrained(path: str | Path, *,
                    compute_dtype: Any = jnp.float32) -> tuple[Bert, dict[str, Any]]:
  """Builds `Bert` from a Hugging Face BERT checkpoint folder (`save_pretrained` output).

  Args:
    path: folder with `config.json` and `model.safetensors` (or `pytorch_model.bin`,
      which needs torch).
    compute_dtype: the module's compute dtype; parameters are float32 either way.

  Returns:
    `(module, variables)`: `module.apply(variables, input_ids, attention_mask=...,
    token_type_ids=...)` gives the logits of `BertForMaskedLM` in eval mode. `variables`
    is `{"params": ...}` of plain (unboxed) float32 arrays, layers stacked on axis 0.

  Raises:
    CheckpointError: see `dsjax.models.bert_hf.read_pretrained`.
  """
  fields, params = bert_hf.read_pretrained(path)
  return Bert(**fields, precision=LayerPrecision(compute_dtype)), {"params": params}


# ------------------------------------------------------------------ registry


def _build(model_config: Any, num_classes: int, compute_dtype: Any,
           plan: PrecisionPlan | None = None) -> Bert:
  return Bert(vocab_size=num_classes, hidden=model_config.hidden,
              num_layers=model_config.num_layers, num_heads=model_config.num_heads,
              mlp_dim=model_config.mlp_dim, max_position=model_config.max_position,
              dropout_rate=model_config.dropout_rate,
              precision=LayerPrecision(compute_dtype, plan, model_config.matmul_impl),
              remat=model_config.remat,
              scan_unroll=model_config.scan_unroll, scan_layers=model_config.scan_layers,
              attention_impl=model_config.attention_impl,
              attention_dropout_rate=_attention_dropout(model_config))


def _attention_dropout(model_config: Any) -> float:
  """The attention-weight dropout rate: `attention_dropout_rate`, or -1: `dropout_rate`."""
  rate = model_config.attention_dropout_rate
  return model_config.dropout_rate if rate == -1 else rate


def _check(model_config: Any) -> list[str]:
  problems = []
  for field in ("hidden", "num_layers", "num_heads", "mlp_dim", "max_position"):
    if model_config[field] < 1:
      problems.append(f"{field} must be >= 1, got {model_config[field]}")
  if model_config.scan_unroll < 0:
    problems.append(f"scan_unroll must be >= 0 (0: every layer, no loop), got "
                    f"{model_config.scan_unroll}")
  elif model_config.scan_unroll and not model_config.scan_layers:
    problems.append(f"scan_unroll={model_config.scan_unroll} sets the layer scan's loop, and "
                    "scan_layers=False has none; drop one of them")
  if model_config.num_heads >= 1 and model_config.hidden % model_config.num_heads:
    problems.append(f"hidden={model_config.hidden} must be divisible by "
                    f"num_heads={model_config.num_heads}")
  if model_config.attention_impl not in dsnn.ATTENTION_IMPLS:
    problems.append(f"attention_impl must be one of {', '.join(dsnn.ATTENTION_IMPLS)}, "
                    f"got {model_config.attention_impl!r}")
  attention_dropout = _attention_dropout(model_config)
  if not (0 <= model_config.attention_dropout_rate < 1
          or model_config.attention_dropout_rate == -1):
    problems.append(f"attention_dropout_rate must be in [0, 1) or -1 (as dropout_rate), got "
                    f"{model_config.attention_dropout_rate}")
  elif model_config.attention_impl != "explicit" and attention_dropout:
    problems.append(f"attention_impl={model_config.attention_impl} has no dropout on the "
                    "attention weights: add --config.model.attention_dropout_rate=0 (the "
                    "residual dropout_rate stays)")
  return problems + registry.check_shared_fields(model_config)


def _flops_per_example(model_config: Any, num_classes: int, example: Any) -> float:
  seq_len = int(example["input_ids"].shape[-1])
  return seq_len * measure.transformer_flops_per_token(
      num_layers=model_config.num_layers, hidden=model_config.hidden,
      mlp_dim=model_config.mlp_dim, seq_len=seq_len, vocab_size=num_classes)


def _layout(model_config: Any) -> layer_stack.UnstackedLayout | None:
  """The encoder's in-memory layout when it is not the scan's (`scan_layers=False`)."""
  return None if model_config.scan_layers else layer_stack.UnstackedLayout(
      model_config.num_layers)


_DEFAULTS = {"hidden": 128, "num_layers": 2, "num_heads": 2, "mlp_dim": 512,
             "max_position": 512, "dropout_rate": 0.1, "matmul_impl": "xla", "remat": False,
             "scan_unroll": 0, "scan_layers": False, "attention_impl": "explicit",
             "attention_dropout_rate": -1.0}
_SIZES = {"bert-tiny": (2, 128, 2, 512), "bert-mini": (4, 256, 4, 1024),
          "bert-base": (12, 768, 12, 3072)}
for _name, (_layers, _hidden, _heads, _mlp) in _SIZES.items():
  registry.register(registry.ModelSpec(
      name=_name, build=_build, dataset="text", task="mlm", check=_check, pipelined=True,
      flops_per_example=_flops_per_example, load_pretrained=bert_hf.load_pretrained,
      param_layout=_layout,
      defaults={**_DEFAULTS, "hidden": _hidden, "num_layers": _layers, "num_heads": _heads,
                "mlp_dim": _mlp},
      config_file={"bert-base": "bert_base.py", "bert-mini": "bert_tiny.py:model=bert-mini"}.get(
          _name, "bert_tiny.py")))

