"""Type stubs of the `moec._moec` extension module."""

from typing import Any, Dict, List, Optional, Protocol, Tuple, TypeVar, Union, overload

import numpy as np
import numpy.typing as npt

class MoeError(Exception):
    """moec's own error: the message is what the `moec` command prints."""

def check(source: str) -> None:
    """Check a .moe file (a path or its text); raise MoeError with every diagnostic."""

def compile(
    source: str,
    *,
    tokens: Optional[int] = None,
    hidden: Optional[int] = None,
    ffn: Optional[int] = None,
    dtype: Optional[str] = None,
    ranks: Optional[int] = None,
) -> "Plan":
    """Compile a .moe file (a path or its text) with `moec run`'s overrides."""

class Plan:
    @property
    def text(self) -> str:
        """The plan as `moec build` prints it."""
    def to_json(self) -> str:
        """The plan as `moec build --emit json` writes it."""
    def simulate(self) -> Dict[str, Any]:
        """The predicted timeline: the fields of `moec simulate --json`."""
    def explain(self) -> str:
        """The `moec explain` report."""

Array = npt.NDArray[np.float32]

class DLPackTensor(Protocol):
    """A tensor of another framework (PyTorch, JAX, CuPy, ...): a
    C-contiguous float32 host tensor is read in place through DLPack."""

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any: ...
    def __dlpack_device__(self) -> Tuple[int, int]: ...

T = TypeVar("T", bound=DLPackTensor)

class Layer:
    def __init__(
        self,
        plan: Union[Plan, str],
        weights: Union[None, str, Dict[str, Array]] = None,
        *,
        seed: int = 0,
        backend: str = "cpu",
        prefix: str = "",
    ) -> None:
        """A plan (a Plan or its JSON) with random weights (`seed`), a safetensors
        checkpoint's path, or a dict of float32 arrays by Hugging Face name, on
        the "cpu" backend or the "cuda" one (every rank a virtual rank of this
        process's GPU; MoeError without a driver or GPU)."""
    @property
    def device(self) -> str:
        """Where the layer runs: "cpu", or the GPU the CUDA backend uses."""
    @property
    def ranks(self) -> int: ...
    @property
    def tokens_per_rank(self) -> int: ...
    @property
    def hidden(self) -> int: ...
    @overload
    def __call__(self, x: Array) -> Array: ...
    @overload
    def __call__(self, x: T) -> T: ...
    @overload
    def __call__(self, x: List[Array]) -> List[Array]: ...
    @overload
    def __call__(self, x: List[T]) -> List[T]: ...
    @overload
    def forward(self, x: Array) -> Array: ...
    @overload
    def forward(self, x: T) -> T: ...
    @overload
    def forward(self, x: List[Array]) -> List[Array]: ...
    @overload
    def forward(self, x: List[T]) -> List[T]: ...
    @property
    def stats(self) -> Dict[str, Any]:
        """The last pass's routing: tokens_per_expert, dropped, assignments, imbalance, grown."""

def random_inputs(layer: Layer, seed: int = 0) -> Array:
    """Random inputs: one [ranks * tokens_per_rank, hidden] float32 array."""

def random_weights(plan: Plan, seed: int = 0) -> Dict[str, Array]:
    """The weights Layer(plan, seed=seed) draws, by Hugging Face name."""
