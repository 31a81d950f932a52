"""Sweeps: expansion, names, validation before any run, local/print modes, summaries.

Hand-written expected lists and tables are the reference; the local mode runs a stub
trainer (a few lines of Python) and, once, the real launch/train.py on a shrunken model.
"""

import csv
import json
import math
import os
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

import fast_compile
from e2e_vlp import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'configs', 'pretrain.py') + ':tiny'


def _write(path, text):
  path.write_text(textwrap.dedent(text))
  return str(path)


def test_product_and_zip_expand_to_exact_lists():
  lr = sweep.axis('optim.lr', [1e-4, 3e-4])
  seed = sweep.axis('train.seed', [0, 1, 2])
  assert sweep.product(lr, seed) == [
      {'optim.lr': 1e-4, 'train.seed': 0}, {'optim.lr': 1e-4, 'train.seed': 1},
      {'optim.lr': 1e-4, 'train.seed': 2}, {'optim.lr': 3e-4, 'train.seed': 0},
      {'optim.lr': 3e-4, 'train.seed': 1}, {'optim.lr': 3e-4, 'train.seed': 2}]
  warmup = sweep.axis('optim.warmup_steps', [10, 20])
  assert sweep.zip_(lr, warmup) == [{'optim.lr': 1e-4, 'optim.warmup_steps': 10},
                                    {'optim.lr': 3e-4, 'optim.warmup_steps': 20}]
  # A zip inside a product, and a product inside a zip.
  assert sweep.product(sweep.zip_(lr, warmup), sweep.axis('train.seed', [7])) == [
      {'optim.lr': 1e-4, 'optim.warmup_steps': 10, 'train.seed': 7},
      {'optim.lr': 3e-4, 'optim.warmup_steps': 20, 'train.seed': 7}]
  nested = sweep.zip_(sweep.product(lr, sweep.axis('model.remat', [False, True])),
                      sweep.axis('train.seed', [0, 1, 2, 3]))
  assert nested == [{'optim.lr': 1e-4, 'model.remat': False, 'train.seed': 0},
                    {'optim.lr': 1e-4, 'model.remat': True, 'train.seed': 1},
                    {'optim.lr': 3e-4, 'model.remat': False, 'train.seed': 2},
                    {'optim.lr': 3e-4, 'model.remat': True, 'train.seed': 3}]
  assert sweep.product(lr) == lr and sweep.zip_(seed) == seed


@pytest.mark.parametrize('build, message', [
    (lambda: sweep.zip_(sweep.axis('a', [1, 2]), sweep.axis('b', [1])), 'different lengths'),
    (lambda: sweep.product(sweep.axis('a', [1]), sweep.axis('a', [2])), "'a' is set by more"),
    (lambda: sweep.axis('a', []), 'no values'),
    (lambda: sweep.axis('a', 3e-4), 'needs a list'),
])
def test_malformed_sweeps_are_refused(build, message):
  with pytest.raises(sweep.SweepError, match=message):
    build()


def test_run_names_are_readable_unique_and_filesystem_safe(tmp_path):
  runs = sweep.plan(CONFIG, sweep.product(sweep.axis('optim.lr', [3e-4]),
                                          sweep.axis('train.seed', [1])), str(tmp_path))
  assert [r.name for r in runs] == ['000_lr=0.0003_seed=1']
  # Same leaf name in two groups, strings with path characters, tuples, bools.
  tricky = sweep.product(
      sweep.axis('model.max_text_len', [32]), sweep.axis('data.max_text_len', [24]),
      sweep.axis('data.tokenizer', ['/tmp/a b/vocab.txt', '../x', '']),
      sweep.axis('data.resize_sizes', [(80, 96), [88]]),
      sweep.axis('model.remat', [True]))
  runs = sweep.plan(CONFIG, tricky, str(tmp_path))
  names = [r.name for r in runs]
  assert names[0] == ('000_model.max_text_len=32_data.max_text_len=24_'
                      'tokenizer=-tmp-a-b-vocab.txt_resize_sizes=80-96_remat=true')
  assert len(set(names)) == len(names) == 6
  for name in names:
    assert re.fullmatch(r'[A-Za-z0-9._=+-]+', name) and name not in ('.', '..')
    assert len(name) <= sweep.MAX_NAME_LEN
  assert runs[1].overrides['data.resize_sizes'] == (88,)  # cast as ConfigDict casts it
  long_runs = sweep.plan(CONFIG, sweep.axis('data.tokenizer', ['x' * 300, 'x' * 301]),
                         str(tmp_path))
  assert [len(r.name) for r in long_runs] == [sweep.MAX_NAME_LEN] * 2
  assert long_runs[0].name != long_runs[1].name


