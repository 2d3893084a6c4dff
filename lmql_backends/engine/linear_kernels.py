"""The matrix-product kernel of each linear layer of the native forward, chosen per batch size.

torch multiplies float32 matrices on CPU with its BLAS (MKL on x86). For the few rows of a
decode step that is not always the fastest kernel: BLAS repacks the whole weight matrix into its
own panel layout on every call with more than one row, so a step of 8 rows can cost several times
a step of one, although both read the same weights. oneDNN's linear
(``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile's CPU backend emits for linear
layers) can be faster on large projections, and faster still on a copy of the weight reordered once
into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, as torch.compile's
weight prepacking does), while on small layers its fixed cost per call makes it slower. So a
`Linear` holds one kernel per bucket of row counts (1, 2, 3-4, 5-8, ...), and `choose_kernels`
times the kernels on the layer's own weights on the engine thread at start ("auto"), as serving
engines tune their kernels to the machine. A kernel that costs more memory (the packed copy) is
taken only when it beats the cheaper ones by `MIN_SPEEDUP`. Row counts above the largest bucket
(prefills) use BLAS. Every kernel computes the same product from the same weights; results differ
by float rounding only, as BLAS's own results do between batch sizes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from ..errors import InvalidRequestError
from ..loader import MATMUL_CHOICES, check_choice

#: a kernel replaces one cheaper in memory for a bucket only when at least this much faster (timings are noisy)
MIN_SPEEDUP = 1.1
NUM_TRIALS = 3

Kernel = Callable[[torch.Tensor, "Linear"], torch.Tensor]


def blas_linear(rows: torch.Tensor, linear: "Linear") -> torch.Tensor:
    """rows @ weight (+ bias) with torch's BLAS; `weight` is [in, out] (any strides)."""
    if linear.bias is None:
        return torch.mm(rows, linear.weight)
    return torch.addmm(linear.bias, rows, linear.weight)


def onednn_linear(rows: torch.Tensor, linear: "Linear") -> torch.Tensor:
    """The same product with oneDNN's linear, which takes the weight as [out, in] (a view here)."""
    return torch.ops.mkldnn._linear_pointwise(rows, linear.weight.t(), linear.bias, "none", [], "")


def onednn_packed_linear(rows: torch.Tensor, linear: "Linear") -> torch.Tensor:
    """The same product with oneDNN's linear on the layer's packed copy of its weight (`Linear.pack`)."""
    return torch.ops.mkldnn._linear_pointwise(rows, linear.packed, linear.bias, "none", [], "")


#: the kernels "auto" chooses from, cheapest in memory first
AUTO_KERNELS: tuple[Kernel, ...] = (blas_linear, onednn_linear, onednn_packed_linear)
ONEDNN_KERNELS = (onednn_linear, onednn_packed_linear)


def onednn_unavailable_reason(weight: torch.Tensor) -> str | None:
    """Why oneDNN's linear cannot multiply by `weight` here (None: it can)."""
    if not torch.backends.mkldnn.is_available() or not all(
            hasattr(torch.ops.mkldnn, name) for name in ("_linear_pointwise", "_reorder_linear_weight")):
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

    __slots__ = ("weight", "bias", "kernels", "fallback", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias  # weight [in, out]
        self.kernels: tuple[Kernel, ...] = ()  # by bucket_of(rows); rows beyond them use `fallback`
        self.fallback: Kernel = blas_linear
        self.packed: torch.Tensor | None = None  # the weight in oneDNN's blocked layout, for onednn_packed_linear

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        bucket = bucket_of(rows.shape[0])
        kernel = self.kernels[bucket] if bucket < len(self.kernels) else self.fallback
        return kernel(rows, self)

    def pack(self, num_rows: int) -> None:
        """Keep a copy of the weight reordered for oneDNN (laid out for about `num_rows` rows; any count works)."""
        if self.packed is None:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.t(), num_rows)

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed copy, as many as the weight's (oneDNN may pad a few more; 0: none)."""
        return 0 if self.packed is None else self.weight.numel() * self.weight.element_size()

    @property
    def shape_key(self) -> tuple:
        """Layers with equal keys get the same kernels (timed once)."""
        return tuple(self.weight.shape), self.weight.stride(), self.bias is None, self.weight.dtype


