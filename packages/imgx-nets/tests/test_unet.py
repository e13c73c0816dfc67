"""UNet: shapes, parameter counts in closed form, conditioning, dropout, precision, slice mode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import imgx_nets
from imgx_nets import SliceWise, UNet, as_model_fn, parameter_count, summary

TINY = dict(num_channels=(4, 8), num_res_blocks=1, num_heads=2, widening_factor=4)


def _tiny(num_spatial_dims=2, seed=0, **overrides):
    kwargs = dict(num_spatial_dims=num_spatial_dims, in_channels=1, out_channels=2, **TINY)
    kwargs.update(overrides)
    return UNet(**kwargs, rngs=nnx.Rngs(seed))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, image, mask_input=None, t=None, key=None):
    return imgx_nets.apply(graphdef, state, image, mask_input, t, key)


def _call(module, *args):
    graphdef, state = nnx.split(module)
    return _apply(graphdef, state, *args)


@pytest.fixture(scope="module")
def seg2d():
    return _tiny()


@pytest.fixture(scope="module")
def diffusion2d():
    return _tiny(mask_channels=2, time_conditioned=True)


def _image(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def _res_block(c_in, c, time_features=0):
    # conv3x3 (no bias) + norm, conv3x3 (no bias) + norm, [1x1 shortcut], [FiLM dense]
    count = 9 * c_in * c + 2 * c + 9 * c * c + 2 * c
    count += (c_in * c + c) if c_in != c else 0
    count += (time_features * 2 * c + 2 * c) if time_features else 0
    return count


def _tiny_parameter_count(time_conditioned=False, skip="add", decoder="mirrored"):
    """Closed form for TINY in 2D: channels (4, 8), 1 res block, 2 heads of dim 8/4 = 2."""
    tf = 8 if time_conditioned else 0
    merged = 2 if skip == "concat" else 1
    stem = 9 * 1 * 4 + 2 * 4
    down = 2 * 2 * 4 * 8 + 2 * 8
    width = 2 * 2  # heads * head_dim
    transformer = (2 * 8) + (8 * 3 * width + 3 * width) + (width * 8 + 8) + (2 * 8)
    transformer += (8 * 32 + 32) + (32 * 8 + 8)
    up = 8 * 4 * 4 + 2 * 4
    head = 4 * 2 + 2
    time = 2 * (8 * 8 + 8) if time_conditioned else 0
    encoder = _res_block(4, 4, tf) + _res_block(8, 8, tf)
    if decoder == "mirrored":  # 1 block per level, a skip before level 0's
        decoder_blocks = _res_block(4 * merged, 4, tf) + _res_block(8, 8, tf)
        bottom = 0
    else:  # 1 + 1 blocks per level, a skip before each; bottom res block, LN, res block
        decoder_blocks = 2 * _res_block(4 * merged, 4, tf) + 2 * _res_block(8 * merged, 8, tf)
        bottom = 2 * _res_block(8, 8, tf) + 2 * 8
    return time + stem + encoder + down + transformer + bottom + up + decoder_blocks + head


def test_parameter_count_closed_form(seg2d, diffusion2d):
    assert parameter_count(seg2d) == _tiny_parameter_count() == 4042
    # mask channels only widen the stem: 9 * 2 * 4 more weights
    assert parameter_count(diffusion2d) == _tiny_parameter_count(True) + 9 * 2 * 4
    assert parameter_count(_tiny(skip="concat")) == _tiny_parameter_count(skip="concat")
    assert parameter_count(nnx.state(seg2d, nnx.Param)) == 4042
    table = summary(seg2d)
    assert "4,042" in table.splitlines()[-1] and "transformer" in table


@pytest.mark.parametrize("skip", ["add", "concat"])
@pytest.mark.parametrize("time_conditioned", [False, True])
def test_original_decoder_parameter_count_closed_form(skip, time_conditioned):
    net = nnx.eval_shape(
        lambda: _tiny(
            decoder="original",
            skip=skip,
            mask_channels=2 if time_conditioned else 0,
            time_conditioned=time_conditioned,
        )
    )
    expected = _tiny_parameter_count(time_conditioned, skip, "original")
    expected += 9 * 2 * 4 if time_conditioned else 0
    assert _abstract_parameter_count(net) == expected
    assert len(net.decoder[0]) == len(net.decoder[1]) == 2  # num_res_blocks + 1


def test_published_configuration_parameter_count_is_reproducible():
    counts = {
        parameter_count(
            nnx.eval_shape(
                lambda s=s: UNet(
                    num_spatial_dims=2, in_channels=1, out_channels=3, rngs=nnx.Rngs(s)
                )
            )
        )
        for s in (0, 1)
    }
    assert counts == {7_673_091}


def test_same_seed_same_parameters():
    a, b = nnx.state(_tiny(seed=3)), nnx.state(_tiny(seed=3))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(a))


@pytest.mark.parametrize("spatial", [(8, 8), (9, 7), (5, 3)])
def test_shapes_2d_odd_sizes(seg2d, spatial):
    out = _call(seg2d, _image((2, *spatial, 1)))
    assert out.shape == (2, *spatial, 2) and out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))


def test_shapes_3d_thick_slices_and_concat_skips():
    net = _tiny(3, patch_size=(2, 2, 1), skip="concat")
    assert net.down[0].conv.kernel.shape == (2, 2, 1, 4, 8)
    out = _call(net, _image((1, 7, 8, 3, 1)))
    assert out.shape == (1, 7, 8, 3, 2)


def test_deeper_network_with_tuple_scale_factor():
    net = _tiny(3, num_channels=(4, 4, 8), patch_size=2, scale_factor=(2, 2, 1))
    assert [d.factors for d in net.down] == [(2, 2, 2), (2, 2, 1)]
    assert _call(net, _image((1, 9, 8, 5, 1))).shape == (1, 9, 8, 5, 2)


def test_dropout_only_with_a_key(diffusion2d):
    image, mask = _image((2, 8, 8, 1)), _image((2, 8, 8, 2), seed=2)
    t = jnp.array([0.3, 0.7])
    eval1 = _call(diffusion2d, image, mask, t, None)
    eval2 = _call(diffusion2d, image, mask, t, None)
    np.testing.assert_array_equal(eval1, eval2)
    train1 = _call(diffusion2d, image, mask, t, jax.random.key(0))
    train1b = _call(diffusion2d, image, mask, t, jax.random.key(0))
    train2 = _call(diffusion2d, image, mask, t, jax.random.key(1))
    np.testing.assert_array_equal(train1, train1b)
    assert not np.allclose(train1, eval1, atol=1e-4)
    assert not np.allclose(train1, train2, atol=1e-4)
    # without dropout rate a key changes nothing
    net = _tiny(dropout=0.0)
    np.testing.assert_allclose(_call(net, image, None, None, jax.random.key(0)), _call(net, image))


def test_time_and_mask_change_the_output(diffusion2d):
    image, mask = _image((2, 8, 8, 1)), _image((2, 8, 8, 2), seed=2)
    base = _call(diffusion2d, image, mask, jnp.array([0.1, 0.1]))
    later = _call(diffusion2d, image, mask, jnp.array([0.1, 0.9]))
    np.testing.assert_allclose(base[0], later[0], rtol=1e-5, atol=1e-6)  # per sample
    assert np.abs(np.asarray(base[1] - later[1])).max() > 1e-3
    other_mask = _call(diffusion2d, image, -mask, jnp.array([0.1, 0.1]))
    assert np.abs(np.asarray(base - other_mask)).max() > 1e-3


def test_invalid_inputs_raise(seg2d, diffusion2d):
    with pytest.raises(ValueError, match="in_channels"):
        seg2d(jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="mask_input"):
        diffusion2d(jnp.zeros((1, 8, 8, 1)), None, jnp.zeros((1,)))
    with pytest.raises(ValueError, match="pass t"):
        diffusion2d(jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 8, 8, 2)))
    with pytest.raises(ValueError, match="t must be None"):
        seg2d(jnp.zeros((1, 8, 8, 1)), None, jnp.zeros((1,)))
    with pytest.raises(ValueError, match="patch_size"):
        _tiny(3, patch_size=(2, 2))
    with pytest.raises(ValueError, match="widening_factor"):
        _tiny(num_channels=(4, 6))
    with pytest.raises(ValueError, match="skip"):
        _tiny(skip="sum")


def _conv_and_dot_operand_dtypes(jaxpr):
    """Operand dtypes of every convolution and matrix product, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
            found.append((eqn.primitive.name, {v.aval.dtype for v in eqn.invars}))
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _conv_and_dot_operand_dtypes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _conv_and_dot_operand_dtypes(sub)
    return found