def _recording_popen(monkeypatch):
  calls = []
  monkeypatch.setattr(sweep.subprocess, 'Popen',
                      lambda *a, **k: calls.append(a) or pytest.fail('a run started'))
  return calls


@pytest.mark.parametrize('line, message', [
    ("product(axis('optim.lr', [1e-4]), axis('optim.learning_rate', [1e-3]))",
     r"unknown config field 'optim.learning_rate'.*Fields of config.optim: b1, b2, "),
    ("axis('train.totl_steps', [1])", r"Did you mean 'train.total_steps'"),
    ("axis('trian.seed', [1])", r"no 'trian' in config\).*'train.seed'"),
    ("axis('train.total_steps', [10, 2.5])",
     r'run 1: config.train.total_steps=2.5 has type float; the field has type int'),
    ("axis('model.remat', [1])", r'config.model.remat=1 has type int; the field has type bool'),
    ("axis('optim.lr', ['fast'])", r"config.optim.lr='fast' has type str"),
    ("axis('optim', [1])", r"'optim' is a group of fields"),
])
def test_invalid_sweep_fails_before_any_run(tmp_path, monkeypatch, line, message):
  calls = _recording_popen(monkeypatch)
  path = _write(tmp_path / 'bad_sweep.py', f"""
      from e2e_vlp.sweep import axis, product
      def get_sweep():
        return {line}
      """)
  workdir = tmp_path / 'sweep'
  with pytest.raises(sweep.SweepError, match=message) as error:
    sweep.execute(CONFIG, path, str(workdir), mode='local')
  assert str(error.value).startswith(path)  # names the sweep file
  assert not workdir.exists() and not calls


def test_base_overrides_are_typed_applied_and_checked(tmp_path, monkeypatch):
  calls = _recording_popen(monkeypatch)
  runs = sweep.plan(CONFIG, sweep.axis('optim.lr', [1e-4]), str(tmp_path),
                    base_overrides=['train.total_steps=7', 'data.resize_sizes=(80, 96)',
                                    'model.remat=true', 'data.dataset=coco_captions'])
  assert runs[0].base_overrides == {'train.total_steps': 7, 'data.resize_sizes': (80, 96),
                                    'model.remat': True, 'data.dataset': 'coco_captions'}
  assert runs[0].total_steps == 7
  assert runs[0].command[2:] == (
      f'--config={CONFIG}', f'--workdir={tmp_path}/000_lr=0.0001',
      '--config.train.total_steps=7', '--config.data.resize_sizes=(80, 96)',
      '--config.model.remat=true', '--config.data.dataset=coco_captions',
      '--config.optim.lr=0.0001')
  for bad, message in [(['optim.lr=3e-4'], 'swept and also set by --base_override'),
                       (['train.total_steps=1.5'], 'invalid literal for int'),
                       (['optim.lrr=1'], "unknown config field 'optim.lrr'"),
                       (['optim.lr'], 'write field=value')]:
    with pytest.raises(sweep.SweepError, match=message):
      sweep.plan(CONFIG, sweep.axis('optim.lr', [1e-4]), str(tmp_path), base_overrides=bad)
  assert not calls and not list(tmp_path.iterdir())


