"""Tests for msd_jax.models.matmul (bfloat16 operands, float32 accumulation) and the model's
`matmul_dtype` option.

The reference rounds float32 to bfloat16 by hand (round to nearest, ties to even, on the bit
pattern) and multiplies in float64 numpy."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msd_jax.models import matmul, vit
from conftest import tiny_model

# The bfloat16 product relies on how XLA orders its passes (see msd_jax/models/matmul.py); where a JAX
# build cannot run it the model falls back to float32 (tested below) and these numbers do not apply.
needs_bf16 = pytest.mark.skipif(not matmul.bf16_matmul_works(),
                                reason="this JAX build cannot run bf16_matmul (the model falls back to float32)")


def np_bf16(x):
    """float32 -> nearest bfloat16 (ties to even), returned as float64; finite inputs only."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def test_np_bf16_reference_by_hand():
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: to even (1); 1 + 3 * 2^-9 rounds up
    x = np.array([1.0, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -9, -3.0, 2.0 ** -130], np.float32)
    np.testing.assert_array_equal(np_bf16(x), [1.0, 1.0, 1 + 2.0 ** -7, -3.0, 2.0 ** -130])


@needs_bf16
@pytest.mark.parametrize("m,k,n", [(7, 5, 3), (33, 64, 48), (1, 16, 9)])
def test_bf16_matmul_and_its_gradients_match_rounded_float64(m, k, n):
    rng = np.random.default_rng(m * k * n)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = rng.normal(size=(k, n)).astype(np.float32)
    g = rng.normal(size=(m, n)).astype(np.float32)  # the cotangent

    out, vjp = jax.vjp(matmul.bf16_matmul, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    assert out.dtype == dx.dtype == dw.dtype == jnp.float32
    # float32 accumulation of exact bf16 x bf16 products: error ~ k * 2^-24 * sum |terms|
    tol = lambda a, b: 1e-6 * k * (np.abs(a) @ np.abs(b)) + 1e-30
    ref = np_bf16(x) @ np_bf16(w)
    assert np.all(np.abs(np.asarray(out) - ref) <= tol(np_bf16(x), np_bf16(w)))
    ref_dx = np_bf16(g) @ np_bf16(w).T
    assert np.all(np.abs(np.asarray(dx) - ref_dx) <= tol(np_bf16(g), np_bf16(w).T))
    ref_dw = np_bf16(x).T @ np_bf16(g)
    assert np.all(np.abs(np.asarray(dw) - ref_dw) <= 1e-6 * m * (np.abs(np_bf16(x).T) @ np.abs(np_bf16(g))) + 1e-30)
    # the operands really are rounded: the float32 product is measurably elsewhere
    exact = x.astype(np.float64) @ w.astype(np.float64)
    assert np.abs(np.asarray(out) - exact).max() > 10 * np.abs(np.asarray(out) - ref).max()


@needs_bf16
def test_bf16_dot_general_as_dense_layer():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 6)).astype(np.float32)
    kernel = rng.normal(size=(6, 4)).astype(np.float32)
    bias = rng.normal(size=(4,)).astype(np.float32)
    dense = nn.Dense(4, dot_general=matmul.bf16_dot_general)
    got = np.asarray(jax.jit(dense.apply)({"params": {"kernel": kernel, "bias": bias}}, x))
    assert got.shape == (2, 3, 4)
    np.testing.assert_allclose(got, np_bf16(x) @ np_bf16(kernel) + bias, atol=1e-5, rtol=1e-6)


def test_bf16_dot_general_rejects_what_it_does_not_handle():
    x = jnp.ones((3, 4))
    with pytest.raises(ValueError, match="dimension numbers"):
        matmul.bf16_dot_general(x, jnp.ones((3, 5)), (((0,), (0,)), ((), ())))
    with pytest.raises(ValueError, match="float32"):
        matmul.bf16_dot_general(x.astype(jnp.bfloat16), jnp.ones((4, 5)), (((1,), (0,)), ((), ())))


def _cfg(**kw):
    base = dict(image_size=16, patch_size=4, channels=1, embed_dim=32, depth=2, num_heads=2,
                out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16)
    base.update(kw)
    return tiny_model(**base)


@needs_bf16
def test_student_with_bf16_matmuls_is_close_to_float32_and_differs():
    f32, b16 = _cfg(), _cfg(matmul_dtype="bfloat16")
    assert f32.dot_general is None and b16.dot_general is matmul.bf16_dot_general
    assert _cfg(dtype="bfloat16", matmul_dtype="bfloat16").dot_general is None  # already bf16
    rng = np.random.default_rng(0)
    params = jax.jit(lambda k: vit.init_student(f32, k))(jax.random.key(0))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3, a.dtype), params)
    tokens = jnp.asarray(rng.normal(size=(4, 9, 32)), jnp.float32)

    def loss(cfg):
        return lambda p: jnp.sum(jnp.sin(vit.Student(cfg).apply({"params": p}, tokens)))

    (l32, g32), (l16, g16) = (jax.jit(jax.value_and_grad(loss(c)))(params) for c in (f32, b16))
    g32, g16 = (np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(g)]) for g in (g32, g16))
    cos = g32 @ g16 / (np.linalg.norm(g32) * np.linalg.norm(g16))
    assert cos > 0.999, cos                 # the same gradient direction ...
    assert np.abs(g32 - g16).max() > 1e-6   # ... from a different computation
    assert abs(float(l32) - float(l16)) < 1e-2 * (1 + abs(float(l32)))


def test_matmul_dtype_is_validated_and_not_part_of_the_model_identity():
    with pytest.raises(ValueError, match="config.model.matmul_dtype"):
        _cfg(matmul_dtype="float16")
    assert set(vit.COMPUTE_FIELDS) == {"dtype", "matmul_dtype"}


def test_model_falls_back_to_float32_where_bf16_products_fail(monkeypatch):
    def broken(x, w):
        raise RuntimeError("UNIMPLEMENTED: Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32")

    matmul.bf16_matmul_works.cache_clear()
    monkeypatch.setattr(matmul, "bf16_matmul", broken)
    try:
        with pytest.warns(RuntimeWarning, match="matmul_dtype='bfloat16' is not available.*DotThunk"):
            assert _cfg(matmul_dtype="bfloat16").dot_general is None
    finally:
        matmul.bf16_matmul_works.cache_clear()
