"""Test-only: let Liger's soft-capped cross-entropy kernel run under the Triton interpreter (TRITON_INTERPRET=1).

Two limits of the interpreter in triton 3.9 (the compiled CUDA path has neither), seen with liger-kernel 0.8.5:
1. Python float kernel arguments reach the kernel as plain floats, and Liger calls `.to(tl.float32)` on them
   (`softcap`): "AttributeError: 'float' object has no attribute 'to'". Wrap them as fp32 scalars, as the compiler does.
2. `triton.language.extra.libdevice.tanh` is a stub that returns None under the interpreter: point Liger's
   cross-entropy module at a `tl`-only tanh.
Import after TRITON_INTERPRET=1 is set and before any Liger op runs. Never imported by the package itself.
"""

import os

import numpy as np
import triton
import triton.language as tl
import triton.runtime.interpreter as interpreter

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before importing this shim"

_implicit_cvt = interpreter._implicit_cvt


def _float_as_fp32(arg):
    if isinstance(arg, float):
        return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
    return _implicit_cvt(arg)


@triton.jit
def _tanh(x):
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


interpreter._implicit_cvt = _float_as_fp32

import liger_kernel.ops.cross_entropy as _liger_ce  # noqa: E402

_liger_ce.tanh = _tanh
