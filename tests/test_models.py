"""E2EVLP: masks, causality, cached decoding, parameter counts, input checks, sharding names.

Variables come from `jax.eval_shape(init)` filled with seeded numpy noise: compiling the
real random init costs far more CPU time than the forward pass (the initialisers that
matter are tested on their own modules below).
"""

import functools
import math
import re
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from e2e_vlp.models import E2EVLP
from e2e_vlp.models import e2e_vlp as e2e_vlp_module
from e2e_vlp.models import embeddings
from e2e_vlp.models import heads
from e2e_vlp.models import transformer
from e2e_vlp.train import sharding

B, H, W, L, T = 2, 48, 48, 8, 6
REAL_HW = ((48, 48), (40, 24))  # example 1 is padded: 40 rows x 24 columns are real
TEXT_LEN = (8, 5)
CAPTION_LEN = (6, 4)


def tiny(**overrides):
  config = pretrain.get_config('tiny').model
  config.fusion_layers = 1  # one layer shows the behaviour and compiles in a quarter the time
  for key, value in overrides.items():
    config[key] = value
  return config


def make_batch(seed=0, batch=B, height=H, width=W, text_len=L, caption_len=T,
               vocab=512) -> dict[str, jnp.ndarray]:
  rng = np.random.default_rng(seed)
  image_mask = np.zeros((batch, height, width), bool)
  text_mask = np.zeros((batch, text_len), bool)
  caption_mask = np.zeros((batch, caption_len), bool)
  for i in range(batch):
    (h, w), n, t = REAL_HW[i % 2], TEXT_LEN[i % 2], CAPTION_LEN[i % 2]
    image_mask[i, :min(h, height), :min(w, width)] = True
    text_mask[i, :min(n, text_len)] = True
    caption_mask[i, :min(t, caption_len)] = True
  return {
      'image': jnp.asarray(rng.normal(size=(batch, height, width, 3)), jnp.float32),
      'image_mask': jnp.asarray(image_mask),
      'text_ids': jnp.asarray(rng.integers(1, vocab, (batch, text_len)), jnp.int32),
      'text_mask': jnp.asarray(text_mask),
      'caption_in': jnp.asarray(rng.integers(1, vocab, (batch, caption_len)), jnp.int32),
      'caption_mask': jnp.asarray(caption_mask),
  }


def abstract_variables(model, *args, method=None, **kwargs):
  return jax.eval_shape(functools.partial(model.init, method=method, **kwargs),
                        jax.random.key(0), *args)


def fill(abstract, seed=0):
  """Seeded noise with the shapes of `abstract`; BN variances positive."""
  pool = np.random.default_rng(seed).standard_normal(1 << 20).astype(np.float32)

  def leaf(path, x):
    name = path[-1].key
    values = np.resize(np.roll(pool, zlib.crc32(jax.tree_util.keystr(path).encode())), x.shape)
    if name == 'var':
      return jnp.asarray(1 + 0.5 * np.abs(values))
    if name == 'scale':
      return jnp.asarray(1 + 0.1 * values)
    fan_in = math.prod(x.shape[:-1]) if x.ndim > 1 else 100
    return jnp.asarray(values / math.sqrt(fan_in))

  return jax.tree_util.tree_map_with_path(leaf, nn.unbox(abstract))


@pytest.fixture(scope='module')
def model():
  return E2EVLP(tiny())


@pytest.fixture(scope='module')
def batch():
  return make_batch()


@pytest.fixture(scope='module')
def variables(model, batch):
  return fill(abstract_variables(model, batch, train=False))


@pytest.fixture(scope='module')
def forward(model):
  return jax.jit(lambda v, b: model.apply(v, b, train=False))


@pytest.fixture(scope='module')
def outputs(forward, variables, batch):
  return forward(variables, batch)


def assert_same(a, b, keys, atol=1e-5):
  for key in keys:
    np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), atol=atol, rtol=1e-5,
                               err_msg=key)


