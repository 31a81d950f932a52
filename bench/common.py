"""Shared benchmark pieces: interleaved medians, XLA cost analysis, the machine
description, Markdown tables, and the project's jitted train step.

Every benchmark reports ratios against a peer measured in the same run, because the
development host is shared: absolute times move with the load, ratios much less.

Import-light on purpose (jax, flax, optax and the project's train pieces only; no
TensorFlow): bench/gpu.py runs on a machine without it. That machine has no
ml_collections either; `configs/pretrain.py` and the model modules use nothing of it but
`ConfigDict` as a nested attribute dict, so where the package is missing this module
registers `AttrDict` in its place before anything imports it. Import this module first.
"""

import collections.abc
import contextlib
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
import types
from typing import Any, Callable, Mapping, Sequence


_IMPORTED = time.perf_counter()  # the origin of `progress`'s clock


def progress(message: str) -> None:
  """`[seconds since start] message` on stderr at once: a run stopped by a time limit (the
  GPU machine's) still shows where its time went. run_all.py prints a script's stderr
  only when it fails, so its tables stay clean."""
  print(f'[{time.perf_counter() - _IMPORTED:7.1f} s] {message}', file=sys.stderr, flush=True)


class AttrDict(collections.abc.MutableMapping):
  """A mapping with attribute access: the part of `ml_collections.ConfigDict` the project's
  configs and modules use (attributes, items, `.get`, `.update`, nesting, `to_dict`).

  Not a `dict` subclass on purpose: flax turns dict attributes of a module into
  `FrozenDict`s, which have no attribute access.
  """

  def __init__(self, fields: Mapping[str, Any] | None = None, **kwargs: Any):
    object.__setattr__(self, '_fields', {})
    self.update(fields or {}, **kwargs)

  def __getattr__(self, name: str) -> Any:
    if name.startswith('__') or name == '_fields':
      raise AttributeError(name)
    try:
      return self._fields[name]
    except KeyError:
      raise AttributeError(f'No config field {name!r}; fields: {sorted(self._fields)}.'
                           ) from None

  def __setattr__(self, name: str, value: Any) -> None:
    self._fields[name] = value

  def __getitem__(self, key: str) -> Any:
    return self._fields[key]

  def __setitem__(self, key: str, value: Any) -> None:
    self._fields[key] = value

  def __delitem__(self, key: str) -> None:
    del self._fields[key]

  def __iter__(self):
    return iter(self._fields)

  def __len__(self) -> int:
    return len(self._fields)

  def __repr__(self) -> str:
    return f'AttrDict({self._fields!r})'

  def to_dict(self) -> dict[str, Any]:
    return {k: v.to_dict() if isinstance(v, AttrDict) else v for k, v in self.items()}


try:
  import ml_collections  # noqa: F401
except ImportError:
  _stand_in = types.ModuleType('ml_collections', 'bench.common.AttrDict as ConfigDict.')
  _stand_in.ConfigDict = AttrDict
  sys.modules['ml_collections'] = _stand_in

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from e2e_vlp.train import mesh as mesh_lib  # noqa: E402
from e2e_vlp.train import optimizer as optimizer_lib  # noqa: E402
from e2e_vlp.train import sharding  # noqa: E402
from e2e_vlp.train import state as state_lib  # noqa: E402

# The compile columns time real compilations: a persistent compilation cache
# (JAX_COMPILATION_CACHE_DIR) would turn them into loads from disk.
jax.config.update('jax_compilation_cache_dir', None)

Thunk = Callable[[], Any]


def time_interleaved(fns: Mapping[str, Thunk], *, warmup: int, repeats: int,
                     sync: Callable[[Any], Any] = jax.block_until_ready,
                     statistic: Callable[[list[float]], float] | Mapping[
                         str, Callable[[list[float]], float]] = statistics.median
                     ) -> dict[str, float]:
  """name -> `statistic` (default: the median) of the milliseconds of `fn()` (synced) over
  `repeats` rounds; `statistic` may also map each name to its own, e.g. `min` for a peak.

  Each round runs every function once in turn, so a load spike on a shared host slows all
  peers alike instead of one of them. `warmup` untimed rounds come first (compilation,
  caches, thread pools).
  """
  if repeats < 1:
    raise ValueError(f'repeats={repeats} must be at least 1.')
  for _ in range(warmup):
    for fn in fns.values():
      sync(fn())
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      sync(fn())
      times[name].append((time.perf_counter() - start) * 1e3)
  pick = statistic if isinstance(statistic, Mapping) else {name: statistic for name in fns}
  return {name: pick.get(name, statistics.median)(values) for name, values in times.items()}


