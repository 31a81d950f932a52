"""Hyper-parameter sweeps: override lists, validation, sub-workdirs, commands and summaries.

A sweep is a list of override dicts (`{'optim.lr': 3e-4, 'train.seed': 1}`), one per run,
built from axes with `product` and `zip_`:

  product(axis('optim.lr', [1e-4, 3e-4]), axis('train.seed', [0, 1]))  # 4 runs
  zip_(axis('optim.lr', [1e-4, 3e-4]), axis('optim.warmup_steps', [100, 200]))  # 2 runs

Every override is checked against the config, and its command-line form is parsed back
with the same `ml_collections.config_flags` parser `launch/train.py` uses, before any run
starts. Run `i` trains in `<workdir>/<i>_<field=value...>/`, which also holds
`overrides.json` (what it runs), `status.json` (how it ended, local mode) and `train.log`.
"""

import copy
import csv
import dataclasses
import difflib
import importlib.util
import io
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ml_collections
from absl import flags
from etils import epath
from ml_collections import config_flags

Overrides = dict[str, Any]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(ROOT, 'launch', 'train.py')
OVERRIDES_FILE = 'overrides.json'
STATUS_FILE = 'status.json'
METRICS_FILE = 'metrics.jsonl'
LOG_FILE = 'train.log'
MAX_NAME_LEN = 120  # keeps run directory names well under the usual 255-byte limit
_UNSAFE = re.compile(r'[^A-Za-z0-9._=+-]+')


class SweepError(ValueError):
  """A sweep that cannot run as written; the message names the file, run and field."""


# ------------------------------------------------------------------- building sweeps


def axis(field: str, values: Sequence[Any]) -> list[Overrides]:
  """One config field taking each of `values`: `[{field: v} for v in values]`."""
  if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
    raise SweepError(f'axis({field!r}, ...) needs a list of values, got {values!r}; '
                     f'write axis({field!r}, [{values!r}]) for a single value.')
  values = list(values)
  if not values:
    raise SweepError(f'axis({field!r}, []) has no values; a sweep needs at least one.')
  return [{field: v} for v in values]


def _merge(parts: Sequence[Overrides], op: str) -> Overrides:
  merged = {}
  for part in parts:
    for field, value in part.items():
      if field in merged:
        raise SweepError(f'{op}: field {field!r} is set by more than one axis; '
                         'each field may appear in one axis only.')
      merged[field] = value
  return merged


def product(*axes: Sequence[Overrides]) -> list[Overrides]:
  """Every combination; the last axis varies fastest (like `itertools.product`)."""
  return [_merge(combo, 'product') for combo in itertools.product(*axes)]


def zip_(*axes: Sequence[Overrides]) -> list[Overrides]:
  """Element-wise combination of equally long axes."""
  lengths = [len(a) for a in axes]
  if len(set(lengths)) > 1:
    raise SweepError(f'zip_: axes have different lengths {lengths}; zip_ pairs the i-th '
                     'values of every axis, so all must be equally long (use product '
                     'for all combinations).')
  return [_merge(parts, 'zip_') for parts in zip(*axes)]


# ------------------------------------------------------------------ loading files