@pytest.mark.parametrize("remat", [False, True])
def test_bfloat16_computes_every_layer_in_bfloat16(remat):
    net = _tiny(mask_channels=2, time_conditioned=True, dtype=jnp.bfloat16, remat=remat)
    graphdef, state = nnx.split(net)
    args = (_image((2, 8, 8, 1)), _image((2, 8, 8, 2), 2), jnp.array([0.2, 0.6]))
    loss = lambda s: jnp.sum(imgx_nets.apply(graphdef, s, *args, jax.random.key(0)))
    ops = _conv_and_dot_operand_dtypes(jax.make_jaxpr(jax.grad(loss))(state).jaxpr)
    assert {name for name, _ in ops} == {"conv_general_dilated", "dot_general"}
    assert all(dtypes == {jnp.dtype(jnp.bfloat16)} for _, dtypes in ops), ops


def test_bfloat16_forward_close_to_float32(diffusion2d):
    bf16 = _tiny(mask_channels=2, time_conditioned=True, dtype=jnp.bfloat16)
    args = (_image((2, 8, 8, 1)), _image((2, 8, 8, 2), 2), jnp.array([0.2, 0.6]))
    out32, out16 = _call(diffusion2d, *args), _call(bf16, *args)
    assert out16.dtype == jnp.float32
    scale = np.abs(np.asarray(out32)).max()
    assert np.abs(np.asarray(out16 - out32)).max() < 0.05 * scale