def time_in_blocks(fns: Mapping[str, Thunk], *, rounds: int, warmup: int, repeats: int,
                   sync: Callable[[Any], Any] = jax.block_until_ready) -> dict[str, float]:
  """name -> the median over `rounds` of each function's block median, in milliseconds.

  For peers that must not run right after each other (bench/conv_ops.py: XLA's convolution
  ran slower right after a PyTorch call): each round runs every function's block of
  `repeats` calls in turn, the first function moving one place each round, so a load spike
  during one block spoils one of the function's `rounds` medians instead of its only one.
  `warmup` untimed calls of each come first.
  """
  if rounds < 1:
    raise ValueError(f'rounds={rounds} must be at least 1.')
  names = list(fns)
  for name in names:
    for _ in range(warmup):
      sync(fns[name]())
  medians: dict[str, list[float]] = {name: [] for name in names}
  for round_index in range(rounds):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      medians[name].append(
          time_interleaved({name: fns[name]}, warmup=0, repeats=repeats, sync=sync)[name])
  return {name: statistics.median(values) for name, values in medians.items()}


@dataclasses.dataclass(frozen=True)
class PairedRatio:
  """Per-round time ratios of two peers: their median and interquartile range."""
  median: float
  low: float  # first quartile
  high: float  # third quartile
  rounds: int

  @classmethod
  def of(cls, ratios: Sequence[float]) -> 'PairedRatio':
    if not ratios:
      raise ValueError('PairedRatio needs at least one round.')
    low, _, high = (statistics.quantiles(ratios, n=4) if len(ratios) > 1
                    else (ratios[0],) * 3)
    return cls(statistics.median(ratios), low, high, len(ratios))

  def __str__(self) -> str:
    return f'median of {self.rounds} paired rounds, IQR {self.low:.2f}-{self.high:.2f}'


def paired_ratio(ours: Thunk, peer: Thunk, *, rounds: int,
                 sync: Callable[[Any], Any] = jax.block_until_ready) -> PairedRatio:
  """Time ratio ours / peer, round by round, each round timing both back to back.

  A round's two steps share the host's load of that moment, so the per-round ratio cancels
  the drift that moves both (on this shared host a peer's step has moved by 14% between two
  runs of unchanged code); the order alternates, so neither peer always runs right after
  the other (whose worker threads may still be spinning). Call after warm-up.
  """
  if rounds < 1:
    raise ValueError(f'rounds={rounds} must be at least 1.')
  ratios = []
  for round_index in range(rounds):
    ms = {}
    order = (('ours', ours), ('peer', peer))
    for name, fn in order if round_index % 2 == 0 else order[::-1]:
      start = time.perf_counter()
      sync(fn())
      ms[name] = time.perf_counter() - start
    ratios.append(ms['ours'] / ms['peer'])
  return PairedRatio.of(ratios)


@dataclasses.dataclass(frozen=True)
class Compiled:
  """An ahead-of-time compiled function and what XLA says about it."""
  fn: Callable[..., Any]
  compile_s: float  # wall seconds of lowering + compilation
  compile_cpu_s: float  # CPU seconds of this process meanwhile: hardly moved by host load
  flops: float  # XLA cost analysis; while-loop bodies count once


def compile_with_stats(jitted: Any, *args: Any,
                       compiler_options: Mapping[str, Any] | None = None) -> Compiled:
  """`jitted.lower(*args).compile(compiler_options)`, timed, with XLA's flop count.

  `compiler_options`: XLA debug options for this compilation only, e.g.
  `{'xla_backend_optimization_level': 1}` (the same as that XLA_FLAGS entry).
  """
  return timed_compile(
      lambda: jitted.lower(*args).compile(dict(compiler_options) if compiler_options else None))


def timed_compile(compile_fn: Callable[[], Any]) -> Compiled:
  """`compile_fn()` (lowering and compiling), timed, with XLA's flop count."""
  start, start_cpu = time.perf_counter(), time.process_time()
  compiled = compile_fn()
  return Compiled(compiled, time.perf_counter() - start, time.process_time() - start_cpu,
                  cost_flops(compiled))


def cost_flops(compiled: Any) -> float:
  """Flops from `compiled.cost_analysis()` (a dict, or a list of one per module)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    return float(sum(a.get('flops', 0.0) for a in analysis))
  return float((analysis or {}).get('flops', 0.0))


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_lines() -> list[str]:
  """The host and the moment: CPU, cores, load average, accelerator, versions, date, and
  glibc's malloc tunables."""
  load = ', '.join(f'{x:.2f}' for x in os.getloadavg())
  device = jax.devices()[0]
  return [
      f'- date: {datetime.datetime.now().astimezone().isoformat(timespec="seconds")}',
      f'- CPU: {cpu_model()}, {os.cpu_count()} cores; load average (1, 5, 15 min) at start: '
      f'{load}',
      f'- JAX {jax.__version__}, backend {jax.default_backend()} ({device.device_kind}), '
      f'{jax.device_count()} device(s)',
      f'- GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES", "")!r} (the launch scripts add '
      "glibc.malloc.hugetlb=1, e2e_vlp/host_memory.py; the benchmarks don't: README)",
  ]


