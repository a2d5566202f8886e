"""moec from Python: compile Mixture-of-Experts layers and run them on NumPy arrays
and PyTorch (or any DLPack) tensors, on the CPU backend or the CUDA backend.

>>> import moec
>>> plan = moec.compile("examples/tiny.moe")
>>> layer = moec.Layer(plan, seed=0)
>>> y = layer(moec.random_inputs(layer, seed=1))
>>> layer.stats["tokens_per_expert"]

Errors from moec (a file that does not check, a plan or weights that cannot be
used, a failing pass) are ``moec.MoeError`` with moec's own message; wrong
arguments (shape, dtype, a non-contiguous array or tensor, a tensor on a GPU)
are ``ValueError``.
"""

from ._moec import Layer, MoeError, Plan, check, compile, random_inputs, random_weights

__all__ = ["Layer", "MoeError", "Plan", "check", "compile", "random_inputs", "random_weights"]