def test_remat_same_values_and_gradients():
    args = (_image((2, 8, 8, 1)), _image((2, 8, 8, 2), 2), jnp.array([0.2, 0.6]))
    grads = []
    for remat in (False, True):
        graphdef, state = nnx.split(_tiny(mask_channels=2, time_conditioned=True, remat=remat))
        model_fn = lambda s, g=graphdef: as_model_fn(g, s)
        loss = lambda s, f=model_fn: jnp.sum(f(s)(*args, jax.random.key(0)) ** 2)
        grads.append(jax.jit(jax.grad(loss))(state))
    # recomputation reorders float32 sums: compare against each gradient's scale
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    jax.tree.map(close, *grads)


def test_as_model_fn_matches_module(diffusion2d):
    graphdef, state = nnx.split(diffusion2d)
    args = (_image((2, 8, 8, 1)), _image((2, 8, 8, 2), 2), jnp.array([0.2, 0.6]), None)
    model_fn = as_model_fn(graphdef, state)
    np.testing.assert_allclose(model_fn(*args), diffusion2d(*args), rtol=1e-5, atol=1e-6)


def test_slice_wise_equals_per_slice_application(seg2d):
    volume = _image((2, 8, 8, 3, 1))
    out = _call(SliceWise(seg2d), volume)
    assert out.shape == (2, 8, 8, 3, 2)
    for z in range(3):
        np.testing.assert_allclose(
            out[:, :, :, z], _call(seg2d, volume[:, :, :, z]), rtol=1e-5, atol=1e-6
        )
    with pytest.raises(ValueError, match="2D"):
        SliceWise(_tiny(3))


# -- the published configuration: abstract shapes and parameter count, nothing compiled ----------

PUBLISHED = dict(
    num_channels=(32, 64, 128, 256),
    num_res_blocks=2,
    num_transformer_layers=1,
    num_heads=8,
    widening_factor=4,
    patch_size=2,
)


def _abstract_published(num_spatial_dims, **overrides):
    """The published UNet with `jax.ShapeDtypeStruct` parameters: no weights are drawn."""
    kwargs = dict(num_spatial_dims=num_spatial_dims, in_channels=1, out_channels=3, **PUBLISHED)
    kwargs.update(overrides)
    return nnx.eval_shape(lambda: UNet(**kwargs, rngs=nnx.Rngs(0)))


def _output_shape(module, image_shape, *conditioning):
    graphdef, state = nnx.split(module)
    image = jax.ShapeDtypeStruct(image_shape, jnp.float32)
    return jax.eval_shape(
        lambda s, x, *c: imgx_nets.apply(graphdef, s, x, *c), state, image, *conditioning
    )


@pytest.mark.parametrize(
    ("num_spatial_dims", "spatial"),
    [(2, (37, 29)), (2, (9, 15)), (3, (19, 13, 9)), (3, (7, 11, 5))],
)
def test_published_configuration_odd_sizes(num_spatial_dims, spatial):
    # 3 down-samplings by 2: none of these sizes is a multiple of 8, some are smaller than it.
    net = _abstract_published(num_spatial_dims)
    assert net.down[0].factors == (2,) * num_spatial_dims
    out = _output_shape(net, (1, *spatial, 1))
    assert out.shape == (1, *spatial, 3) and out.dtype == jnp.float32


