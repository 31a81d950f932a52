"""Weight conversion between the JAX model and PyTorch / Hugging Face layouts.

One naming rule links the two worlds: a JAX variable path maps to the key of the
PyTorch mirror (modeling_e2e_vlp.py) by renaming segments (`layer1_0` -> `layer1.0`,
`layer_3` -> `layer.3`, `layers_2` -> `layers.2`, `downsample_conv` -> `downsample.0`)
and leaves (`kernel`/`embedding`/`scale` -> `weight`, `mean` -> `running_mean`), and
each tensor by its kind: conv HWIO -> OIHW, dense [in, out] -> [out, in], attention
q/k/v [D, H, K] -> [H*K, D], attention output [H, K, D] -> [D, H*K], bias [H, K] -> [H*K].
Because the mirror uses torchvision ResNet and HF BERT names, a torchvision state dict,
a HF `ResNetModel` or a HF BERT maps onto it by renaming keys only.

Everything here works on numpy arrays: exporting needs numpy and safetensors (plus
transformers, not torch, for config.json); torch is imported only to read `.bin` /
`.pth` files.
"""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from e2e_vlp.models.e2e_vlp import E2EVLP, init_inputs

Variables = Mapping[str, Any]  # {'params': ..., 'batch_stats': ...} of arrays or shapes
StateDict = dict[str, np.ndarray]

HF_FILES = ('configuration_e2e_vlp.py', 'modeling_e2e_vlp.py')
WEIGHTS_NAME = 'model.safetensors'
AUTO_MAP = {'AutoConfig': 'configuration_e2e_vlp.E2EVLPConfig',
            'AutoModel': 'modeling_e2e_vlp.E2EVLPModel'}
# The order in which e2e_vlp.data.tokenizer.Tokenizer picks caption [BOS]/[EOS] tokens.
_BOS_EOS_CHOICES = (('[BOS]', '[EOS]'), ('[unused0]', '[unused1]'), ('[CLS]', '[SEP]'))
_REQUIRED_SPECIALS = {'pad_token': '[PAD]', 'unk_token': '[UNK]', 'cls_token': '[CLS]',
                      'sep_token': '[SEP]', 'mask_token': '[MASK]'}

_SEGMENTS = ((re.compile(r'^layer(\d+)_(\d+)$'), r'layer\1.\2'),  # ResNet blocks
             (re.compile(r'^layer_(\d+)$'), r'layer.\1'),  # BERT encoder layers
             (re.compile(r'^layers_(\d+)$'), r'layers.\1'),  # decoder layers, MLPs
             (re.compile(r'^downsample_conv$'), 'downsample.0'),
             (re.compile(r'^downsample_bn$'), 'downsample.1'))
_LEAVES = {'kernel': 'weight', 'embedding': 'weight', 'scale': 'weight',
           'mean': 'running_mean', 'var': 'running_var'}


# ---- names and tensor layouts -----------------------------------------------------------


def torch_key(path: tuple[str, ...]) -> str:
  """JAX variable path (without the collection) -> PyTorch mirror state-dict key."""
  parts = []
  for segment in path[:-1]:
    for pattern, repl in _SEGMENTS:
      if pattern.match(segment):
        segment = pattern.sub(repl, segment)
        break
    parts.append(segment)
  parts.append(_LEAVES.get(path[-1], path[-1]))
  return '.'.join(parts)


def _kind(path: tuple[str, ...], ndim: int) -> str:
  leaf = path[-1]
  if leaf == 'kernel':
    if ndim == 4:
      return 'conv'
    if ndim == 3:
      return 'split_heads' if path[-2] in ('query', 'key', 'value') else 'merge_heads'
    return 'dense'
  if leaf == 'bias' and ndim == 2:
    return 'head_bias'
  return 'same'


