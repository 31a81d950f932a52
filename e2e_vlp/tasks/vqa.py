"""VQA v2: an answer classifier over the pooled [CLS] of the joint encoder.

Training: soft-score binary cross-entropy over the answer vocabulary (the targets are the
official `min(#humans / 3, 1)`), summed over answers and averaged over questions (UNITER,
ViLBERT). Evaluation: the argmax answer of every question of `config.data.eval_split`, the
official submission JSON `[{question_id, answer}]` in the workdir and, where the split has
answers, the official VQA accuracy overall and per answer type.
"""

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from e2e_vlp.data import builders
from e2e_vlp.data import finetune_pipelines
from e2e_vlp.eval import vqa as vqa_eval
from e2e_vlp.models.e2e_vlp import E2EVLP
from e2e_vlp.models.e2e_vlp import init_inputs
from e2e_vlp.tasks import common

INPUTS = ('image', 'image_mask', 'text_ids', 'text_mask')


def vqa_loss(logits: jax.Array, scores: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Soft BCE, summed over answers, mean over questions.

  Args:
    logits: [B, A]; scores: [B, A] soft targets in [0, 1].

  Returns:
    The loss and metrics vqa_loss, vqa_score (the target score of the argmax answer, the
    training-time estimate of VQA accuracy).
  """
  logits = logits.astype(jnp.float32)
  loss = optax.sigmoid_binary_cross_entropy(logits, scores).sum(axis=-1).mean()
  best = jnp.take_along_axis(scores, jnp.argmax(logits, axis=-1)[:, None], axis=-1)
  return loss, {'vqa_loss': loss, 'vqa_score': best.mean()}


def _best_answer(model: E2EVLP, num_answers: int, variables, batch) -> dict[str, jax.Array]:
  """The argmax over the dataset's answers (config.model.num_answers may hold more)."""
  logits = model.apply(variables, batch, method=E2EVLP.vqa_logits)
  return {'answer': jnp.argmax(logits[:, :num_answers], axis=-1)}


def _metric_name(answer_type: str) -> str:
  return 'vqa_accuracy_' + re.sub(r'[^0-9a-z]+', '_', answer_type.lower()).strip('_')


class Task:
  """VQA fine-tuning and evaluation (see the module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.data = common.resolve_data(config)
    self.tokenizer = self.data.tokenizer
    self.answers = builders.load_answer_vocab(
        builders.get_builder(self.data.dataset, self.data.data_dir))
    num_answers = config.model.get('num_answers', 0)
    if len(self.answers) > num_answers:
      raise ValueError(
          f'The answer vocabulary of {self.data.dataset!r} has {len(self.answers)} answers '
          f'but config.model.num_answers={num_answers}; set it to at least '
          f'{len(self.answers)}.')
    self.model = E2EVLP(config.model)
    self._answer_fn = common.jit_eval(functools.partial(_best_answer, self.model,
                                                        len(self.answers)))

  # ------------------------------------------------------------------------- training
  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    d = self.config.data
    s, l, a = d.image_size, d.max_text_len, self.config.model.num_answers
    spec = {'image': ((s, s, 3), jnp.float32), 'image_mask': ((s, s), jnp.bool_),
            'text_ids': ((l,), jnp.int32), 'text_mask': ((l,), jnp.bool_),
            'answer_scores': ((a,), jnp.float32)}
    return {k: jax.ShapeDtypeStruct((batch_size,) + shape, dtype)
            for k, (shape, dtype) in spec.items()}

  def init_variables(self, rng: jax.Array):
    batch = init_inputs(self.config.model, self.batch_spec(1))
    return self.model.init({'params': rng, 'dropout': rng}, batch, method=E2EVLP.vqa_logits)

  def loss_fn(self, params, constants, batch, rng):
    logits = self.model.apply({'params': params, **constants}, batch, train=True,
                              rngs={'dropout': rng}, method=E2EVLP.vqa_logits)
    return vqa_loss(logits, batch['answer_scores'])

  def _iterator(self, *, split: str, train: bool, batch_size: int, seed: int):
    return finetune_pipelines.make_vqa_iterator(
        self.config.data, self.tokenizer, num_answers=self.config.model.num_answers,
        split=split, train=train, global_batch_size=batch_size, seed=seed,
        dataset=self.data.dataset, data_dir=self.data.data_dir)

  def train_iterator(self, *, seed: int):
    return self._iterator(split=self.config.data.train_split, train=True,
                          batch_size=self.config.train.batch_size, seed=seed)

  # ----------------------------------------------------------------------- evaluation
  def predict(self, params, constants, *, mesh, rules, split: str) -> dict[int, str]:
    """{question_id: predicted answer} over `split` (or its first config.eval.num_batches)."""
    batches = self._iterator(split=split, train=False,
                             batch_size=common.eval_batch_size(self.config, mesh),
                             seed=self.config.data.seed)
    out = common.run_eval(self._answer_fn, {'params': params, **constants}, batches, inputs=INPUTS,
                          keep=('question_id',), mesh=mesh, rules=rules,
                          num_batches=self.config.eval.num_batches)
    return {int(q): self.answers[int(a)] for q, a in zip(out['question_id'], out['answer'])}

  def evaluate(self, params, constants, *, step: int, workdir: str, mesh, rules
               ) -> dict[str, Any]:
    split = self.config.data.eval_split
    predictions = self.predict(params, constants, mesh=mesh, rules=rules, split=split)
    common.write_json(vqa_eval.submission(predictions),
                      common.results_path(workdir, 'vqa_submission', split, step))
    annotations = [a for a in finetune_pipelines.load_vqa_annotations(
        self.config.data, split, dataset=self.data.dataset, data_dir=self.data.data_dir)
                   if a['question_id'] in predictions]
    metrics: dict[str, Any] = {'vqa_questions': float(len(predictions))}
    if annotations and all(a['answers'] for a in annotations):
      scores = vqa_eval.vqa_accuracy(predictions, annotations)
      metrics['vqa_accuracy'] = scores['overall']
      metrics.update({_metric_name(t): v for t, v in scores['per_answer_type'].items()})
    return metrics
