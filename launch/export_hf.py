r"""Exports a training checkpoint as a Hugging Face folder (PyTorch, trust_remote_code).

  python launch/export_hf.py --workdir workdirs/pretrain_tiny --out exports/tiny
  python launch/export_hf.py --workdir W --step 2000 --vocab W/vocab.txt --out DIR

Then, with torch and transformers installed:
  model = transformers.AutoModel.from_pretrained(DIR, trust_remote_code=True)
  tokenizer = transformers.AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)

The model config comes from `<workdir>/config.json` (written by training) unless
--config is given; the vocabulary from --vocab, else config.data.tokenizer (a vocab.txt),
else `<workdir>/vocab.txt`. The folder is written under a temporary name and renamed
when complete, so a failed export leaves nothing behind.
"""

import _bootstrap  # pylint: disable=g-bad-import-order

import json
import os

import ml_collections
from absl import app
from absl import flags
from absl import logging

from e2e_vlp.hf import convert
from e2e_vlp.train import checkpoint as ckpt_lib


def _training_config(workdir: str) -> ml_collections.ConfigDict:
  directory = str(ckpt_lib.checkpoints_dir(workdir))
  for folder in (workdir, os.path.dirname(directory)):
    path = os.path.join(folder, 'config.json')
    if os.path.isfile(path):
      with open(path, encoding='utf-8') as f:
        return ml_collections.ConfigDict(json.load(f))
  raise FileNotFoundError(f'{workdir}/config.json is missing; pass --config with the config '
                          'the checkpoint was trained with.')


def _find_vocab(workdir: str, config: ml_collections.ConfigDict, vocab: str | None) -> str:
  if vocab:
    if not os.path.isfile(vocab):
      raise FileNotFoundError(f'--vocab {vocab} does not exist.')
    return vocab
  candidates = []
  tokenizer = config.get('data', {}).get('tokenizer', '')
  if tokenizer.endswith('.txt'):
    candidates.append(tokenizer)
  candidates.append(os.path.join(workdir, 'vocab.txt'))
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f'No vocabulary found (looked at {candidates}); pass --vocab with '
                          "the vocab.txt the model was trained with.")


def export(workdir: str, out: str, *, step: int | None = None,
           config: ml_collections.ConfigDict | None = None, vocab: str | None = None,
           overwrite: bool = False) -> str:
  """Writes the Hugging Face folder `out` from a checkpoint; returns its absolute path.

  Raises:
    FileNotFoundError: no checkpoint / config / vocabulary. ValueError: the checkpoint
    does not match the config. FileExistsError: `out` is not empty (and not overwrite).
  """
  config = config if config is not None else _training_config(workdir)
  vocab_path = _find_vocab(workdir, config, vocab)
  step, tree = ckpt_lib.load_params(workdir, step)
  variables = {'params': tree['params'], **tree['constants']}
  with convert.atomic_output_dir(out, overwrite=overwrite) as tmp:
    components = convert.write_hf_folder(variables, config.model, tmp, vocab_path)
  logging.info('Exported step %d of %s (%s) to %s.', step, workdir, ', '.join(components), out)
  return os.path.abspath(out)


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.workdir or not f.out:
    raise app.UsageError('--workdir and --out are required.')
  path = export(f.workdir, f.out, step=f.step, config=f.config, vocab=f.vocab,
                overwrite=f.overwrite)
  print(f'Wrote {path}')


def _define_flags():
  """Flags exist only when run as a script, so tests can import `export`."""
  _bootstrap.define_config_flag(
      None, 'The training config (default: <workdir>/config.json).')
  flags.DEFINE_string('workdir', None, 'Training workdir (or its checkpoints/ folder).')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default the newest readable one.')
  flags.DEFINE_string('out', None, 'Output folder (must not exist, or be empty).')
  flags.DEFINE_string('vocab', None, 'vocab.txt of the tokenizer the model was trained with.')
  flags.DEFINE_bool('overwrite', False, 'Replace a non-empty output folder.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