def host_load() -> float:
  """The 1-minute load average. Read it before a table's measurements: they raise it
  themselves (a benchmark on 2 cores ends near load 2)."""
  return os.getloadavg()[0]


def load_note(load: float) -> str:
  """The caveat every CPU table carries when the host is shared; `load` from `host_load()`
  before the table's measurements."""
  cores = os.cpu_count() or 1
  if load <= 0.5 * cores:
    return f'Host load average {load:.1f} on {cores} cores at the start of this table.'
  return (f'Host load average {load:.1f} on {cores} cores: the machine is shared and busy, '
          'so absolute times are inflated and noisy; ratios between peers measured in the '
          'same run (each table says how: interleaved or back to back) are the meaningful '
          'figures.')


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
  lines += ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]
  return '\n'.join(lines)


def target_line(what: str, value: float, limit: float, *, at_most: bool, unit: str = 'x'
                ) -> str:
  """'target met' / 'target NOT reached' line for `value` against `limit`."""
  ok = value <= limit if at_most else value >= limit
  sign = '<=' if at_most else '>='
  status = 'met' if ok else '**NOT reached**'
  return f'- target {what} {sign} {limit:g}{unit}: {value:.2f}{unit}, {status}'


# The backbone stem's two forms (config.model.backbone fields; e2e_vlp/models/resnet.py):
# XLA's own convolution and max-pool, or the forms XLA:CPU runs faster.
STEM_FORMS = {'xla': {'stem_conv': 'conv', 'max_pool': 'reduce_window'},
              'cpu': {'stem_conv': 'row_fold', 'max_pool': 'unrolled'}}


# ---- the project's train step, built the way launch/train.py builds it ---------------


@dataclasses.dataclass
class StepRunner:
  """A jitted, donated train step and the state it advances; `()` runs one step."""
  step: Compiled
  state: Any
  batch: dict[str, jax.Array]

  def __call__(self) -> Any:
    self.state, metrics = self.step.fn(self.state, self.batch)
    return metrics


def make_step_runner(config: Any, init_variables: Callable[[jax.Array], Any],
                     loss_fn: Callable[..., Any], batch: Mapping[str, np.ndarray], *,
                     frozen_grads: bool = False, overlap_init: bool = False) -> StepRunner:
  """The training step exactly as e2e_vlp/train/loop.py builds it, compiled on `batch`.

  Mesh from `config.mesh`, rules from `config.sharding`, `plan_train_state` (optimizer,
  shardings), `create_train_state`, `make_train_step` (grad accumulation, seed,
  `frozen=frozen_mask(config.optim)`) and `jit_train_step` (state donated).
  `loss_fn(params, constants, batch, rng) -> (loss, metrics)`. `frozen_grads=True` passes
  no frozen mask: the step then computes the frozen parameters' gradients too (for the
  optimizer to discard), as the project's step did before the mask, to show its cost.
  XLA compiles it with the loop's options (`config.train.cpu_backend_optimization_level` on
  CPU). `overlap_init=True` compiles the step from the abstract state on a worker thread
  while the state initialises, as the loop does; the compile's wall and CPU time then
  include the initialisation's share, so the CPU tables (whose compile time is a target)
  build the two one after the other.
  """
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = sharding.logical_axis_rules(config.sharding)
  spec = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}
  tx, schedule, abstract, shardings = state_lib.plan_train_state(
      init_variables, config.optim, config.train.total_steps, mesh, rules)
  frozen = None if frozen_grads else optimizer_lib.frozen_mask(config.optim, abstract.params)
  step = state_lib.make_train_step(loss_fn, tx, schedule,
                                   grad_accum_steps=config.optim.grad_accum_steps,
                                   seed=config.train.seed, frozen=frozen)
  compile_args = (step, shardings, mesh, rules, abstract, spec, config.train)
  compile_step = lambda: timed_compile(lambda: state_lib.compile_train_step(*compile_args))
  with (state_lib.in_background(compile_step) if overlap_init
        else contextlib.nullcontext()) as compiling:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      start = time.perf_counter()
      state = jax.block_until_ready(state_lib.create_train_state(
          init_variables, tx, jax.random.key(config.train.seed), shardings))
      progress(f'train state initialised (its compilation included) in '
               f'{time.perf_counter() - start:.1f} s')
      device_batch = mesh_lib.global_batch(batch, mesh)
    compiled = compiling.result() if compiling else compile_step()
  progress(f'step compiled in {compiled.compile_s:.1f} s wall, {compiled.compile_cpu_s:.1f} s '
           f'CPU{" (overlapping the initialisation)" if overlap_init else ""}')
  return StepRunner(compiled, state, device_batch)
