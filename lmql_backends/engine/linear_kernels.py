"""The matrix-product kernel of each linear layer of the native forward, chosen per batch size.

torch multiplies float32 matrices on CPU with its BLAS (MKL on x86). For the few rows of a
decode step that is not always the fastest kernel: depending on the CPU and the layer's shape,
oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile's CPU backend
emits for linear layers) can be faster on large projections, while on small layers its fixed
cost per call makes it slower. So a `Linear` holds one kernel per bucket of row counts (1, 2, 3-4, 5-8, ...), and
`choose_kernels` times both kernels on the layer's own weights on the engine thread at start
("auto"), as serving engines tune their kernels to the machine. Row counts above the largest
bucket (prefills) use BLAS. Both kernels compute the same product from the same weights (no
copy); results differ by float rounding only, as BLAS's own results do between batch sizes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from ..errors import InvalidRequestError
from ..loader import MATMUL_CHOICES, check_choice

#: oneDNN replaces BLAS for a bucket only when it is at least this much faster (timings are noisy)
MIN_SPEEDUP = 1.1
NUM_TRIALS = 5

Kernel = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def blas_linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """rows @ weight (+ bias) with torch's BLAS; `weight` is [in, out] (any strides)."""
    if bias is None:
        return torch.mm(rows, weight)
    return torch.addmm(bias, rows, weight)


def onednn_linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same product with oneDNN's linear, which takes the weight as [out, in] (a view here)."""
    return torch.ops.mkldnn._linear_pointwise(rows, weight.t(), bias, "none", [], "")


def onednn_unavailable_reason(weight: torch.Tensor) -> str | None:
    """Why oneDNN's linear cannot multiply by `weight` here (None: it can)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this torch build has no oneDNN linear"
    if weight.device.type != "cpu":
        return f"the weights are on {weight.device.type}, oneDNN's linear runs on CPU"
    if weight.dtype != torch.float32:
        return f"the weights are {weight.dtype}, the oneDNN kernel is used for float32 only"
    return None


def bucket_of(num_rows: int) -> int:
    """The bucket of a row count: 1 -> 0, 2 -> 1, 3-4 -> 2, 5-8 -> 3, ..."""
    return (num_rows - 1).bit_length()


def num_buckets(max_rows: int) -> int:
    """How many buckets cover row counts 1..max_rows."""
    return bucket_of(max_rows) + 1


class Linear:
    """y = rows @ weight + bias for `rows` [N, in] (2-D: the native forward keeps its activations
    flat), with a kernel per row-count bucket."""

    __slots__ = ("weight", "bias", "kernels", "fallback")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias  # weight [in, out]
        self.kernels: tuple[Kernel, ...] = ()  # by bucket_of(rows); rows beyond them use `fallback`
        self.fallback: Kernel = blas_linear

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        bucket = bucket_of(rows.shape[0])
        kernel = self.kernels[bucket] if bucket < len(self.kernels) else self.fallback
        return kernel(rows, self.weight, self.bias)

    @property
    def shape_key(self) -> tuple:
        """Layers with equal keys get the same kernels (timed once)."""
        return tuple(self.weight.shape), self.weight.stride(), self.bias is None, self.weight.dtype


def uses_onednn(linear: Linear) -> bool:
    """Whether `linear` runs on oneDNN for some row count."""
    return onednn_linear in (*linear.kernels, linear.fallback)


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """The kernels of one layer shape: one per bucket, and the one for larger row counts."""

    kernels: tuple[Kernel, ...]
    fallback: Kernel

    def describe(self) -> str:
        names = ["onednn" if k is onednn_linear else "blas" for k in self.kernels]
        return ", ".join(f"<={2 ** i}: {name}" for i, name in enumerate(names))


def choose_kernels(linears: list[Linear], matmul: str, max_rows: int, time_kernel=None) -> dict[tuple, KernelChoice]:
    """Set the kernels of every linear for `matmul` (see MATMUL_CHOICES); return the choice per shape.

    `time_kernel(kernel, linear, num_rows) -> seconds` times one run (default `time_once`).
    """
    check_choice("matmul", matmul, MATMUL_CHOICES)
    choices: dict[tuple, KernelChoice] = {}
    for linear in linears:
        key = linear.shape_key
        if key not in choices:
            choices[key] = choose_for_shape(linear, matmul, max_rows, time_kernel or time_once)
        linear.kernels, linear.fallback = choices[key].kernels, choices[key].fallback
    return choices


def choose_for_shape(linear: Linear, matmul: str, max_rows: int, time_kernel) -> KernelChoice:
    """The kernels of layers shaped like `linear`."""
    reason = onednn_unavailable_reason(linear.weight)
    if matmul == "onednn" and reason is not None:
        raise InvalidRequestError(f"matmul 'onednn' cannot run this model: {reason}; use 'auto' or 'blas'", "matmul")
    if matmul == "onednn":
        return KernelChoice((), onednn_linear)
    if matmul == "blas" or reason is not None:
        return KernelChoice((), blas_linear)
    return KernelChoice(tuple(faster_kernel(linear, 2 ** b, time_kernel) for b in range(num_buckets(max_rows))),
                        blas_linear)


def faster_kernel(linear: Linear, num_rows: int, time_kernel) -> Kernel:
    """oneDNN if its fastest of NUM_TRIALS runs beats BLAS's by MIN_SPEEDUP, else BLAS.

    The two alternate, so that a burst of other work on the machine slows both alike.
    """
    blas, onednn = [], []
    for _ in range(NUM_TRIALS):
        blas.append(time_kernel(blas_linear, linear, num_rows))
        onednn.append(time_kernel(onednn_linear, linear, num_rows))
    return onednn_linear if min(onednn) * MIN_SPEEDUP <= min(blas) else blas_linear


@torch.inference_mode()
def time_once(kernel: Kernel, linear: Linear, num_rows: int) -> float:
    """Seconds of one product of `num_rows` random rows (the first, cold run is slower: take minima)."""
    rows = torch.randn(num_rows, linear.weight.shape[0], dtype=linear.weight.dtype, device=linear.weight.device)
    start = time.perf_counter()
    kernel(rows, linear.weight, linear.bias)
    return time.perf_counter() - start
