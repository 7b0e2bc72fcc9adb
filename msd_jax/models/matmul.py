"""Matrix products with bfloat16 operands, float32 accumulation and float32 results.

The precision a TPU gives a float32 matmul by default, offered to the CPU: on x86 cores with
AVX512-BF16 XLA's bfloat16 GEMMs run about twice as fast as its float32 ones, while the activations,
norms, softmax and loss stay float32. XLA CPU only takes the fast path when both operands are
row-major with the contracting dimension last; a plain `.T` is a column-major view, so XLA would
silently run the product in float32 again (benchmarks/NOTES.md, change 9). The backward pass below
therefore writes its transposes out row-major. That relies on how XLA orders its passes, so
`bf16_matmul_works()` tries a product and its gradients once per process, and the model falls back to
float32 products (with a warning) where they fail.
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax

_ROW_BY_COL = (((1,), (0,)), ((), ()))


def _product(a: jax.Array, b: jax.Array) -> jax.Array:
    return lax.dot_general(a, b, _ROW_BY_COL, preferred_element_type=jnp.float32)


def _transposed(x: jax.Array) -> jax.Array:
    """x.T laid out row-major. The pad-and-slice is what makes XLA give the result its own row-major
    buffer instead of a column-major view of x; it moves no more data than the transpose itself."""
    t = x.T
    return lax.pad(t, jnp.zeros((), t.dtype), ((0, 1, 0), (0, 0, 0)))[:-1]


@jax.custom_vjp
def bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [m, k] @ w [k, n], float32 in and out, with both operands rounded to bfloat16."""
    return _product(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))


def _forward(x, w):
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    return _product(xb, wb), (xb, wb)


def _backward(saved, g):
    xb, wb = saved
    gb = g.astype(jnp.bfloat16)
    return _product(gb, _transposed(wb)), _product(_transposed(xb), gb)


bf16_matmul.defvjp(_forward, _backward)


def bf16_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`flax.linen.Dense(dot_general=...)`: inputs [..., k] times kernel [k, n] through `bf16_matmul`."""
    del precision, preferred_element_type  # bfloat16 operands, float32 accumulation by construction
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if (tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,) or lhs_batch or rhs_batch
            or rhs.ndim != 2):
        raise ValueError(f"bf16_dot_general handles Dense's inputs [..., k] @ kernel [k, n] only, got "
                         f"shapes {lhs.shape} @ {rhs.shape} with dimension numbers {dimension_numbers}")
    if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        raise ValueError(f"bf16_dot_general multiplies float32 arrays (a float32 body), got "
                         f"{lhs.dtype} @ {rhs.dtype}")
    out = bf16_matmul(lhs.reshape(-1, lhs.shape[-1]), rhs)
    return out.reshape(lhs.shape[:-1] + (rhs.shape[1],))


@functools.lru_cache(maxsize=None)
def bf16_matmul_works() -> bool:
    """Whether this JAX build compiles and runs `bf16_matmul` and its gradients (once per process).
    An XLA that dropped the row-major transposes would hand its CPU GEMM library a bfloat16 product
    it cannot run ("Unsupported element type for DotThunk")."""
    x = jnp.linspace(-1.0, 1.0, 64 * 32, dtype=jnp.float32).reshape(64, 32)
    w = jnp.linspace(1.0, -1.0, 32 * 48, dtype=jnp.float32).reshape(32, 48)
    try:
        grads = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.tanh(bf16_matmul(a, b))), (0, 1)))(x, w)
        jax.block_until_ready(grads)
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it here
        warnings.warn(f"model.matmul_dtype='bfloat16' is not available with this JAX build on "
                      f"{jax.default_backend()} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "the dense layers multiply in float32 instead", RuntimeWarning, stacklevel=2)
        return False
    return True
