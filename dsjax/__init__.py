"""dsjax: mixed precision, differentiable architecture search and 3D-parallel training."""

__version__ = "0.1.0"
