"""Tasks: what to train (model, loss, data, evaluation); the loop knows nothing else.

A task object has: `init_variables(rng)`, `batch_spec(global_batch_size)`,
`loss_fn(params, constants, batch, rng) -> (loss, metrics)`, `train_iterator(seed=)`
(host-local numpy batches with `get_state()`/`set_state()`), and
`evaluate(params, constants, *, step, workdir, mesh, rules) -> metrics`.
"""

import importlib

import ml_collections

_TASKS = {
    'pretrain': 'e2e_vlp.tasks.pretrain',
    'vqa': 'e2e_vlp.tasks.vqa',
    'nlvr2': 'e2e_vlp.tasks.nlvr2',
    'retrieval': 'e2e_vlp.tasks.retrieval',
    'caption': 'e2e_vlp.tasks.caption',
}


def get_task(config: ml_collections.ConfigDict):
  if config.task not in _TASKS:
    raise ValueError(f'config.task={config.task!r} is not a task; use one of {sorted(_TASKS)}.')
  return importlib.import_module(_TASKS[config.task]).Task(config)