def _fake_trainer(tmp_path):
  """Writes metrics like launch/train.py; fails (exit 3) when optim.lr > 1e-3."""
  return _write(tmp_path / 'fake_train.py', """
      import json, os, sys
      args = dict(a[2:].split('=', 1) for a in sys.argv[1:])
      workdir = args['workdir']
      with open(os.path.join(os.path.dirname(workdir), 'calls.txt'), 'a') as f:
        f.write(os.path.basename(workdir) + '\\n')
      lr, steps = float(args['config.optim.lr']), int(args['config.train.total_steps'])
      if lr > 1e-3:
        print('loss diverged')
        sys.exit(3)
      with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
        f.write(json.dumps({'step': steps, 'loss': lr * 1000}) + '\\n')
        f.write(json.dumps({'step': steps, 'eval/accuracy': lr * 100}) + '\\n')
      """)


def test_local_mode_records_failures_continues_and_skips_finished_runs(tmp_path):
  sweep_file = _write(tmp_path / 'lr.py', """
      from e2e_vlp.sweep import axis
      def get_sweep():
        return axis('optim.lr', [1e-4, 3e-3, 1e-3])
      """)
  workdir = tmp_path / 'sweep'
  lines = []
  run = lambda: sweep.execute(CONFIG, sweep_file, str(workdir), mode='local',
                              base_overrides=['train.total_steps=3'],
                              train_script=_fake_trainer(tmp_path), echo=lines.append)
  run()
  names = ['000_lr=0.0001', '001_lr=0.003', '002_lr=0.001']
  assert (workdir / 'calls.txt').read_text().split() == names  # went on after the failure
  statuses = [json.loads((workdir / n / 'status.json').read_text()) for n in names]
  assert [(s['status'], s['returncode']) for s in statuses] == [
      ('finished', 0), ('failed', 3), ('finished', 0)]
  assert 'loss diverged' in (workdir / names[1] / 'train.log').read_text()
  record = json.loads((workdir / names[0] / 'overrides.json').read_text())
  assert record['overrides'] == {'optim.lr': 1e-4}
  assert record['base_overrides'] == {'train.total_steps': 3}
  assert (workdir / 'summary.csv').read_text() == (
      'run,status,optim.lr,step,loss,eval/accuracy\n'
      '000_lr=0.0001,finished,0.0001,3,0.1,0.01\n'
      '001_lr=0.003,failed,0.003,,,\n'
      '002_lr=0.001,finished,0.001,3,1.0,0.1\n')
  run()  # again: only the failed run is retried
  assert (workdir / 'calls.txt').read_text().split() == names + [names[1]]
  assert any('already finished, skipped' in line for line in lines)


def test_print_mode_writes_one_command_per_run(tmp_path, monkeypatch):
  calls = _recording_popen(monkeypatch)
  sweep_file = os.path.join(ROOT, 'configs', 'sweeps', 'pretrain_lr.py')
  workdir = tmp_path / 'sweep'
  summary = sweep.execute(CONFIG, sweep_file, str(workdir), mode='print',
                          base_overrides=['train.total_steps=3'], python='python3')
  commands = (workdir / 'commands.sh').read_text().splitlines()
  runs = sweep.plan(CONFIG, sweep.load_sweep(sweep_file), str(workdir),
                    base_overrides=['train.total_steps=3'], python='python3')
  assert len(commands) == len(runs) == 6 and not calls
  for line, run in zip(commands, runs):
    argv = shlex.split(line)
    assert argv[:2] == ['python3', sweep.TRAIN_SCRIPT]
    assert f'--workdir={workdir / run.name}' in argv
    assert f'--config.optim.lr={run.overrides["optim.lr"]!r}' in argv
    assert f'--config.train.seed={run.overrides["train.seed"]}' in argv
    assert '--config.train.total_steps=3' in argv
    assert (workdir / run.name / 'overrides.json').exists()
  assert summary.splitlines()[2] == '| 000_lr=0.0003_seed=0 | pending | 0.0003 | 0 |'