DECODER_KEYS = ('det_class_logits', 'det_attr_logits', 'det_boxes', 'caption_logits',
                'cell_class_logits')


def test_output_shapes(outputs):
  c = tiny()
  n = 9  # 48 / 16 = 3 x 3 grid ('small' stem)
  expected = {
      'mlm_logits': (B, L, c.vocab_size), 'itm_logits': (B, 2),
      'det_class_logits': (c.decoder_layers, B, c.num_queries, c.num_classes + 1),
      'det_attr_logits': (c.decoder_layers, B, c.num_queries, c.num_attributes),
      'det_boxes': (c.decoder_layers, B, c.num_queries, 4),
      'caption_logits': (B, T, c.vocab_size), 'cell_class_logits': (B, n, c.num_classes + 1),
      'visual_mask': (B, n), 'cell_centers': (B, n, 2)}
  assert {k: v.shape for k, v in outputs.items()} == expected
  for key, value in outputs.items():
    assert value.dtype == (jnp.bool_ if key == 'visual_mask' else jnp.float32), key
    assert np.isfinite(np.asarray(value)).all(), key
  boxes = np.asarray(outputs['det_boxes'])
  assert ((boxes > 0) & (boxes < 1)).all()


def test_visual_mask_and_cell_centers(outputs):
  # Example 1: 40 x 24 real pixels; cells start at pixels 0, 16, 32.
  rows_real, cols_real = np.array([1, 1, 1], bool), np.array([1, 1, 0], bool)
  expected_mask = np.stack([np.ones(9, bool), np.outer(rows_real, cols_real).ravel()])
  np.testing.assert_array_equal(np.asarray(outputs['visual_mask']), expected_mask)
  centers = np.asarray(outputs['cell_centers'])
  # Cell (row 1, col 2): centre pixel (x, y) = (40, 24); real size (w, h) = (24, 40).
  np.testing.assert_allclose(centers[1, 1 * 3 + 2], [40 / 24, 24 / 40])
  np.testing.assert_allclose(centers[0, 1 * 3 + 2], [40 / 48, 24 / 48])