def _torch_shape(kind: str, s: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of a JAX variable of shape `s`."""
  if kind == 'conv':
    return (s[3], s[2], s[0], s[1])
  if kind == 'dense':
    return (s[1], s[0])
  if kind == 'split_heads':
    return (s[1] * s[2], s[0])
  if kind == 'merge_heads':
    return (s[2], s[0] * s[1])
  if kind == 'head_bias':
    return (s[0] * s[1],)
  return s


def _to_torch(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == 'conv':
    x = x.transpose(3, 2, 0, 1)
  elif kind == 'dense':
    x = x.T
  elif kind == 'split_heads':
    x = x.reshape(x.shape[0], -1).T
  elif kind == 'merge_heads':
    x = x.reshape(-1, x.shape[-1]).T
  elif kind == 'head_bias':
    x = x.reshape(-1)
  return np.ascontiguousarray(x)


def _from_torch(kind: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if kind == 'conv':
    x = x.transpose(2, 3, 1, 0)
  elif kind in ('dense', 'split_heads', 'merge_heads'):
    x = x.T
  return np.ascontiguousarray(x.reshape(shape))


def _flat(variables: Variables) -> dict[tuple[str, ...], Any]:
  """{(collection, *path): leaf} over every collection."""
  return traverse_util.flatten_dict(
      {k: dict(v) if isinstance(v, Mapping) else v for k, v in variables.items()})


def params_to_torch_state_dict(variables: Variables) -> StateDict:
  """JAX variables {'params': ..., 'batch_stats': ...} -> mirror state dict (float32 numpy)."""
  out = {}
  for (collection, *path), value in _flat(variables).items():
    path = tuple(path)
    key = torch_key(path)
    if key in out:
      raise ValueError(f'Two JAX variables map to the PyTorch key {key!r} (one in '
                       f'{collection!r}); the naming rule cannot tell them apart.')
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.floating):
      value = value.astype(np.float32)
    out[key] = _to_torch(_kind(path, value.ndim), value)
  return out


@dataclasses.dataclass
class Conversion:
  """A (possibly partial) JAX variables tree and what did not match.

  Attributes:
    variables: {'params': ..., 'batch_stats': ...} holding only the converted leaves.
    missing: '/'-joined JAX paths (collection first) that had no tensor.
    unused: state-dict keys that matched no JAX variable.
    notes: what the conversion adapted (e.g. a position table cut to size).
  """
  variables: dict[str, Any]
  missing: list[str]
  unused: list[str]
  notes: list[str] = dataclasses.field(default_factory=list)

  def covered(self) -> list[str]:
    return sorted('/'.join(k) for k in _flat(self.variables))


def torch_state_dict_to_params(state_dict: Mapping[str, Any], like: Variables) -> Conversion:
  """Mirror state dict -> JAX variables shaped like `like` (arrays or ShapeDtypeStructs).

  Raises:
    ValueError: a tensor whose shape does not fit its JAX variable (named, both shapes).
  """
  converted, missing, used = {}, [], set()
  for (collection, *path), target in _flat(like).items():
    path = tuple(path)
    key = torch_key(path)
    shape = tuple(target.shape)
    if key not in state_dict:
      missing.append('/'.join((collection,) + path))
      continue
    value = _numpy(state_dict[key])
    kind = _kind(path, len(shape))
    if tuple(value.shape) != _torch_shape(kind, shape):
      raise ValueError(
          f'Tensor {key!r} has shape {tuple(value.shape)}, but the model config needs '
          f'{_torch_shape(kind, shape)} for {collection}/{"/".join(path)} (JAX shape '
          f'{shape}); the weights come from a differently sized model.')
    converted[(collection,) + path] = _from_torch(kind, value, shape)
    used.add(key)
  return Conversion(traverse_util.unflatten_dict(converted), missing,
                    sorted(set(state_dict) - used))


def _numpy(value: Any) -> np.ndarray:
  """numpy array of a numpy array or a torch tensor (float types as float32)."""
  if hasattr(value, 'detach'):  # a torch tensor; bfloat16 has no numpy dtype
    value = value.detach().cpu()
    value = (value.float() if value.is_floating_point() else value).numpy()
  value = np.asarray(value)
  return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


# ---- the JAX model ----------------------------------------------------------------------


def abstract_variables(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Shapes of every variable the model can have: pre-training, NLVR2 and (if
  `num_answers` > 0) VQA heads; {'params': ..., 'batch_stats': ...} of ShapeDtypeStructs."""
  image = jax.ShapeDtypeStruct((1, 1, 1, 3), jnp.float32)  # init_inputs sizes the images
  mask = jax.ShapeDtypeStruct((1, 1, 1), jnp.bool_)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  token_mask = jax.ShapeDtypeStruct((1, 1), jnp.bool_)
  batch = init_inputs(model_config, {
      'image': image, 'image_mask': mask, 'text_ids': tokens, 'text_mask': token_mask,
      'caption_in': tokens, 'caption_mask': token_mask, 'image0': image, 'image0_mask': mask,
      'image1': image, 'image1_mask': mask})
  vqa = model_config.get('num_answers', 0) > 0

  def every_head(module: E2EVLP, batch):
    module(batch, train=False)
    module.nlvr2_logits(batch)
    if vqa:
      module.vqa_logits(batch)

  def init(rng, batch):
    return nn.meta.unbox(E2EVLP(model_config).init(rng, batch, method=every_head))

  return jax.eval_shape(init, jax.random.key(0), batch)


def text_hidden_states(module: E2EVLP, text_ids: jnp.ndarray, text_mask: jnp.ndarray
                       ) -> jnp.ndarray:
  """Text-only encoder pass, a BERT: `model.apply(v, ids, mask, method=text_hidden_states)`.

  Args:
    text_ids: [B, L] int; text_mask: [B, L] bool.

  Returns:
    [B, L, D] hidden states of the last encoder layer.
  """
  return module.encoder(module.embeddings(text_ids, train=False), text_mask,
                        deterministic=True)


def check_variables(variables: Variables, model_config: ml_collections.ConfigDict
                    ) -> list[str]:
  """Checks a checkpoint against the config; returns the components it holds.

  A component (top-level module such as 'decoder') may be absent (a fine-tune without
  it), but one that is present must match the config leaf for leaf.

  Raises:
    ValueError: unknown components, missing or extra leaves, or wrong shapes (listed).
  """
  expected = {k: tuple(v.shape) for k, v in _flat(abstract_variables(model_config)).items()}
  got = {k: tuple(np.shape(v)) for k, v in _flat(variables).items()}
  known = {k[1] for k in expected}
  components = sorted({k[1] for k in got})
  problems = [f'unknown module {c!r}' for c in components if c not in known]
  for key in sorted(set(expected) | set(got)):
    name = '/'.join(key)
    if key[1] not in components or key[1] not in known:
      continue
    if key not in got:
      problems.append(f'{name} missing')
    elif key not in expected:
      problems.append(f'{name} not in the model')
    elif got[key] != expected[key]:
      problems.append(f'{name} has shape {got[key]}, the config gives {expected[key]}')
  if problems:
    shown = '; '.join(problems[:8]) + (f'; ... ({len(problems)} in all)'
                                       if len(problems) > 8 else '')
    raise ValueError('The checkpoint does not match the model config: ' + shown + '. Use the '
                     "config the checkpoint was trained with (the workdir's config.json).")
  return components


# ---- Hugging Face folder ----------------------------------------------------------------


def read_vocab(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Vocabulary file {path} does not exist.')
  with open(path, encoding='utf-8') as f:
    return [line.rstrip('\n') for line in f]


def special_tokens(vocab: list[str]) -> dict[str, str]:
  """BertTokenizer special tokens with the ids `e2e_vlp.data.tokenizer.Tokenizer` uses."""
  present = set(vocab)
  missing = [t for t in _REQUIRED_SPECIALS.values() if t not in present]
  if missing:
    raise ValueError(f'The vocabulary lacks the special tokens {missing}.')
  tokens = dict(_REQUIRED_SPECIALS)
  for bos, eos in _BOS_EOS_CHOICES:
    if bos in present and eos in present:
      tokens.update(bos_token=bos, eos_token=eos)
      break
  return tokens


def token_ids(vocab: list[str], tokens: Mapping[str, str]) -> dict[str, int]:
  """{'pad_token_id': ..., ...}; the last occurrence of a duplicate wins, as in BERT."""
  index = {tok: i for i, tok in enumerate(vocab)}
  return {f'{name}_id': index[tok] for name, tok in tokens.items()}


_MODEL_FIELDS = ('vocab_size', 'd_model', 'num_heads', 'mlp_dim', 'encoder_layers',
                 'decoder_layers', 'caption_decoder_layers', 'share_decoder', 'share_encoder',
                 'joint_visual', 'joint_fusion', 'fusion_layers', 'dropout',
                 'attention_dropout', 'num_queries', 'max_text_len', 'max_caption_len',
                 'type_vocab_size', 'layer_norm_eps', 'decoder_layer_norm_eps', 'num_classes',
                 'num_attributes', 'box_head_layers', 'reference_points', 'cell_class_head',
                 'num_answers')
_BACKBONE_FIELDS = ('block', 'stage_sizes', 'width', 'stem', 'dilation', 'norm')
# How the JAX model computes, not what: the PyTorch mirror runs float32 without remat.
_COMPUTE_ONLY = ('dtype', 'remat')
_BACKBONE_COMPUTE_ONLY = ('stem_conv', 'max_pool', 'pointwise_conv', 'relu')


def check_known_fields(model_config: ml_collections.ConfigDict):
  """Raises ValueError for a `config.model` field the PyTorch mirror does not know: it
  would silently compute something else (extend modeling_e2e_vlp.py and _MODEL_FIELDS)."""
  m, b = model_config, model_config.backbone
  unknown = sorted(set(m.keys()) - set(_MODEL_FIELDS) - set(_COMPUTE_ONLY) - {'backbone'})
  unknown += sorted(f'backbone.{k}' for k in set(b.keys()) - set(_BACKBONE_FIELDS)
                     - set(_BACKBONE_COMPUTE_ONLY))
  if unknown:
    raise ValueError(f'config.model has {unknown}, which the PyTorch mirror does not '
                     'implement; extend e2e_vlp/hf/modeling_e2e_vlp.py and '
                     'convert._MODEL_FIELDS before exporting.')


def hf_config_kwargs(model_config: ml_collections.ConfigDict, components: list[str],
                     ids: Mapping[str, int]) -> dict[str, Any]:
  """E2EVLPConfig fields from `config.model` (flattened), components and token ids."""
  check_known_fields(model_config)
  m, b = model_config, model_config.backbone
  kwargs = {f: m.get(f) for f in _MODEL_FIELDS}
  kwargs['num_answers'] = m.get('num_answers', 0)
  if m.get('decoder_layer_norm_eps') is None:  # configs from before the decoder eps
    kwargs['decoder_layer_norm_eps'] = m.layer_norm_eps
  for field, paper_value in (('share_encoder', True), ('joint_visual', 'grid'),
                             ('joint_fusion', 'merged'), ('fusion_layers', 6)):
    if m.get(field) is None:  # configs from before the field
      kwargs[field] = paper_value
  kwargs.update({f'backbone_{k}': b[k] for k in _BACKBONE_FIELDS})
  kwargs['backbone_stage_sizes'] = [int(n) for n in b.stage_sizes]
  kwargs.update(components=list(components), pad_token_id=ids.get('pad_token_id', 0),
                bos_token_id=ids.get('bos_token_id'), eos_token_id=ids.get('eos_token_id'))
  return kwargs


def write_tokenizer(vocab_path: str, out_dir: str, max_len: int) -> dict[str, int]:
  """vocab.txt + tokenizer_config.json + special_tokens_map.json for BertTokenizer."""
  vocab = read_vocab(vocab_path)
  tokens = special_tokens(vocab)
  shutil.copyfile(vocab_path, os.path.join(out_dir, 'vocab.txt'))
  config = {'tokenizer_class': 'BertTokenizer', 'do_lower_case': True,
            'tokenize_chinese_chars': True, 'strip_accents': None,
            'model_max_length': max_len, **tokens}
  for name, content in (('tokenizer_config.json', config),
                        ('special_tokens_map.json', tokens)):
    with open(os.path.join(out_dir, name), 'w', encoding='utf-8') as f:
      json.dump(content, f, indent=2)
  return token_ids(vocab, tokens)


def write_hf_folder(variables: Variables, model_config: ml_collections.ConfigDict,
                    out_dir: str, vocab_path: str | None) -> list[str]:
  """Writes a `trust_remote_code` Hugging Face folder into an existing empty `out_dir`.

  Files: model.safetensors, config.json (with auto_map), configuration_e2e_vlp.py,
  modeling_e2e_vlp.py and, with a vocabulary, the BertTokenizer files. Returns the
  components written. Needs transformers (for config.json), not torch.
  """
  check_known_fields(model_config)
  components = check_variables(variables, model_config)
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(params_to_torch_state_dict(variables), os.path.join(out_dir, WEIGHTS_NAME),
            metadata={'format': 'pt'})
  ids = {}
  if vocab_path:
    vocab_size = len(read_vocab(vocab_path))
    if vocab_size > model_config.vocab_size:
      raise ValueError(f'{vocab_path} has {vocab_size} tokens, more than config.model.'
                       f'vocab_size={model_config.vocab_size}; it is not this model\'s.')
    ids = write_tokenizer(vocab_path, out_dir, model_config.max_text_len)
  from e2e_vlp.hf.configuration_e2e_vlp import E2EVLPConfig  # pylint: disable=g-import-not-at-top
  config = E2EVLPConfig(**hf_config_kwargs(model_config, components, ids))
  config.architectures = ['E2EVLPModel']
  config.auto_map = dict(AUTO_MAP)
  config.save_pretrained(out_dir)
  here = os.path.dirname(os.path.abspath(__file__))
  for name in HF_FILES:
    shutil.copyfile(os.path.join(here, name), os.path.join(out_dir, name))
  return components


@contextlib.contextmanager
def atomic_output_dir(out: str, *, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary sibling of `out`, renamed to `out` only if the body succeeds.

  Raises:
    FileExistsError: `out` exists and is not empty, and `overwrite` is False.
  """
  out = os.path.abspath(out)
  if os.path.exists(out) and os.listdir(out) and not overwrite:
    raise FileExistsError(f'{out} exists and is not empty; choose another output folder or '
                          'pass --overwrite.')
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(out)}.tmp-')
  try:
    yield tmp
    if os.path.exists(out):
      shutil.rmtree(out)
    os.rename(tmp, out)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


# ---- reading PyTorch / Hugging Face weights ---------------------------------------------


def load_torch_weights(path: str) -> StateDict:
  """A state dict as numpy arrays from a folder or a file.

  A folder holds model.safetensors, model.safetensors.index.json (shards) or
  pytorch_model.bin; a file is .safetensors or a torch pickle (.bin/.pth/.pt, possibly
  wrapping the state dict in 'model' or 'state_dict').
  """
  if os.path.isdir(path):
    for name in (WEIGHTS_NAME, 'model.safetensors.index.json', 'pytorch_model.bin'):
      if os.path.isfile(os.path.join(path, name)):
        return load_torch_weights(os.path.join(path, name))
    raise FileNotFoundError(f'{path} has no model.safetensors, model.safetensors.index.json '
                            'or pytorch_model.bin.')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Weights file {path} does not exist.')
  if path.endswith('.index.json'):
    with open(path, encoding='utf-8') as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    out = {}
    for shard in shards:
      out.update(load_torch_weights(os.path.join(os.path.dirname(path), shard)))
    return out
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return {k: _numpy(v) for k, v in load_file(path).items()}
  import torch  # pylint: disable=g-import-not-at-top
  state = torch.load(path, map_location='cpu', weights_only=True)
  for wrapper in ('model', 'state_dict'):
    if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
      state = state[wrapper]
  if not isinstance(state, dict):
    raise ValueError(f'{path} does not hold a state dict (got {type(state).__name__}).')
  return {k: _numpy(v) for k, v in state.items() if hasattr(v, 'shape')}


def _read_config(folder: str, what: str) -> dict[str, Any]:
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing: {folder} is not a Hugging Face {what} folder.')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _subset(like: Variables, component: str) -> dict[str, Any]:
  return {c: {component: tree[component]} for c, tree in like.items() if component in tree}


# ---- BERT -------------------------------------------------------------------------------

_BERT_PARTS = ('embeddings', 'encoder', 'pooler', 'mlm_head')
_BERT_BUFFERS = ('embeddings.position_ids', 'embeddings.token_type_ids')  # not weights
_BERT_UNUSED = re.compile(r'^cls\.(predictions\.decoder|seq_relationship)\.')  # tied / NSP


def bert_to_params(folder: str, model_config: ml_collections.ConfigDict, *,
                   like: Variables | None = None) -> Conversion:
  """Text embeddings, encoder layers, pooler and MLM head from a HF BERT folder.

  The folder holds config.json, the weights and vocab.txt (the tokenizer must be the
  one the embeddings were trained with). A longer position table is cut to
  config.model.max_text_len rows; extra BERT layers are dropped (both noted). `like`:
  `abstract_variables(model_config)` if already computed.

  Raises:
    FileNotFoundError: a missing file. ValueError: an architecture mismatch (named).
  """
  cfg = _read_config(folder, 'BERT')
  m = model_config
  if cfg.get('model_type', 'bert') not in ('bert',):
    raise ValueError(f'{folder} holds a {cfg.get("model_type")!r} model, not a BERT.')
  checks = {'hidden_size': 'd_model', 'num_attention_heads': 'num_heads',
            'intermediate_size': 'mlp_dim', 'vocab_size': 'vocab_size',
            'type_vocab_size': 'type_vocab_size'}
  for hf_name, our_name in checks.items():
    if cfg.get(hf_name) != m[our_name]:
      raise ValueError(f'The BERT in {folder} has {hf_name}={cfg.get(hf_name)} but '
                       f'config.model.{our_name}={m[our_name]}; set it to match the BERT.')
  if cfg.get('hidden_act', 'gelu') != 'gelu':
    raise ValueError(f'The BERT in {folder} uses hidden_act={cfg["hidden_act"]!r}; the '
                     'encoder uses exact GELU ("gelu").')
  if cfg.get('position_embedding_type', 'absolute') != 'absolute':
    raise ValueError(f'The BERT in {folder} uses {cfg["position_embedding_type"]!r} '
                     'position embeddings; only absolute ones import.')
  if cfg.get('max_position_embeddings', 0) < m.max_text_len:
    raise ValueError(f'The BERT in {folder} has {cfg.get("max_position_embeddings")} '
                     f'positions, fewer than config.model.max_text_len={m.max_text_len}.')
  vocab = os.path.join(folder, 'vocab.txt')
  if not os.path.isfile(vocab):
    raise FileNotFoundError(f'{vocab} is missing; the BERT embeddings need their vocabulary.')
  notes = []
  if cfg.get('layer_norm_eps', 1e-12) != m.layer_norm_eps:
    notes.append(f'BERT layer_norm_eps={cfg.get("layer_norm_eps")} differs from '
                 f'config.model.layer_norm_eps={m.layer_norm_eps} (the config is used)')
  state, ignored = {}, []
  for key, value in load_torch_weights(folder).items():
    name = key[len('bert.'):] if key.startswith('bert.') else key
    name = name.replace('LayerNorm.gamma', 'LayerNorm.weight').replace(
        'LayerNorm.beta', 'LayerNorm.bias')
    name = re.sub(r'^cls\.predictions\.transform\.', 'mlm_head.transform.', name)
    name = 'mlm_head.bias' if name == 'cls.predictions.bias' else name
    if name in _BERT_BUFFERS:
      continue
    layer = re.match(r'^encoder\.layer\.(\d+)\.', name)
    if _BERT_UNUSED.match(name) or (layer and int(layer.group(1)) >= m.encoder_layers):
      ignored.append(key)
      continue
    state[name] = value
  table = state.get('embeddings.position_embeddings.weight')
  if table is not None and table.shape[0] > m.max_text_len:
    state['embeddings.position_embeddings.weight'] = table[:m.max_text_len]
    notes.append(f'position table cut from {table.shape[0]} to {m.max_text_len} rows')
  num_layers = cfg.get('num_hidden_layers', 0)
  if num_layers != m.encoder_layers:
    notes.append(f'BERT has {num_layers} layers, the encoder {m.encoder_layers}: '
                 f'{min(num_layers, m.encoder_layers)} imported')
  like = like if like is not None else abstract_variables(m)
  text_like = {}
  for part in _BERT_PARTS:
    for collection, tree in _subset(like, part).items():
      text_like.setdefault(collection, {}).update(tree)
  result = torch_state_dict_to_params(state, text_like)
  result.unused += ignored
  result.notes = notes
  return result


# ---- ResNet -----------------------------------------------------------------------------


def _hf_resnet_key(key: str) -> str | None:
  """HF ResNetModel key (prefix stripped) -> torchvision key, None if not the backbone's."""
  match = re.match(r'^embedder\.embedder\.(convolution|normalization)\.(.+)$', key)
  if match:
    return ('conv1.' if match.group(1) == 'convolution' else 'bn1.') + match.group(2)
  match = re.match(r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)$', key)
  if not match:
    return None
  block = f'layer{int(match.group(1)) + 1}.{match.group(2)}.'
  rest = match.group(3)
  short = re.match(r'^shortcut\.(convolution|normalization)\.(.+)$', rest)
  if short:
    return block + ('downsample.0.' if short.group(1) == 'convolution'
                    else 'downsample.1.') + short.group(2)
  conv = re.match(r'^layer\.(\d+)\.(convolution|normalization)\.(.+)$', rest)
  if conv:
    k = int(conv.group(1)) + 1
    return block + (f'conv{k}.' if conv.group(2) == 'convolution' else f'bn{k}.') + conv.group(3)
  return None


def _check_hf_resnet_config(cfg: Mapping[str, Any], b: ml_collections.ConfigDict, where: str):
  expansion = 4 if b.block == 'bottleneck' else 1
  widths = [b.width * 2 ** i * expansion for i in range(len(b.stage_sizes))]
  checks = (('layer_type', cfg.get('layer_type'), b.block, 'block'),
            ('depths', list(cfg.get('depths', [])), list(b.stage_sizes), 'stage_sizes'),
            ('embedding_size', cfg.get('embedding_size'), b.width, 'width'),
            ('hidden_sizes', list(cfg.get('hidden_sizes', [])), widths, 'width'))
  for name, theirs, ours, our_name in checks:
    if theirs != ours:
      raise ValueError(f'The ResNet in {where} has {name}={theirs}, but config.model.backbone.'
                       f'{our_name} gives {ours}; configure the backbone to match it.')
  for flag in ('downsample_in_first_stage', 'downsample_in_bottleneck'):
    if cfg.get(flag):
      raise ValueError(f'The ResNet in {where} sets {flag}=True; only the torchvision '
                       'layout (stride on the 3x3 conv, none in stage 1) imports.')
  if cfg.get('hidden_act', 'relu') != 'relu':
    raise ValueError(f'The ResNet in {where} uses {cfg["hidden_act"]!r}, not ReLU.')


def resnet_to_params(source: str, model_config: ml_collections.ConfigDict, *,
                     like: Variables | None = None) -> Conversion:
  """Backbone weights (and frozen BatchNorm statistics) from a ResNet.

  Args:
    source: a HF `ResNetModel` / `ResNetForImageClassification` folder (config.json +
      weights), or a torchvision ResNet state-dict file (.pth; DETR-style prefixes such
      as `backbone.0.body.` are found and stripped).
    model_config: config.model; its backbone must have the same block, stage sizes and
      width, and the ImageNet stem.
    like: `abstract_variables(model_config)` if already computed.

  Raises:
    FileNotFoundError: a missing file. ValueError: an architecture mismatch (named).
  """
  b = model_config.backbone
  if b.norm not in ('frozen_bn', 'batch_norm'):
    raise ValueError(f"config.model.backbone.norm={b.norm!r}, but ResNet weights come with "
                     "BatchNorm statistics; set norm='frozen_bn' (or 'batch_norm').")
  if b.stem != 'imagenet':
    raise ValueError(f"config.model.backbone.stem={b.stem!r}, but ResNet weights have the "
                     "ImageNet stem (7x7 conv + max-pool); set stem='imagenet'.")
  if os.path.isdir(source):
    _check_hf_resnet_config(_read_config(source, 'ResNet'), b, source)
  weights = load_torch_weights(source)
  state, ignored = {}, []
  hf = [k for k in weights if k.endswith('embedder.embedder.convolution.weight')]
  tv = [k for k in weights if k.endswith('layer1.0.conv1.weight')]
  weights = {k: v for k, v in weights.items() if not k.endswith('num_batches_tracked')}
  if hf:
    prefix = hf[0][:-len('embedder.embedder.convolution.weight')]
    for key, value in weights.items():
      name = _hf_resnet_key(key[len(prefix):]) if key.startswith(prefix) else None
      if name is None:
        ignored.append(key)
      else:
        state['backbone.' + name] = value
  elif tv:
    prefix = tv[0][:-len('layer1.0.conv1.weight')]
    for key, value in weights.items():
      name = key[len(prefix):] if key.startswith(prefix) else ''
      if not name or name.startswith('fc.'):
        ignored.append(key)
      else:
        state['backbone.' + name] = value
  else:
    raise ValueError(f'{source} holds neither a Hugging Face ResNet (embedder.embedder.*) '
                     'nor a torchvision ResNet (conv1, layer1.0.conv1, ...).')
  like = like if like is not None else abstract_variables(model_config)
  result = torch_state_dict_to_params(state, _subset(like, 'backbone'))
  if result.missing or result.unused:
    raise ValueError(
        f'The ResNet in {source} does not fit config.model.backbone (block={b.block}, '
        f'stage_sizes={tuple(b.stage_sizes)}): missing {result.missing[:4]}, extra '
        f'{result.unused[:4]}. Set the backbone to the source depth.')
  result.unused = ignored
  return result