def test_vqa_sweep_file_expands():
  runs = sweep.load_sweep(os.path.join(ROOT, 'configs', 'sweeps', 'vqa_lr.py'))
  assert runs == [{'optim.lr': 2e-5, 'optim.warmup_steps': 100},
                  {'optim.lr': 5e-5, 'optim.warmup_steps': 200},
                  {'optim.lr': 1e-4, 'optim.warmup_steps': 400}]


def _fabricate(workdir, index, name, overrides, lines, status=None, total_steps=4):
  run_dir = workdir / name
  run_dir.mkdir(parents=True)
  (run_dir / 'overrides.json').write_text(json.dumps(
      {'index': index, 'name': name, 'overrides': overrides, 'base_overrides': {},
       'command': [], 'total_steps': total_steps}))
  if lines:
    (run_dir / 'metrics.jsonl').write_text('\n'.join(lines) + '\n')
  if status:
    (run_dir / 'status.json').write_text(json.dumps({'status': status}))


def test_summary_tables_from_fabricated_metrics(tmp_path):
  w = tmp_path
  _fabricate(w, 0, '000_lr=0.0001_seed=0', {'optim.lr': 0.0001, 'train.seed': 0}, [
      '{"step": 2, "loss": 3.0, "mlm_loss": 2.5}',
      '{"step": 4, "loss": 1.23456789, "mlm_loss": 1.0, "per_class": [1, 2]}',
      '{"step": 4, "eval/loss": 1.5, "eval/ap": 0.25}'], status='finished')
  _fabricate(w, 1, '001_lr=0.0003_seed=0', {'optim.lr': 0.0003, 'train.seed': 0},
             ['{"step": 2, "loss": NaN}'], status='failed')
  _fabricate(w, 2, '002_lr=0.0001_seed=1', {'optim.lr': 0.0001, 'train.seed': 1}, [])
  # Started from commands.sh (no status.json): finished because step 4 was reached;
  # its last line was cut short by a crash.
  _fabricate(w, 3, '003_lr=0.0003_seed=1', {'optim.lr': 0.0003, 'train.seed': 1}, [
      '{"step": 4, "loss": 0.5, "eval/ap": 0.5}', '{"step": 4, "eva'])
  _fabricate(w, 10, '010_lr=0.001_seed=1', {'optim.lr': 0.001, 'train.seed': 1},
             ['{"step": 2, "loss": 0.75}'])  # sorts after 003 by index, not by text
  assert sweep.write_summary(str(w)) == (w / 'summary.md').read_text()
  assert (w / 'summary.csv').read_text() == (
      'run,status,optim.lr,train.seed,step,loss,mlm_loss,eval/ap,eval/loss\n'
      '000_lr=0.0001_seed=0,finished,0.0001,0,4,1.23456789,1.0,0.25,1.5\n'
      '001_lr=0.0003_seed=0,failed,0.0003,0,2,nan,,,\n'
      '002_lr=0.0001_seed=1,pending,0.0001,1,,,,,\n'
      '003_lr=0.0003_seed=1,finished,0.0003,1,4,0.5,,0.5,\n'
      '010_lr=0.001_seed=1,incomplete,0.001,1,2,0.75,,,\n')
  assert (w / 'summary.md').read_text() == (
      '| run | status | optim.lr | train.seed | step | loss | mlm_loss | eval/ap | eval/loss |\n'
      '|---|---|---|---|---|---|---|---|---|\n'
      '| 000_lr=0.0001_seed=0 | finished | 0.0001 | 0 | 4 | 1.235 | 1 | 0.25 | 1.5 |\n'
      '| 001_lr=0.0003_seed=0 | failed | 0.0003 | 0 | 2 | nan |  |  |  |\n'
      '| 002_lr=0.0001_seed=1 | pending | 0.0001 | 1 |  |  |  |  |  |\n'
      '| 003_lr=0.0003_seed=1 | finished | 0.0003 | 1 | 4 | 0.5 |  | 0.5 |  |\n'
      '| 010_lr=0.001_seed=1 | incomplete | 0.001 | 1 | 2 | 0.75 |  |  |  |\n')


