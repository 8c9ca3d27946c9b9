"""Differentiable architecture search: search space, relaxations, cost model, bilevel
search step and derivation to a discrete `architecture.json`.

The supernet itself is a model (`dsjax.models.supernet`); this package does not import
the model zoo, so models may import it.
"""

from dsjax.nas.bilevel import (
    SearchState,
    arch_gradient,
    arch_optimizer,
    classification_loss,
    create_search_state,
    make_arch_update,
    make_search_step,
    make_weight_update,
    regression_loss,
    supernet_forward,
)
from dsjax.nas.cost import (
    exact_cost,
    expected_cost,
    expected_latency,
    make_arch_penalty,
    measure_latency_table,
    op_cost,
    param_free_probability,
    resource_penalty,
)
from dsjax.nas.derivation import (
    derive,
    derived_precision_cost,
    flat_probabilities,
    format_probabilities,
    load_architecture,
    probabilities,
    save_architecture,
    validate_architecture,
)
from dsjax.nas.relaxation import RELAXATIONS, relax
from dsjax.nas.space import FORMAT_MIXINGS, OPS, SearchSpace, from_config

__all__ = [
    "FORMAT_MIXINGS",
    "OPS",
    "RELAXATIONS",
    "SearchSpace",
    "SearchState",
    "arch_gradient",
    "arch_optimizer",
    "classification_loss",
    "create_search_state",
    "derive",
    "derived_precision_cost",
    "exact_cost",
    "expected_cost",
    "expected_latency",
    "flat_probabilities",
    "format_probabilities",
    "from_config",
    "load_architecture",
    "make_arch_penalty",
    "make_arch_update",
    "make_search_step",
    "make_weight_update",
    "measure_latency_table",
    "op_cost",
    "param_free_probability",
    "probabilities",
    "regression_loss",
    "relax",
    "resource_penalty",
    "save_architecture",
    "supernet_forward",
    "validate_architecture",
]