def test_padded_text_does_not_matter(forward, variables, batch, outputs):
  pad = ~batch['text_mask']
  assert pad.any()
  changed = dict(batch, text_ids=jnp.where(pad, 7, batch['text_ids']))
  got = forward(variables, changed)
  assert_same(outputs, got, ('itm_logits',) + DECODER_KEYS)
  real = np.asarray(batch['text_mask'])
  np.testing.assert_allclose(np.asarray(got['mlm_logits'])[real],
                             np.asarray(outputs['mlm_logits'])[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('fill', [1e3, np.nan, -np.inf])
def test_padded_pixels_do_not_matter(forward, variables, batch, outputs, fill):
  pad = ~batch['image_mask']
  assert pad.any()
  changed = dict(batch, image=jnp.where(pad[..., None], fill, batch['image']))
  assert_same(outputs, forward(variables, changed), tuple(outputs))


def test_text_does_not_reach_the_decoders(forward, variables, batch, outputs):
  changed = dict(batch, text_ids=(batch['text_ids'] * 7 + 3) % 512)
  got = forward(variables, changed)
  assert_same(outputs, got, DECODER_KEYS)
  assert not np.allclose(got['mlm_logits'], outputs['mlm_logits'], atol=1e-3)
  assert not np.allclose(got['itm_logits'], outputs['itm_logits'], atol=1e-4)


def _shifted(variables, module: str):
  """`variables` with every parameter of the top-level `module` moved by 0.1."""
  params = dict(variables['params'])
  params[module] = jax.tree.map(lambda x: x + 0.1, params[module])
  return {**variables, 'params': params}


@pytest.mark.parametrize('joint_fusion', ['merged', 'cross_attention'])
@pytest.mark.parametrize('joint_visual', ['grid', 'image_encoder'])
def test_separate_image_encoder(batch, joint_visual, joint_fusion):
  """The image encoder feeds the decoders, and the joint pass only with 'image_encoder';
  the joint pass's own layers never reach the decoders."""
  model = E2EVLP(tiny(share_encoder=False, joint_visual=joint_visual,
                      joint_fusion=joint_fusion))
  forward = jax.jit(lambda v, b: model.apply(v, b, train=False))
  variables = fill(abstract_variables(model, batch, train=False))
  outputs = forward(variables, batch)
  joint_keys = ('mlm_logits', 'itm_logits')
  got = forward(_shifted(variables, 'image_encoder'), batch)
  assert not np.allclose(got['det_boxes'], outputs['det_boxes'], atol=1e-4)
  assert not np.allclose(got['caption_logits'], outputs['caption_logits'], atol=1e-4)
  if joint_visual == 'grid':
    assert_same(outputs, got, joint_keys)
  else:
    assert not np.allclose(got['mlm_logits'], outputs['mlm_logits'], atol=1e-4)
  joint_layers = 'encoder' if joint_fusion == 'merged' else 'fusion'
  assert ('encoder' in variables['params']) == (joint_fusion == 'merged')
  got = forward(_shifted(variables, joint_layers), batch)
  assert_same(outputs, got, DECODER_KEYS)
  assert not np.allclose(got['mlm_logits'], outputs['mlm_logits'], atol=1e-4)


def test_cross_attention_fusion_returns_the_text(batch):
  # The fusion's output is the text alone; MLM reads it, and it changes with the image.
  model = E2EVLP(tiny(joint_fusion='cross_attention'))
  variables = fill(abstract_variables(model, batch, train=False))

  def joint(v, b):
    tokens, mask = model.apply(v, b['image'], b['image_mask'],
                               method=E2EVLP.joint_visual_tokens)
    return model.apply(v, b['text_ids'], b['text_mask'], tokens, mask, method=E2EVLP.joint)

  run = jax.jit(joint)
  out = run(variables, batch)
  assert out.shape == batch['text_ids'].shape + (model.config.d_model,)
  other = run(variables, dict(batch, image=batch['image'][::-1]))
  assert not np.allclose(out, other, atol=1e-4)


def test_shared_encoder_has_no_image_encoder(batch):
  abstract = abstract_variables(E2EVLP(tiny(share_encoder=True)), batch, train=False)
  assert 'image_encoder' not in abstract['params'] and 'encoder' in abstract['params']


def test_caption_is_causal(forward, variables, batch, outputs):
  t = 3
  changed = dict(batch, caption_in=batch['caption_in'].at[:, t].set(
      (batch['caption_in'][:, t] + 1) % 512))
  got = forward(variables, changed)
  np.testing.assert_allclose(np.asarray(got['caption_logits'])[:, :t],
                             np.asarray(outputs['caption_logits'])[:, :t], atol=1e-5, rtol=1e-5)
  assert not np.allclose(got['caption_logits'][:, t], outputs['caption_logits'][:, t],
                         atol=1e-4)
  assert_same(outputs, got, ('mlm_logits', 'itm_logits', 'det_boxes'))


def test_sine_position_embedding_matches_detr_formula():
  mask = np.zeros((1, 3, 4), bool)
  mask[0, :2, :3] = True
  num_feats = 8
  got = np.asarray(embeddings.sine_position_embedding(jnp.asarray(mask), num_feats))
  # DETR: cumulative counts over real cells, normalised by the last one, times 2*pi.
  eps, scale = 1e-6, 2 * math.pi
  y = mask.cumsum(1) / (mask.cumsum(1)[:, -1:, :] + eps) * scale
  x = mask.cumsum(2) / (mask.cumsum(2)[:, :, -1:] + eps) * scale
  k = np.arange(num_feats)
  freq = 10000.0 ** (2 * (k // 2) / num_feats)
  trig = lambda a: np.where(k % 2 == 0, np.sin(a[..., None] / freq), np.cos(a[..., None] / freq))
  np.testing.assert_allclose(got, np.concatenate([trig(y), trig(x)], -1), atol=1e-5)
  # Reference points use the same code: a point at the far edge of the real image
  # matches the last real cell.
  edge = embeddings.point_sine_embedding(jnp.array([1.0, 1.0]), num_feats)
  np.testing.assert_allclose(np.asarray(edge), got[0, 1, 2], atol=1e-4)


def decode_with_cache(model, variables, batch, with_full=False, beams=1):
  """Caption logits from init_caption_cache + caption_step: a 2-token prefill, then 1 by 1.

  with_full: also return the teacher-forced logits without caption padding.
  beams: hypotheses per image; hypothesis j of image b (row b * beams + j) decodes image
    b - j's caption, and `full` is computed with the memory tiled per hypothesis.
  """

  @jax.jit
  def run(variables, image, image_mask, caption):
    memory = model.apply(variables, image, image_mask, method=E2EVLP.encode_image)
    caption = jnp.stack([jnp.roll(caption, j, axis=0) for j in range(beams)], axis=1)
    caption = caption.reshape((-1,) + caption.shape[2:])
    tiled = [jnp.repeat(x, beams, axis=0) for x in memory]
    full = model.apply(variables, *tiled, caption, jnp.ones(caption.shape, bool),
                       method=E2EVLP.caption_logits) if with_full else None
    _, state = model.apply(variables, *memory, T, beams, method=E2EVLP.init_caption_cache,
                           mutable=['cache'])
    step = lambda cache, tokens: model.apply(
        {**variables, 'cache': cache}, tokens, method=E2EVLP.caption_step, mutable=['cache'])
    prefill, state = step(state['cache'], caption[:, :2])

    def one_token(cache, token):
      logits, state = step(cache, token[:, None])
      return state['cache'], logits[:, 0]

    cache, rest = jax.lax.scan(one_token, state['cache'], caption[:, 2:].T)
    return jnp.concatenate([prefill, rest.transpose(1, 0, 2)], axis=1), cache, full

  return run(variables, batch['image'], batch['image_mask'], batch['caption_in'])


def check_cache(cache, beams=1):
  """Positions advanced by T; self-attention caches a row per hypothesis, cross-attention
  caches a row per image."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]:
    name = jax.tree_util.keystr(path)
    if path[-1].key in ('cache_index', 'position_index'):
      assert int(leaf) == T
    else:
      rows = B if 'multihead_attn' in name else B * beams
      assert leaf.shape[0] == rows, name


def test_cached_decoding_matches_full_sequence(model, variables, batch, outputs):
  assert 'caption_decoder' in variables['params']  # tiny: a separate caption decoder
  stepped, cache, _ = decode_with_cache(model, variables, batch)
  # Decoding has no padding; the teacher-forced pass agrees on every real position.
  real = np.asarray(batch['caption_mask'])
  np.testing.assert_allclose(np.asarray(stepped)[real],
                             np.asarray(outputs['caption_logits'])[real], atol=1e-4, rtol=1e-4)
  check_cache(cache)


def test_cached_decoding_with_the_shared_decoder(batch):
  # Small stacks keep the compile short; the cache lives in the decoder.
  model = E2EVLP(tiny(share_decoder=True, encoder_layers=1, decoder_layers=2))
  variables = fill(abstract_variables(model, batch, train=False), seed=1)
  assert 'caption_decoder' not in variables['params']
  stepped, cache, full = decode_with_cache(model, variables, batch, with_full=True)
  np.testing.assert_allclose(np.asarray(stepped), np.asarray(full), atol=1e-4, rtol=1e-4)
  check_cache(cache)


def test_cached_decoding_shares_the_image_rows_across_beams(batch):
  """Three hypotheses per image, each with its own caption, against the teacher-forced
  logits with the memory tiled per hypothesis; the image's cross-attention keys and
  values are stored once."""
  model = E2EVLP(tiny(encoder_layers=1, decoder_layers=1, caption_decoder_layers=2))
  variables = fill(abstract_variables(model, batch, train=False), seed=2)
  stepped, cache, full = decode_with_cache(model, variables, batch, with_full=True, beams=3)
  assert stepped.shape == (B * 3, T, model.config.vocab_size)
  np.testing.assert_allclose(np.asarray(stepped), np.asarray(full), atol=1e-4, rtol=1e-4)
  check_cache(cache, beams=3)


@pytest.mark.parametrize('kind,query_rows', [('self', 6), ('cross', 5)])
def test_attention_rejects_queries_that_do_not_fold_onto_the_keys(kind, query_rows):
  """Only a cross-attention may take a multiple of its memory's rows as queries."""
  attention = transformer.Attention(num_heads=2, cache_kind=kind)
  q, kv = jnp.zeros((query_rows, 1, 8)), jnp.zeros((2, 3, 8))
  with pytest.raises(ValueError, match='multiple of its memory'):
    jax.eval_shape(functools.partial(attention.init, deterministic=True),
                   jax.random.key(0), q, kv, kv, None)


def test_caption_step_without_cache_raises(model, variables):
  with pytest.raises(ValueError, match='init_caption_cache'):
    jax.eval_shape(functools.partial(model.apply, method=E2EVLP.caption_step, mutable=['cache']),
                   variables, jnp.zeros((B, 1), jnp.int32))


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


BASE_BATCH = dict(batch=1, height=64, width=64, text_len=8, caption_len=8)


@pytest.fixture(scope='module')
def base_abstract():
  return abstract_variables(E2EVLP(pretrain.get_config('base').model), make_batch(**BASE_BATCH),
                            train=False)


@pytest.mark.parametrize('variant', ['tiny', 'base'])
def test_parameter_counts(variant, base_abstract):
  config = pretrain.get_config(variant).model
  abstract = nn.unbox(base_abstract if variant == 'base' else abstract_variables(
      E2EVLP(config), make_batch(**BASE_BATCH), train=False))
  params, stats = abstract['params'], abstract.get('batch_stats', {})  # none with GroupNorm
  d, f = config.d_model, config.mlp_dim
  bert_layer = 4 * (d * d + d) + 2 * (d * f) + f + d + 4 * d
  image_encoder = 'encoder' if config.share_encoder else 'image_encoder'
  assert _count(params[image_encoder]['layer_0']) == bert_layer
  assert _count(params[image_encoder]) == config.encoder_layers * bert_layer
  # DETR layer: two attentions, the FFN, three LayerNorms; plus the final LayerNorm.
  detr_layer = 8 * (d * d + d) + 2 * (d * f) + f + d + 6 * d
  assert _count(params['decoder']) == config.decoder_layers * detr_layer + 2 * d
  if config.joint_fusion == 'merged':  # the joint pass runs the (or a second) encoder
    assert _count(params['encoder']) == config.encoder_layers * bert_layer
  else:  # DETR layers over the text; no joint encoder
    assert _count(params['fusion']) == config.fusion_layers * detr_layer + 2 * d
    assert config.share_encoder or 'encoder' not in params
  text = (config.vocab_size + config.max_text_len + config.type_vocab_size) * d + 2 * d
  assert _count(params['embeddings']) == text
  backbone = _count(params['backbone']) + sum(
      math.prod(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(stats)[0]
      if p[-1].key in ('scale', 'bias'))
  if variant == 'base':
    assert backbone == 23_508_032  # torchvision ResNet-50 without fc
  total = _count(params)
  print(f'{variant}: {total:,} parameters ({backbone:,} in the backbone incl. frozen BN '
        'affine, which lives in batch_stats)')
  assert total > backbone


def test_init_on_one_cell_gives_the_full_size_variables(batch):
  """`init_inputs` shrinks images and masks to one feature cell (16 px at tiny); the
  initial values are the full-size init's, bit for bit."""
  config = tiny(encoder_layers=1, decoder_layers=1, caption_decoder_layers=1)
  model = E2EVLP(config)
  spec = {**batch, 'image_id': jnp.zeros((B,), jnp.int32), 'image0_mask': batch['image_mask']}
  small = e2e_vlp_module.init_inputs(config, spec)
  assert small['image'].shape == (B, 16, 16, 3) and small['image_mask'].shape == (B, 16, 16)
  assert small['image0_mask'].shape == (B, 16, 16) and small['image_id'].shape == (B,)
  assert small['text_ids'].shape == batch['text_ids'].shape and not small['text_ids'].any()
  del small['image_id'], small['image0_mask']
  init = jax.jit(lambda rng, inputs: model.init({'params': rng, 'dropout': rng}, inputs,
                                                train=False))
  full = init(jax.random.key(3), {k: jnp.zeros_like(v) for k, v in batch.items()})
  jax.tree.map(np.testing.assert_array_equal, full, init(jax.random.key(3), small))


def test_init_on_one_cell_gives_the_base_shapes(base_abstract):
  config = pretrain.get_config('base').model
  small = e2e_vlp_module.init_inputs(config, make_batch(**BASE_BATCH))
  assert small['image'].shape == (1, 32, 32, 3)
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(tree))
  assert shapes(abstract_variables(E2EVLP(config), small, train=False)) == shapes(
      base_abstract)


def test_base_forward_on_cpu(base_abstract):
  model = E2EVLP(pretrain.get_config('base').model)
  batch = make_batch(**BASE_BATCH)
  variables = fill(base_abstract)
  out = jax.jit(functools.partial(model.apply, train=False))(variables, batch)
  assert out['mlm_logits'].shape == (1, 8, 30522)
  assert out['det_boxes'].shape == (6, 1, 100, 4)
  assert out['visual_mask'].shape == (1, 4)  # 64 / 32 = 2 x 2 cells
  for key, value in out.items():
    assert np.isfinite(np.asarray(value)).all(), key


@pytest.mark.parametrize('change,message', [
    (dict(text_ids=jnp.zeros((B, 33), jnp.int32), text_mask=jnp.ones((B, 33), bool)),
     'max_text_len=32'),
    (dict(caption_in=jnp.zeros((B, 33), jnp.int32), caption_mask=jnp.ones((B, 33), bool)),
     'max_caption_len=32'),
    (dict(image=jnp.zeros((B, 8, 48, 3)), image_mask=jnp.ones((B, 8, 48), bool)),
     'at least 16x16'),
    (dict(image=jnp.zeros((B, 48, 48))), r'\[B, H, W, 3\]'),
    (dict(image=jnp.zeros((B, 48, 48, 3), jnp.uint8)), 'float pixels'),
    (dict(image_mask=jnp.ones((B, 48, 48), jnp.float32)), 'image_mask must be bool'),
    (dict(text_ids=jnp.zeros((B, L), jnp.float32)), 'text_ids must be integer'),
    (dict(text_mask=jnp.ones((B, L), jnp.int32)), 'mask of text_ids must be bool'),
])
def test_input_checks(model, variables, batch, change, message):
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(functools.partial(model.apply, train=False), variables, dict(batch, **change))


def test_every_parameter_has_logical_names(batch):
  for overrides in ({}, {'reference_points': False}):
    model = E2EVLP(tiny(**overrides))
    abstract = abstract_variables(model, batch, train=False)
    leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
      assert len(leaf.names) == leaf.value.ndim, leaf.names
      for strategy in sharding.STRATEGIES:
        spec = nn.logical_to_mesh_axes(leaf.names, sharding.logical_axis_rules(strategy))
        used = [a for axes in spec if axes for a in (axes if isinstance(axes, tuple) else (axes,))]
        assert len(used) == len(set(used)), (leaf.names, strategy)


def test_finetune_heads_create_only_what_they_use(batch):
  model = E2EVLP(tiny(num_answers=10))
  vqa = abstract_variables(model, batch, train=False, method=E2EVLP.vqa_logits)
  # tiny's joint pass: fusion layers (joint_fusion='cross_attention') over the image
  # encoder's output (joint_visual='image_encoder').
  assert set(vqa['params']) == {'backbone', 'embeddings', 'visual_embeddings', 'fusion',
                                'image_encoder', 'pooler', 'vqa_head'}
  assert jax.eval_shape(functools.partial(model.apply, method=E2EVLP.vqa_logits), vqa,
                        batch).shape == (B, 10)
  pair = dict(text_ids=batch['text_ids'], text_mask=batch['text_mask'],
              image0=batch['image'], image0_mask=batch['image_mask'],
              image1=batch['image'][::-1], image1_mask=batch['image_mask'][::-1])
  nlvr2 = abstract_variables(model, pair, method=E2EVLP.nlvr2_logits)
  assert 'nlvr2_head' in nlvr2['params'] and 'decoder' not in nlvr2['params']
  assert nlvr2['params']['nlvr2_head']['dense_0']['kernel'].value.shape == (256, 256)
  out = jax.eval_shape(functools.partial(model.apply, method=E2EVLP.nlvr2_logits), nlvr2, pair)
  assert out.shape == (B, 2)
  with pytest.raises(ValueError, match='num_answers'):
    abstract_variables(E2EVLP(tiny()), batch, method=E2EVLP.vqa_logits)


def test_itm_score_is_the_itm_log_odds(model, variables, batch, outputs):
  score = jax.jit(functools.partial(model.apply, method=E2EVLP.itm_score))(variables, batch)
  logits = np.asarray(outputs['itm_logits'])
  np.testing.assert_allclose(np.asarray(score), logits[:, 1] - logits[:, 0], atol=1e-5)


def test_reference_point_boxes_start_small_at_their_points():
  queries = embeddings.QueryEmbeddings(num_queries=64, d_model=32, reference_points=True)
  head = heads.DetectionHead(num_classes=3, num_attributes=2, box_layers=3,
                             reference_points=True)

  @jax.jit
  def run(key):
    k1, k2, k3 = jax.random.split(key, 3)
    pos, points = queries.apply(queries.init(k1))
    hidden = jax.random.normal(k2, (2, 3, 64, 32))
    return pos, points, head.apply(head.init(k3, hidden, points), hidden, points)['det_boxes']

  pos, points, boxes = map(np.asarray, run(jax.random.key(0)))
  assert pos.shape == (64, 32) and points.shape == (64, 2)
  assert points.min() < 0.1 and points.max() > 0.9  # spread over the image
  np.testing.assert_allclose(boxes[..., :2], np.broadcast_to(points, boxes[..., :2].shape),
                             atol=1e-5)
  np.testing.assert_allclose(boxes[..., 2:], heads.INIT_BOX_SIZE, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits(batch):
  model = E2EVLP(tiny(dtype='bfloat16'))
  abstract = abstract_variables(model, batch, train=False)
  assert {x.dtype for x in jax.tree.leaves(nn.unbox(abstract))} == {jnp.dtype('float32')}
  out = jax.eval_shape(functools.partial(model.apply, train=False), abstract, batch)
  assert all(v.dtype in (jnp.float32, jnp.bool_) for v in out.values())


def _small_encoder(**kwargs) -> transformer.Encoder:
  return transformer.Encoder(num_layers=1, d_model=16, num_heads=2, mlp_dim=32, epsilon=1e-12,
                             **kwargs)


def test_dropout_only_when_training():
  encoder = _small_encoder(dropout=0.1, attention_dropout=0.1)
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  mask = jnp.ones((2, 5), bool)
  v = fill(abstract_variables(encoder, x, mask, deterministic=True))

  @jax.jit
  def run(v):
    # 'rbg' keys: threefry dropout masks cost seconds of XLA-CPU compile time.
    train = lambda seed: encoder.apply(v, x, mask, deterministic=False,
                                       rngs={'dropout': jax.random.key(seed, impl='rbg')})
    return train(0), train(1), encoder.apply(v, x, mask, deterministic=True)

  train_a, train_b, evaluation = run(v)
  assert not np.allclose(train_a, train_b)
  no_dropout = _small_encoder(dropout=0.0, attention_dropout=0.0)
  np.testing.assert_allclose(
      evaluation, jax.jit(no_dropout.apply, static_argnames='deterministic')(
          v, x, mask, deterministic=False), atol=1e-6)


class _BertParts(nn.Module):
  """The E2EVLP submodules a BERT checkpoint initialises, under the same names."""
  vocab: int
  max_len: int

  def setup(self):
    self.embeddings = embeddings.TextEmbeddings(self.vocab, self.max_len, 2, 32, 1e-12, 0.0)
    self.encoder = transformer.Encoder(2, 32, 4, 64, 1e-12, 0.0, 0.0)
    self.pooler = heads.Pooler()
    self.mlm_head = heads.TiedLMHead(self.vocab, 1e-12)

  def __call__(self, ids, mask):
    hidden = self.encoder(self.embeddings(ids, train=False), mask, deterministic=True)
    return hidden, self.pooler(hidden), self.mlm_head(hidden, self.embeddings.attend)


def bert_to_flax(state_dict, abstract_params) -> dict:
  """HF BERT names -> ours: '.'->'/', layer.{i}->layer_{i}, Linear [out, in] -> [in, ...]."""
  params = {}
  for key, value in state_dict.items():
    key = key.removeprefix('bert.').replace('cls.predictions.', 'mlm_head.')
    key = re.sub(r'encoder\.layer\.(\d+)', r'encoder.layer_\1', key)
    *path, leaf = key.split('.')
    if path[-1] in ('decoder', 'seq_relationship'):
      continue  # tied to the word embeddings / the NSP head (our ITM head)
    value = value.detach().numpy()
    if leaf == 'weight':
      is_table = path[-1].endswith('_embeddings')
      leaf = 'embedding' if is_table else 'scale' if value.ndim == 1 else 'kernel'
      value = value if is_table or value.ndim == 1 else value.T
    node, target = params, abstract_params
    for name in path:
      node, target = node.setdefault(name, {}), target[name]
    node[leaf] = jnp.asarray(value.reshape(target[leaf].shape))
  return params


def test_bert_weights_import_exactly():
  transformers = pytest.importorskip('transformers')
  torch = pytest.importorskip('torch')
  config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=16)
  torch.manual_seed(0)
  bert = transformers.BertForPreTraining(config).eval()
  ids = np.random.default_rng(0).integers(0, 50, (2, 7))
  mask = np.array([[1] * 7, [1] * 4 + [0] * 3])
  with torch.no_grad():
    ref = bert.bert(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    ref_logits = bert.cls.predictions(ref.last_hidden_state)
  module = _BertParts(50, 16)
  abstract = nn.unbox(abstract_variables(module, jnp.asarray(ids), jnp.asarray(mask, bool)))
  params = bert_to_flax(bert.state_dict(), abstract['params'])
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(lambda x: x.shape, abstract['params'])
  hidden, pooled, logits = jax.jit(module.apply)({'params': params}, ids, mask.astype(bool))
  for got, want in ((hidden, ref.last_hidden_state), (pooled, ref.pooler_output),
                    (logits, ref_logits)):
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4, rtol=1e-4)


def test_remat_model_traces_forward_and_backward(batch, variables):
  model = E2EVLP(tiny(remat=True))
  abstract = nn.unbox(abstract_variables(model, batch, train=False))
  same_shapes = jax.tree.map(lambda x: x.shape, variables)
  assert jax.tree.map(lambda x: x.shape, abstract) == same_shapes  # remat renames nothing
  loss = lambda p, stats: sum(jnp.sum(v) for k, v in model.apply(
      {'params': p, 'batch_stats': stats}, batch, train=False).items() if k != 'visual_mask')
  grads = jax.eval_shape(jax.grad(loss), abstract['params'], abstract.get('batch_stats', {}))
  assert jax.tree.map(lambda x: x.shape, grads) == jax.tree.map(lambda x: x.shape,
                                                                abstract['params'])
