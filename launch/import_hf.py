r"""Builds an initial checkpoint from a Hugging Face BERT and / or a PyTorch ResNet.

  python launch/import_hf.py --config configs/pretrain.py:base \
      --bert /models/bert-base-uncased --resnet /models/resnet50.pth --out workdirs/init
  python launch/train.py --config configs/pretrain.py:base --config.init_from workdirs/init \
      --config.data.tokenizer workdirs/init/vocab.txt

--bert: a HF BERT folder (config.json, model.safetensors or pytorch_model.bin, vocab.txt)
-> text embeddings, encoder layers, pooler and MLM head. --resnet: a HF ResNetModel
folder or a torchvision ResNet state dict (.pth) -> the backbone and its frozen
BatchNorm statistics. The output is an orbax checkpoint (step 0) holding only the
imported variables, which `--config.init_from` loads (the rest is initialised as usual),
plus the BERT vocab.txt. It is written under a temporary name and renamed when complete.
"""

import _bootstrap  # pylint: disable=g-bad-import-order

import os
import shutil

import ml_collections
from absl import app
from absl import flags
from flax import traverse_util

from e2e_vlp.hf import convert
from e2e_vlp.train import checkpoint as ckpt_lib


def _merge(*trees: dict) -> dict:
  flat = {}
  for tree in trees:
    flat.update(traverse_util.flatten_dict(tree))
  return traverse_util.unflatten_dict(flat)


def import_weights(model_config: ml_collections.ConfigDict, out: str, *,
                   bert: str | None = None, resnet: str | None = None,
                   overwrite: bool = False) -> dict[str, list[str]]:
  """Writes the checkpoint `out`; returns {'covered', 'not_covered', 'unused', 'notes'}.

  Raises:
    ValueError: neither source given, or weights that do not fit the config (named).
    FileNotFoundError: a missing file or folder.
  """
  if not bert and not resnet:
    raise ValueError('Nothing to import: pass --bert and / or --resnet.')
  for path in (bert, resnet):
    if path and not os.path.exists(path):
      raise FileNotFoundError(f'{path} does not exist.')
  like = convert.abstract_variables(model_config)
  results = []
  if bert:
    results.append(convert.bert_to_params(bert, model_config, like=like))
  if resnet:
    results.append(convert.resnet_to_params(resnet, model_config, like=like))
  variables = _merge(*(r.variables for r in results))
  everything = {'/'.join(k) for k in traverse_util.flatten_dict(like)}
  covered = sorted('/'.join(k) for k in traverse_util.flatten_dict(variables))
  state = {'params': variables.get('params', {})}
  constants = {k: v for k, v in variables.items() if k != 'params'}
  if constants:
    state['constants'] = constants
  with convert.atomic_output_dir(out, overwrite=overwrite) as tmp:
    checkpointer = ckpt_lib.Checkpointer(tmp, keep=1, async_save=False)
    checkpointer.save(0, state, force=True)
    checkpointer.close()
    if bert:
      shutil.copyfile(os.path.join(bert, 'vocab.txt'), os.path.join(tmp, 'vocab.txt'))
  return {'covered': covered, 'not_covered': sorted(everything - set(covered)),
          'unused': sorted(u for r in results for u in r.unused),
          'notes': [n for r in results for n in r.notes]}


def _summary(paths: list[str]) -> str:
  """Counts per top-level module: 'encoder (96), pooler (2)'."""
  counts = {}
  for path in paths:
    module = path.split('/')[1]
    counts[module] = counts.get(module, 0) + 1
  return ', '.join(f'{m} ({n})' for m, n in sorted(counts.items())) or 'none'


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.out:
    raise app.UsageError('--out is required.')
  report = import_weights(f.config.model, f.out, bert=f.bert, resnet=f.resnet,
                          overwrite=f.overwrite)
  print(f'Wrote {os.path.abspath(f.out)} (orbax checkpoint, step 0).')
  print(f'Imported {len(report["covered"])} variables: {_summary(report["covered"])}')
  print(f'Not covered ({len(report["not_covered"])}, initialised by training): '
        f'{_summary(report["not_covered"])}')
  if report['unused']:
    print(f'Source tensors not used ({len(report["unused"])}): '
          + ', '.join(report['unused'][:10]) + (' ...' if len(report['unused']) > 10 else ''))
  for note in report['notes']:
    print(f'Note: {note}')
  hint = f' --config.data.tokenizer {os.path.join(f.out, "vocab.txt")}' if f.bert else ''
  print(f'Train with: --config.init_from {f.out}{hint}')


def _define_flags():
  """Flags exist only when run as a script, so tests can import `import_weights`."""
  _bootstrap.define_config_flag(
      os.path.join(_bootstrap.ROOT, 'configs', 'pretrain.py'),
      'The config of the model to initialise (its config.model must fit the weights).')
  flags.DEFINE_string('bert', None, 'Hugging Face BERT folder.')
  flags.DEFINE_string('resnet', None, 'Hugging Face ResNet folder or torchvision .pth file.')
  flags.DEFINE_string('out', None, 'Output workdir (must not exist, or be empty).')
  flags.DEFINE_bool('overwrite', False, 'Replace a non-empty output folder.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
