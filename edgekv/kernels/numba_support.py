"""What the compiled CPU kernels (``*_numba.py``) share: fp16 reads and their thread count.

(numba's on-disk cache checks only the file that defines a kernel: after editing a helper
here, delete ``edgekv/kernels/__pycache__/*.nbi`` and ``*.nbc`` or the kernels keep the old code.)

numba has no float16 type, so the kernels read a row's fp16 scales and zero points as
``uint16`` words (a second view of the same bytes) and widen them with `widen_halves`,
exactly (every finite fp16 value is an fp32 value): no per-call conversion pass over the rows,
which in a decode step would be one more read of memory that arrives cold.

The kernels split their work over ``torch.get_num_threads()`` threads (`kernel_threads`),
the one thread setting the engine has (`Policy.threads`): a decode step's matrix
products use that many, and a sparse step would otherwise leave all but one core idle
while it scores and attends.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit


@njit(inline="always", cache=True)
def widen_halves(words, out):
    """out[c] = the fp32 value of fp16 bit pattern words[c], for every c < len(out) (a
    contiguous fp32 array), exactly for every finite pattern: the sign and the 15 bits of
    exponent and mantissa move to their fp32 places, and a multiplication by 2**112 turns
    the fp16 exponent bias (15) into fp32's (127), normal and subnormal numbers alike.
    Infinities and NaNs come out finite (rows never hold them: a codec's scales and zero
    points are finite). Two passes with no branch, which the compiler vectorizes (a
    branching conversion per element — infinities, subnormals, a table of powers of two —
    does not)."""
    bits = out.view(np.uint32)
    for c in range(out.shape[0]):
        w = np.uint32(words[c])
        bits[c] = ((w & np.uint32(0x8000)) << np.uint32(16)) | ((w & np.uint32(0x7FFF)) << np.uint32(13))
    for c in range(out.shape[0]):
        out[c] *= np.float32(2.0**112)


def words(rows: torch.Tensor) -> np.ndarray:
    """``uint16`` numpy view of uint8 rows ``[..., width]`` (width even, last dim contiguous)."""
    return rows.numpy().view(np.uint16)


def kernel_threads() -> int:
    """Threads the kernels use now: torch's setting, within numba's pool (also set as numba's)."""
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n
