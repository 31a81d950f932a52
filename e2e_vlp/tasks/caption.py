"""Image captioning: the caption decoder over the image-only encoder memory.

Training: teacher forcing on one caption per image per step (random among its references),
cross-entropy with optional label smoothing (`config.loss.label_smoothing`). Evaluation:
greedy or beam search (`config.eval`), the COCO caption results JSON `[{image_id,
caption}]` in the workdir, and BLEU-1..4, METEOR, ROUGE-L, CIDEr against every reference of
the image (pycocoevalcap); SPICE is reported as unavailable (None, `captions.SPICE_NOTE`).
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from e2e_vlp import decoding
from e2e_vlp.data import finetune_pipelines
from e2e_vlp.eval import captions as caption_eval
from e2e_vlp.losses import text as text_losses
from e2e_vlp.models.e2e_vlp import E2EVLP
from e2e_vlp.models.e2e_vlp import init_inputs
from e2e_vlp.tasks import common

DECODERS = ('greedy', 'beam')


def caption_forward(module: E2EVLP, batch: dict[str, jax.Array], *, train: bool) -> jax.Array:
  """Teacher-forced caption logits [B, T, V] (a `method=` for `E2EVLP.apply`)."""
  memory, memory_mask, memory_pos = module.encode_image(batch['image'], batch['image_mask'],
                                                        train=train)
  return module.caption_logits(memory, memory_mask, memory_pos, batch['caption_in'],
                               batch['caption_mask'], train=train)


def check_eval_config(config: ml_collections.ConfigDict) -> None:
  e = config.eval
  if e.decode not in DECODERS:
    raise ValueError(f'config.eval.decode={e.decode!r}: use one of {DECODERS}.')
  if not 1 <= e.max_len <= config.model.max_caption_len:
    raise ValueError(f'config.eval.max_len={e.max_len} must be in [1, '
                     f'config.model.max_caption_len={config.model.max_caption_len}].')
  if e.decode == 'beam' and (e.beam_size < 1 or e.length_penalty < 0):
    raise ValueError(f'config.eval.beam_size={e.beam_size} must be >= 1 and '
                     f'config.eval.length_penalty={e.length_penalty} >= 0.')


class Task:
  """Caption fine-tuning and evaluation (see the module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict):
    check_eval_config(config)
    self.config = config
    self.data = common.resolve_data(config)
    self.tokenizer = self.data.tokenizer
    self.model = E2EVLP(config.model)

  # ------------------------------------------------------------------------- training
  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    d = self.config.data
    s, t = d.image_size, d.max_caption_len
    spec = {'image': ((s, s, 3), jnp.float32), 'image_mask': ((s, s), jnp.bool_),
            'caption_in': ((t,), jnp.int32), 'caption_out': ((t,), jnp.int32),
            'caption_mask': ((t,), jnp.bool_)}
    return {k: jax.ShapeDtypeStruct((batch_size,) + shape, dtype)
            for k, (shape, dtype) in spec.items()}

  def init_variables(self, rng: jax.Array):
    batch = init_inputs(self.config.model, self.batch_spec(1))
    return self.model.init({'params': rng, 'dropout': rng}, batch, train=False,
                           method=caption_forward)

  def loss_fn(self, params, constants, batch, rng):
    logits = self.model.apply({'params': params, **constants}, batch, train=True,
                              rngs={'dropout': rng}, method=caption_forward)
    return text_losses.caption_loss(logits, batch['caption_out'], batch['caption_mask'],
                                    label_smoothing=self.config.loss.label_smoothing)

  def _iterator(self, *, split: str, train: bool, batch_size: int, seed: int):
    return finetune_pipelines.make_pair_iterator(
        self.config.data, self.tokenizer, split=split, train=train,
        global_batch_size=batch_size, seed=seed, dataset=self.data.dataset,
        data_dir=self.data.data_dir)

  def train_iterator(self, *, seed: int):
    return self._iterator(split=self.config.data.train_split, train=True,
                          batch_size=self.config.train.batch_size, seed=seed)

  # ----------------------------------------------------------------------- evaluation
  def _decode_fn(self):
    e, tok, model = self.config.eval, self.tokenizer, self.model
    ids = dict(bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id, max_len=e.max_len)

    def fn(variables, batch):
      if e.decode == 'greedy':
        tokens = decoding.greedy_decode(model, variables, batch['image'], batch['image_mask'],
                                        **ids)
      else:
        tokens, _ = decoding.beam_search(model, variables, batch['image'], batch['image_mask'],
                                         beam_size=e.beam_size,
                                         length_penalty=e.length_penalty, **ids)
      return {'tokens': tokens}

    return fn

  def predict(self, params, constants, *, mesh, rules, split: str) -> dict[int, str]:
    """{image_id: generated caption} over `split` (or its first config.eval.num_batches)."""
    batches = self._iterator(split=split, train=False,
                             batch_size=common.eval_batch_size(self.config, mesh),
                             seed=self.config.data.seed)
    out = common.run_eval(self._decode_fn(), {'params': params, **constants}, batches,
                          inputs=('image', 'image_mask'), keep=('image_id',), mesh=mesh,
                          rules=rules, num_batches=self.config.eval.num_batches)
    captions = self.tokenizer.detokenize(out['tokens'])
    return {int(i): c for i, c in zip(out['image_id'], captions)}

  def evaluate(self, params, constants, *, step: int, workdir: str, mesh, rules
               ) -> dict[str, Any]:
    split = self.config.data.eval_split
    predictions = self.predict(params, constants, mesh=mesh, rules=rules, split=split)
    results = caption_eval.caption_results(predictions)
    common.write_json(results, common.results_path(workdir, 'caption_results', split, step))
    references = finetune_pipelines.load_references(
        self.config.data, split, dataset=self.data.dataset, data_dir=self.data.data_dir)
    coco_gt = caption_eval.caption_ground_truth(
        {i: references[i] for i in predictions if references.get(i)})
    results = [r for r in results if references.get(r['image_id'])]
    if not results:
      return {'caption_images': float(len(predictions))}
    scores = caption_eval.evaluate_captions(coco_gt, results, meteor=self.config.eval.meteor)
    metrics: dict[str, Any] = {'caption_images': float(len(results))}
    metrics.update(scores)  # 'SPICE': None, see captions.SPICE_NOTE
    return metrics