def test_command_line_entry_point(tmp_path):
  sweep_file = _write(tmp_path / 'bad.py', """
      from e2e_vlp.sweep import axis
      def get_sweep():
        return axis('train.no_such_field', [1])
      """)
  script = os.path.join(ROOT, 'launch', 'sweep.py')
  bad = subprocess.run([sys.executable, script, f'--config={CONFIG}', f'--sweep={sweep_file}',
                        f'--workdir={tmp_path / "w"}'], capture_output=True, text=True,
                       check=False)
  assert bad.returncode != 0 and "unknown config field 'train.no_such_field'" in bad.stderr
  assert not (tmp_path / 'w').exists()
  _fabricate(tmp_path / 'done', 0, '000_lr=0.1', {'optim.lr': 0.1},
             ['{"step": 4, "loss": 2.0}'])
  summary = subprocess.run([sys.executable, script, '--summarize',
                            f'--workdir={tmp_path / "done"}'], capture_output=True, text=True,
                           check=True)
  assert summary.stdout.splitlines()[2] == '| 000_lr=0.1 | finished | 0.1 | 4 | 2 |'


# The smallest model the tiny config can be shrunk to; each run trains 2 steps. The micro
# corpus sizes (tests/micro.py), so the runs read the session's `micro_cache`.
_TINY_RUN = [
    'train.total_steps=2', 'train.log_every=1', 'train.eval_every=2', 'train.eval_batches=1',
    'train.checkpoint_every=2', 'train.batch_size=4', 'train.num_visualize=0',
    'model.d_model=32', 'model.mlp_dim=64', 'model.encoder_layers=1',
    'model.decoder_layers=1', 'model.caption_decoder_layers=1', 'model.fusion_layers=1',
    'model.num_queries=8',
    'data.corpus_train_images=64', 'data.corpus_val_images=16', 'data.shuffle_buffer=64']
# Compiles dominate the runs: one device and XLA's cheapest code generation (as every test
# process, tests/fast_compile.py), and a compilation cache shared by the two runs: they
# differ by the seed only, an input of the compiled programs, so one run compiles and the
# other reads the cache.
_FAST_COMPILE_FLAGS = f'--xla_force_host_platform_device_count=1 {fast_compile.FLAGS}'


def test_real_tiny_sweep_end_to_end(tmp_path, monkeypatch, micro_cache):
  monkeypatch.setenv('XLA_FLAGS', _FAST_COMPILE_FLAGS)
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'jax_cache'))
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  sweep_file = _write(tmp_path / 'lr_seed.py', """
      from e2e_vlp.sweep import axis, product
      def get_sweep():
        return product(axis('optim.lr', [3e-3]), axis('train.seed', [0, 1]))
      """)
  workdir = tmp_path / 'sweep'
  sweep.execute(CONFIG, sweep_file, str(workdir), mode='local',
                base_overrides=_TINY_RUN + [f'cache_dir={micro_cache}'])
  names = ['000_lr=0.003_seed=0', '001_lr=0.003_seed=1']
  with open(workdir / 'summary.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['run'] for r in rows] == names
  for name, row in zip(names, rows):
    assert row['status'] == 'finished', (workdir / name / 'train.log').read_text()[-3000:]
    config = json.loads((workdir / name / 'config.json').read_text())
    assert config['optim']['lr'] == float(row['optim.lr'])  # the override reached train.py
    assert config['train']['seed'] == int(row['train.seed'])
    final = {}
    for line in (workdir / name / 'metrics.jsonl').read_text().splitlines():
      final.update(json.loads(line))
    assert final['step'] == 2 and any(k.startswith('eval/') for k in final)
    for key, value in final.items():
      if isinstance(value, float) and math.isfinite(value):
        assert float(row[key]) == value, key
  losses = [k for k in rows[0] if k.endswith('loss') and not k.startswith('eval/')]
  assert losses and any(rows[0][k] != rows[1][k] for k in losses)  # seeds 0 and 1 differ