def uses_onednn(linear: Linear) -> bool:
    """Whether `linear` runs on oneDNN for some row count."""
    return any(kernel in ONEDNN_KERNELS for kernel in (*linear.kernels, linear.fallback))


KERNEL_NAMES = {blas_linear: "blas", onednn_linear: "onednn", onednn_packed_linear: "onednn packed"}


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """The kernels of one layer shape: one per bucket, and the one for larger row counts."""

    kernels: tuple[Kernel, ...]
    fallback: Kernel

    def describe(self) -> str:
        names = [KERNEL_NAMES[k] for k in self.kernels]
        return ", ".join(f"<={2 ** i}: {name}" for i, name in enumerate(names))


def choose_kernels(linears: list[Linear], matmul: str, max_rows: int, time_kernel=None) -> dict[tuple, KernelChoice]:
    """Set the kernels of every linear for `matmul` (see MATMUL_CHOICES); return the choice per shape.

    `time_kernel(kernel, layers, num_rows) -> seconds` times one pass of a kernel over the layers of
    one shape (default `time_pass`). Layers whose choice uses `onednn_packed_linear` keep their
    packed copy; the others drop theirs.
    """
    check_choice("matmul", matmul, MATMUL_CHOICES)
    by_shape: dict[tuple, list[Linear]] = {}
    for linear in linears:
        by_shape.setdefault(linear.shape_key, []).append(linear)
    choices = {}
    for key, layers in by_shape.items():  # each shape's unused copies go before the next shape is packed
        choices[key] = choice = choose_for_shape(layers, matmul, max_rows, time_kernel or time_pass)
        for linear in layers:
            linear.kernels, linear.fallback = choice.kernels, choice.fallback
            if onednn_packed_linear not in linear.kernels:
                linear.packed = None
    return choices


def choose_for_shape(layers: list[Linear], matmul: str, max_rows: int, time_kernel) -> KernelChoice:
    """The kernels of `layers`, all of one shape."""
    reason = onednn_unavailable_reason(layers[0].weight)
    if matmul == "onednn" and reason is not None:
        raise InvalidRequestError(f"matmul 'onednn' cannot run this model: {reason}; use 'auto' or 'blas'", "matmul")
    if matmul == "onednn":
        return KernelChoice((), onednn_linear)
    if matmul == "blas" or reason is not None:
        return KernelChoice((), blas_linear)
    for linear in layers:
        linear.pack(max_rows)  # for timing; choose_kernels keeps the copies only where they are chosen
    return KernelChoice(tuple(fastest_kernel(layers, 2 ** b, time_kernel) for b in range(num_buckets(max_rows))),
                        blas_linear)


def fastest_kernel(layers: list[Linear], num_rows: int, time_kernel) -> Kernel:
    """The kernel of AUTO_KERNELS with the fastest of NUM_TRIALS passes, where a kernel costing more
    memory must beat the cheaper ones by MIN_SPEEDUP.

    The kernels take turns, so that a burst of other work on the machine slows them alike.
    """
    seconds: dict[Kernel, list[float]] = {kernel: [] for kernel in AUTO_KERNELS}
    for _ in range(NUM_TRIALS):
        for kernel in AUTO_KERNELS:
            seconds[kernel].append(time_kernel(kernel, layers, num_rows))
    best = AUTO_KERNELS[0]
    for kernel in AUTO_KERNELS[1:]:
        if min(seconds[kernel]) * MIN_SPEEDUP <= min(seconds[best]):
            best = kernel
    return best


@torch.inference_mode()
def time_pass(kernel: Kernel, layers: list[Linear], num_rows: int) -> float:
    """Seconds of one product of `num_rows` random rows by each layer in turn.

    Going through every layer of the shape, as a decode step does, reads each weight from memory
    rather than from a cache that the previous run filled (the first, cold pass is slower: take minima).
    """
    weight = layers[0].weight
    rows = torch.randn(num_rows, weight.shape[0], dtype=weight.dtype, device=weight.device)
    start = time.perf_counter()
    for linear in layers:
        kernel(rows, linear)
    return time.perf_counter() - start