def _load_module(path: str, name: str):
  if not os.path.isfile(path):
    raise SweepError(f'{path}: no such file.')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(config_spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` -> `get_config(arg)`, as `--config` would load it."""
  path, *arg = config_spec.split(':', 1)
  return _load_module(path, '_sweep_config').get_config(*arg)


def load_sweep(sweep_path: str) -> list[Overrides]:
  """Calls `get_sweep()` of a sweep file; checks it returned a non-empty list of dicts."""
  module = _load_module(sweep_path, '_sweep_file')
  if not hasattr(module, 'get_sweep'):
    raise SweepError(f'{sweep_path}: defines no get_sweep() returning a list of override '
                     'dicts.')
  runs = module.get_sweep()
  if (not isinstance(runs, (list, tuple)) or not runs
      or not all(isinstance(r, dict) for r in runs)):
    raise SweepError(f'{sweep_path}: get_sweep() must return a non-empty list of dicts '
                     f'(built with axis/product/zip_), got {runs!r:.200}.')
  return [dict(r) for r in runs]


# -------------------------------------------------------------------- validation


def _leaf_paths(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  paths = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      paths += _leaf_paths(value, f'{prefix}{key}.')
    else:
      paths.append(prefix + key)
  return paths


def check_field(config: ml_collections.ConfigDict, field: str, source: str):
  """Raises SweepError unless `field` (dotted) names a leaf of `config`."""
  node = config
  for depth, key in enumerate(field.split('.')):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      where = '.'.join(['config', *field.split('.')[:depth]])
      close = difflib.get_close_matches(field, _leaf_paths(config), n=3)
      hint = f' Did you mean {", ".join(repr(c) for c in close)}?' if close else ''
      if isinstance(node, ml_collections.ConfigDict):
        hint += f' Fields of {where}: {", ".join(sorted(node.keys()))}.'
      raise SweepError(f'{source}: unknown config field {field!r} (no {key!r} in '
                       f'{where}).{hint}')
    node = node[key]
  if isinstance(node, ml_collections.ConfigDict):
    raise SweepError(f'{source}: {field!r} is a group of fields, not one field; override '
                     f'one of {", ".join(sorted(node.keys()))}.')


def _set(config: ml_collections.ConfigDict, field: str, value: Any, where: str):
  """Sets a field the way ConfigDict type-checks it; bool and None are refused too."""
  parent_path, _, key = field.rpartition('.')
  parent = config
  for part in filter(None, parent_path.split('.')):
    parent = parent[part]
  current = parent[key]
  wrong = (value is None or isinstance(value, bool) != isinstance(current, bool))
  if not wrong:
    try:
      setattr(parent, key, value)
    except TypeError:
      wrong = True
  if wrong:
    raise SweepError(f'{where}: config.{field}={value!r} has type {type(value).__name__}; '
                     f'the field has type {type(current).__name__} (default {current!r}).')


def to_flag_value(value: Any) -> str:
  """The text of `--config.field=<text>` that config_flags parses back into `value`."""
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, str):
    return value
  return repr(value)


def _parse_flags(config_spec: str, flag_args: Sequence[str]) -> ml_collections.ConfigDict:
  """The config `launch/train.py --config=<spec> <flag_args>` would run with."""
  argv = ['train.py', f'--config={config_spec}', *flag_args]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
  with warnings.catch_warnings():  # config_flags loads the file with a deprecated loader
    warnings.filterwarnings('ignore', 'the load_module', DeprecationWarning)
    values(argv)
  return holder.value


def parse_base_overrides(config_spec: str, items: Sequence[str],
                         config: ml_collections.ConfigDict) -> Overrides:
  """`['optim.lr=3e-4', ...]` -> `{'optim.lr': 0.0003}`, typed as train.py parses them."""
  fields = []
  for item in items:
    field, sep, _ = item.partition('=')
    if not sep or not field:
      raise SweepError(f'--base_override {item!r}: write field=value, e.g. '
                       'train.total_steps=100.')
    check_field(config, field, '--base_override')
    fields.append(field)
  try:
    parsed = _parse_flags(config_spec, [f'--config.{item}' for item in items])
  except (flags.Error, ValueError, TypeError) as e:
    raise SweepError(f'--base_override: {e}') from None
  return {field: _get(parsed, field) for field in fields}


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  node = config
  for key in field.split('.'):
    node = node[key]
  return node


# ------------------------------------------------------------------------- planning


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: where it trains, what it overrides, how it is started."""
  index: int
  name: str
  workdir: str
  overrides: Overrides  # the sweep's values for this run, after ConfigDict casting
  base_overrides: Overrides  # shared by every run (--base_override)
  command: tuple[str, ...]
  total_steps: int

  def record(self) -> dict[str, Any]:
    return {'index': self.index, 'name': self.name, 'overrides': self.overrides,
            'base_overrides': self.base_overrides, 'command': list(self.command),
            'total_steps': self.total_steps}


def short_names(fields: Sequence[str]) -> dict[str, str]:
  """The shortest dotted suffix of each field that no other field ends with."""
  names = {}
  for field in fields:
    parts = field.split('.')
    for n in range(1, len(parts) + 1):
      suffix = '.'.join(parts[-n:])
      if not any(o != field and (o == suffix or o.endswith('.' + suffix)) for o in fields):
        break
    names[field] = suffix
  return names


def _format_value(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return '-'.join(_format_value(v) for v in value) or 'none'
  return to_flag_value(value)


def run_name(index: int, overrides: Overrides, names: dict[str, str], width: int = 3) -> str:
  """`000_lr=0.0003_seed=1`: readable, and safe as a single path component."""
  parts = [f'{index:0{width}d}'] + [f'{names[f]}={_format_value(v)}'
                                   for f, v in overrides.items()]
  name = _UNSAFE.sub('-', '_'.join(parts))
  return name[:MAX_NAME_LEN].rstrip('.')


def _is_remote(path: str) -> bool:
  return '://' in path


def train_command(config_spec: str, workdir: str, overrides: Overrides,
                  python: str = sys.executable, train_script: str = TRAIN_SCRIPT) -> list[str]:
  """`python launch/train.py --config=... --workdir=... --config.f=v ...` as argv."""
  path, sep, arg = config_spec.partition(':')
  spec = os.path.abspath(path) + sep + arg
  workdir = workdir if _is_remote(workdir) else os.path.abspath(workdir)
  return [python, train_script, f'--config={spec}', f'--workdir={workdir}',
          *[f'--config.{f}={to_flag_value(v)}' for f, v in overrides.items()]]


def plan(config_spec: str, sweep: Sequence[Overrides], workdir: str, *,
         base_overrides: Sequence[str] = (), source: str = 'sweep',
         python: str = sys.executable, train_script: str = TRAIN_SCRIPT) -> list[Run]:
  """Validates every run of `sweep` and returns them; raises SweepError, touching nothing.

  Checks, per run: each field exists; each value fits the field's type; the command line
  parses back (config_flags, as train.py) into exactly these values; no field is both a
  base override and swept; an existing run directory was made by the same overrides.
  """
  config = load_config(config_spec)
  base = parse_base_overrides(config_spec, base_overrides, config)
  fields = list(dict.fromkeys(f for run in sweep for f in run))
  for field in fields:
    check_field(config, field, source)
    if field in base:
      raise SweepError(f'{source}: {field!r} is swept and also set by --base_override; '
                       'drop one of them.')
  names = short_names(fields)
  width = max(3, len(str(len(sweep) - 1)))
  runs = []
  for index, overrides in enumerate(sweep):
    where = f'{source}, run {index}'
    cfg = copy.deepcopy(config)
    for field, value in {**base, **overrides}.items():
      _set(cfg, field, value, where)
    cast = {f: _get(cfg, f) for f in overrides}
    full = {**base, **cast}
    args = [f'--config.{f}={to_flag_value(v)}' for f, v in full.items()]
    try:
      parsed = _parse_flags(config_spec, args)
    except (flags.Error, ValueError, TypeError) as e:
      raise SweepError(f'{where}: the command line does not parse: {e}') from None
    for field, value in full.items():
      if repr(_get(parsed, field)) != repr(value):
        raise SweepError(f'{where}: config.{field}={value!r} would reach train.py as '
                         f'{_get(parsed, field)!r} through --config.{field}='
                         f'{to_flag_value(value)}; use a value the command line can carry.')
    name = run_name(index, cast, names, width)
    run_dir = os.path.join(workdir, name)
    runs.append(Run(index=index, name=name, workdir=run_dir, overrides=cast,
                    base_overrides=base,
                    command=tuple(train_command(config_spec, run_dir, full, python,
                                                train_script)),
                    total_steps=int(_get(cfg, 'train.total_steps'))))
  _check_existing(runs, source)
  return runs


def _check_existing(runs: Sequence[Run], source: str):
  for run in runs:
    path = epath.Path(run.workdir) / OVERRIDES_FILE
    if path.exists():
      old = json.loads(path.read_text())
      new = json.loads(json.dumps(run.record()))
      if (old.get('overrides'), old.get('base_overrides')) != (new['overrides'],
                                                               new['base_overrides']):
        raise SweepError(
            f'{source}: {run.workdir} holds a run with other overrides '
            f'({old.get("overrides")}, base {old.get("base_overrides")}); use a new '
            '--workdir for a changed sweep.')


# ------------------------------------------------------------------------ running


def read_metrics(run_dir: str) -> tuple[dict[str, Any], int | None]:
  """Last value of every key in `metrics.jsonl`, and the last step logged."""
  path = epath.Path(run_dir) / METRICS_FILE
  final, last_step = {}, None
  if not path.exists():
    return final, last_step
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut short by a crash or a copy in progress
    final.update(record)
    if isinstance(record.get('step'), int):
      last_step = record['step']
  return final, last_step


def run_status(run_dir: str, total_steps: int | None = None) -> str:
  """'finished' | 'failed' | 'incomplete' (started) | 'pending' (not started).

  The sweep's `status.json` decides when present; otherwise (a run started from
  commands.sh) a metrics.jsonl that reached `total_steps` means finished.
  """
  status_path = epath.Path(run_dir) / STATUS_FILE
  if status_path.exists():
    return json.loads(status_path.read_text())['status']
  _, last_step = read_metrics(run_dir)
  if last_step is None:
    return 'pending'
  return 'finished' if total_steps is not None and last_step >= total_steps else 'incomplete'


def _run_subprocess(command: Sequence[str], log_path: epath.Path) -> int:
  with log_path.open('a') as log:
    log.write(f'$ {shlex.join(command)}\n')
    log.flush()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    for line in process.stdout:
      log.write(line)
    return process.wait()


def run_local(runs: Sequence[Run], echo: Callable[[str], None] = print) -> dict[str, str]:
  """Runs each unfinished run in turn; a failure is recorded and the sweep goes on."""
  statuses = {}
  for run in runs:
    run_dir = epath.Path(run.workdir)
    if run_status(run.workdir, run.total_steps) == 'finished':
      statuses[run.name] = 'finished'
      echo(f'[{run.index + 1}/{len(runs)}] {run.name}: already finished, skipped.')
      continue
    (run_dir / STATUS_FILE).unlink(missing_ok=True)
    echo(f'[{run.index + 1}/{len(runs)}] {run.name}: running (log: {run_dir / LOG_FILE})')
    start = time.time()
    returncode = _run_subprocess(run.command, run_dir / LOG_FILE)
    status = 'finished' if returncode == 0 else 'failed'
    (run_dir / STATUS_FILE).write_text(json.dumps(
        {'status': status, 'returncode': returncode,
         'seconds': round(time.time() - start, 1)}))
    statuses[run.name] = status
    echo(f'[{run.index + 1}/{len(runs)}] {run.name}: {status}'
         + (f' (exit code {returncode}; see {run_dir / LOG_FILE})' if returncode else ''))
  return statuses


def write_commands(runs: Sequence[Run], path: str):
  """One command per line: line i+1 is run i (`sed -n "$((i + 1))p" commands.sh | sh`)."""
  epath.Path(path).write_text(''.join(shlex.join(r.command) + '\n' for r in runs))


def prepare(runs: Sequence[Run]):
  """Creates each run directory with its `overrides.json`."""
  for run in runs:
    run_dir = epath.Path(run.workdir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / OVERRIDES_FILE).write_text(json.dumps(run.record(), indent=2))


# ------------------------------------------------------------------------ summary


def collect(workdir: str) -> list[dict[str, Any]]:
  """One row per run directory (those with `overrides.json`), in run order."""
  rows = []
  records = [json.loads(p.read_text())
             for p in epath.Path(workdir).glob(f'*/{OVERRIDES_FILE}')]
  for record in sorted(records, key=lambda r: r['index']):
    run_dir = os.path.join(workdir, record['name'])
    final, _ = read_metrics(run_dir)
    rows.append({'run': record['name'],
                 'status': run_status(run_dir, record.get('total_steps')),
                 'overrides': record['overrides'], 'metrics': final})
  return rows


def _columns(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
  fields = list(dict.fromkeys(f for r in rows for f in r['overrides']))
  keys = {k for r in rows for k, v in r['metrics'].items()
          if k != 'step' and isinstance(v, (int, float, str))}
  metrics = (['step'] * any('step' in r['metrics'] for r in rows)
             + sorted(k for k in keys if not k.startswith('eval/'))
             + sorted(k for k in keys if k.startswith('eval/')))
  return fields, metrics


def _cell(value: Any, short: bool) -> str:
  if value is None or isinstance(value, (list, dict)):
    return ''
  if isinstance(value, float):
    if short and math.isfinite(value):
      return f'{value:.4g}'
    return repr(value)
  return _format_value(value) if isinstance(value, tuple) else str(value)


def summary_tables(rows: Sequence[dict[str, Any]]) -> tuple[str, str]:
  """(CSV with full precision, Markdown with 4 significant digits) of the final metrics.

  Columns: run, status, the swept fields, step, training metrics, then `eval/` metrics.
  """
  fields, metrics = _columns(rows)
  header = ['run', 'status', *fields, *metrics]
  table = [[r['run'], r['status'], *[r['overrides'].get(f) for f in fields],
            *[r['metrics'].get(k) for k in metrics]] for r in rows]
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(header)
  writer.writerows([[_cell(v, short=False) for v in row] for row in table])
  md = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  md += ['| ' + ' | '.join(_cell(v, short=True).replace('|', '\\|') for v in row) + ' |'
         for row in table]
  return out.getvalue(), '\n'.join(md) + '\n'


def write_summary(workdir: str) -> str:
  """Writes `summary.csv` and `summary.md` into `workdir`; returns the Markdown."""
  rows = collect(workdir)
  if not rows:
    raise SweepError(f'{workdir}: no run directories (with {OVERRIDES_FILE}) to summarize.')
  csv_text, md_text = summary_tables(rows)
  (epath.Path(workdir) / 'summary.csv').write_text(csv_text)
  (epath.Path(workdir) / 'summary.md').write_text(md_text)
  return md_text


# ---------------------------------------------------------------------- entry point


def execute(config_spec: str, sweep_path: str, workdir: str, *, mode: str = 'local',
            base_overrides: Sequence[str] = (), python: str = sys.executable,
            train_script: str = TRAIN_SCRIPT, echo: Callable[[str], None] = print) -> str:
  """Validates the whole sweep, then runs it (local) or writes commands.sh (print).

  Returns the summary as Markdown. Nothing is created when validation fails.
  """
  if mode not in ('local', 'print'):
    raise SweepError(f"mode={mode!r}: use 'local' (run here, one after another) or "
                     "'print' (write commands.sh for a cluster).")
  runs = plan(config_spec, load_sweep(sweep_path), workdir, base_overrides=base_overrides,
              source=sweep_path, python=python, train_script=train_script)
  prepare(runs)
  if mode == 'print':
    path = os.path.join(workdir, 'commands.sh')
    write_commands(runs, path)
    echo(f'{len(runs)} commands written to {path}.')
  else:
    run_local(runs, echo)
  return write_summary(workdir)