def test_published_diffusion_configuration_odd_3d_size_bfloat16():
    net = _abstract_published(
        3, mask_channels=3, time_conditioned=True, patch_size=(2, 2, 1), dtype=jnp.bfloat16
    )
    mask = jax.ShapeDtypeStruct((1, 13, 11, 5, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    out = _output_shape(net, (1, 13, 11, 5, 1), mask, t)
    assert out.shape == (1, 13, 11, 5, 3) and out.dtype == jnp.float32


def _abstract_parameter_count(module):
    leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)  # nothing drawn
    return sum(int(np.prod(leaf.shape)) for leaf in leaves)


def test_published_3d_parameter_count_from_abstract_state():
    assert _abstract_parameter_count(_abstract_published(3)) == 20_551_491
    # the same configuration in 2D, as counted from concrete weights above
    assert _abstract_parameter_count(_abstract_published(2)) == 7_673_091


# -- FLOPs of a train step (forward + backward) by XLA's cost analysis: lowered, not compiled --


def _train_step_flops(module, shape, num_classes=3):
    """FLOPs of `value_and_grad` of the cross-entropy on abstract inputs, dropout on."""
    graphdef, state = nnx.split(module, nnx.Param)

    def loss(s, image, label, key):
        logits = imgx_nets.apply(graphdef, s, image, None, None, key)
        log_p = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(log_p, label[..., None], axis=-1).mean()

    args = (
        state,
        jax.ShapeDtypeStruct((*shape, 1), jnp.float32),
        jax.ShapeDtypeStruct(shape, jnp.int32),
        jax.eval_shape(lambda: jax.random.key(0)),
    )
    cost = jax.jit(jax.value_and_grad(loss)).lower(*args).cost_analysis()
    return (cost[0] if isinstance(cost, list | tuple) else cost)["flops"]


@pytest.mark.parametrize(
    ("decoder", "flops", "parameters"),
    [("mirrored", 6_635_613, 4042), ("original", 10_704_973, 7914)],
)
def test_tiny_flops_and_parameters_of_both_decoders(decoder, flops, parameters):
    net = nnx.eval_shape(lambda: _tiny(decoder=decoder))
    assert _abstract_parameter_count(net) == parameters
    assert _abstract_parameter_count(net) == _tiny_parameter_count(decoder=decoder)
    assert _train_step_flops(net, (2, 16, 16)) == pytest.approx(flops, rel=1e-3)


ORIGINAL_TOOLKIT_2D_GFLOP = 336.0  # its train step at batch 8 x 128 x 128 (bench/README.md)


def test_published_2d_train_step_has_the_original_flops_and_parameters():
    flops = {
        decoder: _train_step_flops(_abstract_published(2, decoder=decoder), (8, 128, 128)) / 1e9
        for decoder in ("mirrored", "original")
    }
    assert flops["original"] == pytest.approx(ORIGINAL_TOOLKIT_2D_GFLOP, rel=0.05)
    assert flops["mirrored"] < 0.95 * ORIGINAL_TOOLKIT_2D_GFLOP  # one block less per level
    assert flops["mirrored"] == pytest.approx(257.3, rel=0.01)
    assert flops["original"] == pytest.approx(341.5, rel=0.01)
    assert _abstract_parameter_count(_abstract_published(2, decoder="original")) == 11_603_587
    assert _abstract_parameter_count(_abstract_published(3, decoder="original")) == 32_334_019


@pytest.mark.parametrize("spatial", [(8, 8), (9, 7), (5, 3)])
@pytest.mark.parametrize("skip", ["add", "concat"])
def test_original_decoder_odd_sizes(spatial, skip):
    net = _tiny(decoder="original", skip=skip)
    out = _call(net, _image((2, *spatial, 1)))
    assert out.shape == (2, *spatial, 2) and np.all(np.isfinite(np.asarray(out)))


def test_original_decoder_3d_diffusion_deeper():
    net = _tiny(
        3,
        decoder="original",
        num_channels=(4, 4, 8),
        num_res_blocks=2,
        patch_size=(2, 2, 1),
        mask_channels=2,
        time_conditioned=True,
    )
    mask, t = _image((1, 7, 9, 3, 2), 2), jnp.array([0.4])
    assert _call(net, _image((1, 7, 9, 3, 1)), mask, t).shape == (1, 7, 9, 3, 2)


def test_original_decoder_data_flow_written_out():
    # TINY: levels (4, 8), 1 res block. Skips: stem, enc0, down0, enc1 (num_res_blocks + 1 per
    # level); decoder blocks take x + the latest unused skip; the bottom is res-TF-LN-res.
    net = _tiny(decoder="original")
    image = _image((2, 9, 7, 1))
    blk = lambda module, x: module(x, None, None)
    s0 = net.stem(image)
    e0 = blk(net.encoder[0][0], s0)
    d0 = net.down[0](e0)
    e1 = blk(net.encoder[1][0], d0)
    x = blk(net.bottom_in, e1)
    tokens = x.reshape(2, -1, 8)
    x = net.transformer_norm(net.transformer[0](tokens, None)).reshape(x.shape)
    x = blk(net.bottom_out, x)
    x = blk(net.decoder[1][1], blk(net.decoder[1][0], x + e1) + d0)
    x = net.up[0](x)[:, :9, :7]
    x = blk(net.decoder[0][1], blk(net.decoder[0][0], x + e0) + s0)
    expected = net.head(x)
    np.testing.assert_allclose(_call(net, image), expected, rtol=1e-5, atol=1e-5)
