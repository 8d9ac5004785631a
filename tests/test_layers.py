"""Memory-lean backwards of the shared layers (models/layers.py): Linear, LayerNorm, GELU and
softmax with hand-written VJPs, compared with autodiff through the library implementations
they replace (flax's `nnx.Linear`, `nnx.LayerNorm`, `jax.nn.gelu`, `jax.nn.softmax`), in
float32 and bfloat16, and the compiled update step they allow (no weight copies); drop path
against its definition."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mim_jax.models import backward, layers


def _value_and_grads(fn, *args):
    """fn's value and the gradients of a generic scalar of its output w.r.t. every argument."""

    def scalar(*a):
        out = fn(*a).astype(jnp.float32)
        return jnp.sum(jnp.sin(out) * jax.random.uniform(jax.random.key(7), out.shape))

    return fn(*args), jax.grad(scalar, argnums=tuple(range(len(args))))(*args)


def _assert_close(ours, reference, atol):
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = max(1.0, float(jnp.abs(b.astype(jnp.float32)).max()))
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol * scale, rtol=0
        )


@pytest.mark.parametrize(("dtype", "atol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_layer_norm_matches_flax(dtype, atol):
    rng = jax.random.key(0)
    x = (3.0 + 2.0 * jax.random.normal(rng, (2, 5, 24))).astype(dtype)
    ours = layers.LayerNorm(24, rngs=nnx.Rngs(params=0), eps=1e-6, dtype=dtype)
    flax_ln = nnx.LayerNorm(24, epsilon=1e-6, dtype=dtype, rngs=nnx.Rngs(params=0))
    scale = 1.0 + 0.1 * jax.random.normal(jax.random.key(1), (24,))
    bias = 0.1 * jax.random.normal(jax.random.key(2), (24,))
    for module in (ours, flax_ln):
        module.scale[...] = scale
        module.bias[...] = bias

    def apply(module):
        graphdef, params = nnx.split(module, nnx.Param)
        return lambda x, p: nnx.merge(graphdef, p)(x), params

    fn, params = apply(ours)
    ref_fn, ref_params = apply(flax_ln)
    _assert_close(_value_and_grads(fn, x, params), _value_and_grads(ref_fn, x, ref_params), atol)


@pytest.mark.parametrize(("dtype", "atol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_norm_linear_matches_flax(dtype, atol):
    """norm_linear (kernel gradient from the stored normalized input) vs autodiff through
    flax's LayerNorm then Linear, every parameter and the input, shifted and scaled data."""
    x = (3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 5, 24))).astype(dtype)
    norm = layers.LayerNorm(24, rngs=nnx.Rngs(params=0), eps=1e-6, dtype=dtype)
    linear = layers.Linear(24, 40, ("embed", "mlp"), rngs=nnx.Rngs(params=1), dtype=dtype)
    norm.scale[...] = 1.0 + 0.3 * jax.random.normal(jax.random.key(1), (24,))
    norm.bias[...] = 0.5 * jax.random.normal(jax.random.key(2), (24,))
    linear.bias[...] = 0.1 * jax.random.normal(jax.random.key(3), (40,))
    flax_ln = nnx.LayerNorm(24, epsilon=1e-6, dtype=dtype, rngs=nnx.Rngs(params=0))
    flax_ln.scale[...], flax_ln.bias[...] = norm.scale[...], norm.bias[...]
    flax_linear = nnx.Linear(24, 40, dtype=dtype, rngs=nnx.Rngs(params=0))
    flax_linear.kernel[...], flax_linear.bias[...] = linear.kernel[...], linear.bias[...]
    ours_def, ours_params = nnx.split((norm, linear), nnx.Param)
    ref_def, ref_params = nnx.split((flax_ln, flax_linear), nnx.Param)

    def ours(x, p):
        n, lin = nnx.merge(ours_def, p)
        return layers.norm_linear(n, lin, x)

    def reference(x, p):
        n, lin = nnx.merge(ref_def, p)
        return lin(n(x))

    ref = _value_and_grads(reference, x, ref_params)
    _assert_close(_value_and_grads(ours, x, ours_params), ref, atol)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize(("dtype", "atol"), [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_linear_matches_flax(dtype, atol, use_bias):
    """Linear's hand-written backward (kernel gradient ordered after the input gradient) vs
    autodiff through flax's Linear, every parameter and the input."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 24)).astype(dtype)
    names = ("embed", "mlp")
    ours = layers.Linear(24, 40, names, rngs=nnx.Rngs(params=1), dtype=dtype, use_bias=use_bias)
    flax_linear = nnx.Linear(24, 40, dtype=dtype, use_bias=use_bias, rngs=nnx.Rngs(params=0))
    flax_linear.kernel[...] = ours.kernel[...]
    if use_bias:
        ours.bias[...] = 0.1 * jax.random.normal(jax.random.key(3), (40,))
        flax_linear.bias[...] = ours.bias[...]

    def value_and_grads(module):
        graphdef, params = nnx.split(module, nnx.Param)
        return _value_and_grads(lambda v, p: nnx.merge(graphdef, p)(v), x, params)

    _assert_close(value_and_grads(ours), value_and_grads(flax_linear), atol)


def _kernel_copies(make_mlp) -> int:
    """Copies of kernel parameters in the compiled, donated SGD step of a norm + MLP."""
    mlp = make_mlp()
    graphdef, params = nnx.split(mlp, nnx.Param)

    def step(params, x):
        def loss(p):
            return jnp.mean(jnp.square(nnx.merge(graphdef, p)(x)))

        grads = jax.grad(loss)(params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    x = jax.random.normal(jax.random.key(0), (256, 64))
    hlo = jax.jit(step, donate_argnums=0).lower(params, x).compile().as_text()
    return len(re.findall(r"= f32\[[0-9,]+\]\S* copy\(%?\S*kernel", hlo))


class _Mlp(nnx.Module):
    def __init__(self, lean: bool):
        rngs = nnx.Rngs(params=0)
        self.lean = lean
        self.norm = layers.LayerNorm(64, rngs=rngs)
        if lean:
            self.fc = layers.Mlp(64, 256, rngs=rngs)
        else:
            self.fc1, self.fc2 = nnx.Linear(64, 256, rngs=rngs), nnx.Linear(256, 64, rngs=rngs)

    def __call__(self, x):
        if self.lean:
            return self.fc(x, self.norm)
        return self.fc2(jax.nn.gelu(self.fc1(self.norm(x)), approximate=False))


def test_donated_update_keeps_no_weight_copies():
    """Without gradient clipping nothing else orders an in-place update after the backward's
    read of that weight, and XLA copies every weight it reads (the flax layers below); the
    kernel gradients of Linear and norm_linear wait for their input gradient (`kernel_grad`)."""
    assert _kernel_copies(lambda: _Mlp(lean=False)) > 0, "the copy detector finds no copies"
    assert _kernel_copies(lambda: _Mlp(lean=True)) == 0


def test_layer_norm_keeps_dtype_of_input():
    """A float32 residual stream into a bfloat16 norm: output bf16, input gradient float32."""
    ln = layers.LayerNorm(8, rngs=nnx.Rngs(params=0), dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (3, 8))
    out, vjp = jax.vjp(ln, x)
    assert out.dtype == jnp.bfloat16
    assert vjp(jnp.ones_like(out))[0].dtype == jnp.float32


@pytest.mark.parametrize(("dtype", "atol"), [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_gelu_matches_exact_gelu(dtype, atol):
    x = (3.0 * jax.random.normal(jax.random.key(0), (4, 33))).astype(dtype)
    reference = _value_and_grads(lambda v: jax.nn.gelu(v, approximate=False), x)
    _assert_close(_value_and_grads(layers.gelu, x), reference, atol)


def test_softmax_matches_jax_with_masked_rows():
    """Including a fully masked row (MASK_VALUE everywhere: uniform, finite)."""
    logits = jax.random.normal(jax.random.key(0), (2, 3, 7, 7))
    logits = logits.at[:, :, 2].set(layers.MASK_VALUE)
    logits = logits.at[:, :, :, 5].add(layers.MASK_VALUE)
    reference = _value_and_grads(lambda v: jax.nn.softmax(v, axis=-1), logits)
    ours = _value_and_grads(layers.softmax, logits)
    _assert_close(ours, reference, 1e-6)
    assert bool(jnp.isfinite(ours[1][0]).all())


def test_lean_backwards_keep_fewer_residuals():
    """What autodiff saves for the backward (jax's own residual listing): the norm keeps one
    token-sized array, GELU its input only, and attention weights followed by their matmul
    keep the probabilities only (jax.nn.softmax adds its exponentials)."""
    from jax._src.ad_checkpoint import saved_residuals

    def big(fn, x):
        res = saved_residuals(fn, x)
        return [a.shape for a, src in res if a.size == x.size and "output of" in src]

    x = jax.random.normal(jax.random.key(0), (64, 32))
    ln = layers.LayerNorm(32, rngs=nnx.Rngs(params=0))
    flax_ln = nnx.LayerNorm(32, rngs=nnx.Rngs(params=0))
    assert len(big(lambda v: jnp.sum(ln(v)), x)) == 1 < len(big(lambda v: jnp.sum(flax_ln(v)), x))
    assert big(lambda v: jnp.sum(layers.gelu(v)), x) == []  # Only its input, the argument.
    assert len(big(lambda v: jnp.sum(jax.nn.gelu(v, approximate=False)), x)) >= 2

    def attention(softmax):  # Values depend on the input too, as in attention.
        return lambda v: jnp.sum(softmax(v) @ jnp.tanh(v.T[:, :5]))

    assert len(big(attention(layers.softmax), x)) == 1
    assert len(big(attention(lambda v: jax.nn.softmax(v, axis=-1)), x)) == 2


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_drop_path_keeps_or_zeroes_whole_samples(rate):
    """drop_path's definition, per sample (leading axis) of `[batch, tokens, channels]`: the
    whole sample is x_i / (1 - rate) with probability 1 - rate, else exactly 0, so the
    expectation is x (unbiased). Counts over 4000 samples stay within 4 standard deviations."""
    n, keep = 4000, 1.0 - rate
    x = np.asarray(2.0 + jax.random.normal(jax.random.key(0), (n, 3, 5)))
    assert (x != 0).all()  # A zeroed sample is then unambiguous.
    out = np.asarray(layers.drop_path(jnp.asarray(x), rate, nnx.Rngs(dropout=1)))
    # XLA may divide as multiplication by the reciprocal: a few ulp.
    kept = np.isclose(out, x / keep, rtol=1e-6, atol=0).all(axis=(1, 2))
    dropped = (out == 0).all(axis=(1, 2))
    assert (kept ^ dropped).all()
    assert abs(kept.mean() - keep) < 4 * np.sqrt(keep * rate / n)
    # Per element, out - x has variance E[x^2] rate / (1 - rate) across samples.
    tol = 4 * np.sqrt(np.mean(x**2) * rate / keep / n)
    assert np.abs(out.mean(0) - x.mean(0)).max() < tol
    other = np.asarray(layers.drop_path(jnp.asarray(x), rate, nnx.Rngs(dropout=2)))
    # Independent masks disagree on a fraction 2 rate (1 - rate) of the samples.
    assert ((other == 0).all(axis=(1, 2)) != dropped).mean() > rate * keep
    again = np.asarray(layers.drop_path(jnp.asarray(x), rate, nnx.Rngs(dropout=1)))
    np.testing.assert_array_equal(again, out)


def test_drop_path_is_identity_without_rngs_or_rate():
    x = jax.random.normal(jax.random.key(0), (6, 4, 3))
    np.testing.assert_array_equal(layers.drop_path(x, 0.0, nnx.Rngs(dropout=0)), x)
    np.testing.assert_array_equal(layers.drop_path(x, 0.5, None), x)


def test_autodiff_switch_replaces_the_hand_written_backwards(monkeypatch):
    """MIM_JAX_AUTODIFF=all: no custom_vjp in the trace, the same gradient values."""
    x = jax.random.normal(jax.random.key(0), (4, 16))
    scale, bias = jnp.full(16, 1.3), jnp.full(16, 0.1)
    kernel = jax.random.normal(jax.random.key(1), (16, 16)) * 0.1

    def loss(x, scale, bias, kernel):
        y = layers.layer_norm(x, scale, bias, 1e-5, jnp.float32)
        h = layers.gelu(layers.linear(y, kernel, bias, jnp.float32))
        return jnp.sum(layers.softmax(h) * x)

    def traced():  # A fresh function each time: jax caches traces by function.
        fresh = lambda *args: loss(*args)
        grad = jax.grad(fresh, argnums=(0, 1, 2, 3))(x, scale, bias, kernel)
        return str(jax.make_jaxpr(fresh)(x, scale, bias, kernel)), grad

    text, custom = traced()
    assert text.count("custom_vjp_call[") == 4
    monkeypatch.setenv(backward.ENV, "all")
    text, autodiff = traced()
    assert "custom_vjp_call" not in text
    for a, b in zip(custom, autodiff, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv(backward.ENV, "gelu,softmax")  # Only the named ones.
    assert traced()[0].count("custom_vjp_call[") == 2
