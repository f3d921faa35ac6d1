"""A pure-torch stand-in for bitsandbytes' AVX512-BF16 CPU inference kernel, so the 4-bit repacking
trap can be forced on any CPU.

On CPUs with AVX512-BF16, an eval-mode forward of ``bnb.nn.Linear4bit`` repacks the weight
(``_convert_weight_packed_for_cpu``: 4-bit codes in blocks of 32 output rows, absmax transposed to
bf16) and ``matmul_4bit`` then calls ``torch.ops.bitsandbytes.gemv_4bit``, whose native CPU kernel
exists only on such CPUs. Everything up to that op is Python that runs anywhere; this module
supplies the op's CPU kernel so the whole path runs here too. It is registered at the same
dispatch key as the native kernel, so autograd sees exactly what it sees with the real one (an
op with no autograd formula)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

BLOCK_N = 32  # output rows per packed block (bitsandbytes' block_n)


def unpack_cpu_layout(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[N, K/2] packed bytes -> [N, K] 4-bit code indices (inverse of bitsandbytes' CPU repacking)."""
    rows = packed.contiguous().view(torch.uint8).reshape(-1, BLOCK_N)
    codes = torch.cat([rows & 0xF, rows >> 4], dim=1)  # low nibbles: rows 0-15 of a block pair, high: 16-31
    codes = codes.reshape(n // BLOCK_N, k // 2, BLOCK_N, 2).transpose(1, 2)
    return codes.reshape(n, k).long()


def packed_gemv_4bit(A: torch.Tensor, B: torch.Tensor, shapeB: Sequence[int], absmax: torch.Tensor,
                     code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``A @ dequant(B).T`` for a weight in the CPU inference layout, with the native kernel's
    numerics (inputs rounded to bf16, float32 accumulation, bf16 result cast back to A's dtype)."""
    n, k = int(shapeB[0]), int(shapeB[1])
    scale = absmax.float().t().repeat_interleave(blocksize, dim=1)[:, :k]  # absmax is [K/blocksize, N]
    weight = (code.float()[unpack_cpu_layout(B, n, k)] * scale).to(torch.bfloat16).float()
    out = A.to(torch.bfloat16).float().reshape(-1, k) @ weight.t()
    return out.to(torch.bfloat16).to(A.dtype).reshape(*A.shape[:-1], n)


@contextlib.contextmanager
def emulated_cpu_kernel() -> Iterator[list]:
    """Register ``packed_gemv_4bit`` as the CPU kernel of ``bitsandbytes::gemv_4bit`` (replacing the
    native one where it exists) and restore the previous registration on exit. Yields a list that
    records one entry per call."""
    import bitsandbytes  # noqa: F401 - defines the op

    calls: list = []

    def kernel(A, B, shapeB, absmax, code, blocksize):
        calls.append(tuple(shapeB))
        with torch.no_grad():  # a native kernel records nothing for autograd; neither may its stand-in
            return packed_gemv_4bit(A, B, shapeB, absmax, code, blocksize)

    lib = torch.library.Library("bitsandbytes", "IMPL")
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
            lib.impl("gemv_4bit", kernel, "CPU")
        yield calls
    finally:
        lib._destroy()
