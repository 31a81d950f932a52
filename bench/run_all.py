"""Runs every benchmark table, prints it and writes bench/RESULTS.md.

Each section runs in its own process (`run_all.py --section NAME`), so thread pools,
memory and environment settings of one benchmark cannot leak into the next; RESULTS.md
is rewritten after every section, so an interrupted run keeps what it measured. A run of
every section replaces the file; a partial run (`--only`) appends its sections under a
header of its own, so the tables of earlier runs stay next to the new ones.

Sections: matcher (bench/matcher.py's solvers at B=64), detr (bench/detr_step.py), convs
(bench/conv_ops.py: the DETR backbones' convolutions op by op), pretrain
(bench/pretrain_step.py), decoding (bench/decoding.py), input (bench/input_pipeline.py),
and with --finetune bench/finetune_comparison.py (slow).
Each states whether the issue's targets are reached.

Usage: python bench/run_all.py [--quick] [--finetune] [--only detr,pretrain] [--out FILE]
"""

import argparse
import os
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))

SECTIONS = ('matcher', 'detr', 'convs', 'pretrain', 'decoding', 'input')
MATCHER_BATCH = 64
MATCHER_TARGET_SIZE = (100, 50)  # (queries, boxes) of the targets
INPUT_TARGET = 3.0  # pipeline examples/s >= 3x the tiny step's


def matcher_section(quick: bool) -> str:
  """bench/matcher.py's solvers, timed with its own helpers, plus the issue's targets."""
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from bench import common  # noqa: PLC0415
  from bench import matcher  # noqa: PLC0415
  from e2e_vlp.losses import matching  # noqa: PLC0415

  load = common.host_load()
  sizes = (MATCHER_TARGET_SIZE,) if quick else tuple(matcher.SIZES)
  if MATCHER_TARGET_SIZE not in sizes:
    sizes += (MATCHER_TARGET_SIZE,)
  repeats = 10  # cheap at 100x50, and the 1.0x target needs a stable median
  rng = np.random.default_rng(0)
  fns = matcher.solvers()
  cells = {name: [] for name in fns}
  verdicts = []
  for num_queries, max_boxes in sizes:
    cost, valid = matcher.detr_like_problem(rng, MATCHER_BATCH, num_queries, max_boxes)
    results = matcher.time_all(fns, cost, valid, repeats)
    reference = np.asarray(matching.total_cost(cost, jnp.asarray(
        results['scipy loop (DETR)'][1])))
    for name, (_, out) in results.items():
      total = np.asarray(matching.total_cost(cost, jnp.asarray(out)))
      if not np.allclose(total, reference, rtol=1e-5, atol=1e-4):
        raise AssertionError(f'{name} found a different total cost at {num_queries}x'
                             f'{max_boxes}.')
    loop_ms = results['scipy loop (DETR)'][0]
    for name, (ms, _) in results.items():
      cells[name].append(f'{ms:.1f} ({ms / loop_ms:.2f}x)')
    if (num_queries, max_boxes) == MATCHER_TARGET_SIZE:
      public = min(('optax, vmap', 'optax, lax.map'), key=lambda n: results[n][0])
      for ours in ('e2e_vlp match (hungarian)', 'e2e_vlp match (scipy)'):
        ms = results[ours][0]
        verdicts.append(common.target_line(f'{ours} / scipy loop', ms / loop_ms, 1.0,
                                           at_most=True))
        verdicts.append(common.target_line(f'{ours} / fastest public JAX ({public})',
                                           ms / results[public][0], 0.5, at_most=True))
  headers = ['solver'] + [f'{q}x{m} ms (vs scipy loop)' for q, m in sizes]
  return '\n'.join([
      f'## Hungarian matcher, batch {MATCHER_BATCH} (bench/matcher.py solvers)', '',
      common.load_note(load), '',
      common.markdown_table(headers, [[name] + c for name, c in cells.items()]), '',
      f'Median of {repeats} interleaved runs after warm-up; all solvers found the same total '
      'cost on every example.', ''] + verdicts)


def pipeline_verdict(table: str) -> str:
  """The target line for input_pipeline.py's table: its 'tiny 96' / 'pretrain train' row's
  examples/s against the training step's examples/s in the same row."""
  from bench import common  # noqa: PLC0415
  for line in table.splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) >= 8 and cells[:2] == ['tiny 96', 'pretrain train']:
      try:
        ratio = float(cells[3]) / float(cells[7])
      except ValueError:
        break
      return common.target_line('pipeline examples/s / tiny train step examples/s', ratio,
                                INPUT_TARGET, at_most=False)
  return ('- target pipeline >= 3x the tiny step: not evaluated (no numeric "tiny 96 | '
          'pretrain train" row in the table)')


def input_section(quick: bool) -> str:
  """bench/input_pipeline.py's table and the pipeline-vs-consumption target at tiny."""
  from bench import common  # noqa: PLC0415
  command = [sys.executable, os.path.join(BENCH, 'input_pipeline.py')]
  load = common.host_load()
  out = _run(command + (['--quick'] if quick else [])).strip()
  return '\n'.join(['## Input pipeline vs the training step (bench/input_pipeline.py)', '',
                    common.load_note(load), '', out, '', pipeline_verdict(out)])


def finetune_section(quick: bool) -> str:
  script = os.path.join(BENCH, 'finetune_comparison.py')
  if not os.path.exists(script):
    return '## Fine-tuning comparison\n\nbench/finetune_comparison.py does not exist yet.'
  # Its own short version (it has no --quick): a few steps on a small corpus.
  short = ['--pretrain_steps', '20', '--steps', '20', '--train_images', '512']
  out = _run([sys.executable, script] + (short if quick else []))
  return '## Fine-tuning comparison (bench/finetune_comparison.py)\n\n' + out.strip()


def section(name: str, quick: bool) -> str:
  if name == 'matcher':
    return matcher_section(quick)
  if name == 'input':
    return input_section(quick)
  if name == 'finetune':
    return finetune_section(quick)
  module = {'detr': 'detr_step', 'convs': 'conv_ops', 'pretrain': 'pretrain_step',
            'decoding': 'decoding'}[name]
  return __import__(f'bench.{module}', fromlist=['run']).run(quick)


def _run(command: list[str]) -> str:
  """stdout of `command`; its stderr is shown only if it fails."""
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f'{" ".join(command)} exited with {result.returncode}:\n'
                       f'{result.stderr[-3000:]}')
  return result.stdout


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='short version of every table')
  parser.add_argument('--finetune', action='store_true',
                      help='also run bench/finetune_comparison.py (slow)')
  parser.add_argument('--only', default='', help=f'comma-separated subset of {SECTIONS}')
  parser.add_argument('--out', default=os.path.join(BENCH, 'RESULTS.md'))
  parser.add_argument('--section', default='', help=argparse.SUPPRESS)  # a child process
  args = parser.parse_args()
  if args.section:
    print(section(args.section, args.quick))
    return

  names = [n for n in args.only.split(',') if n] or list(SECTIONS)
  unknown = set(names) - set(SECTIONS)
  if unknown:
    raise SystemExit(f'Unknown sections {sorted(unknown)}; choose from {SECTIONS}.')
  if args.finetune:
    names.append('finetune')
  from bench import common  # noqa: PLC0415
  partial = bool(args.only)
  earlier = _read(args.out) if partial else ''
  title = '# Partial benchmark run' if partial else '# Benchmark results'
  header = [title, ''] + common.machine_lines() + [
      f'- command: `python bench/run_all.py{" --quick" if args.quick else ""}'
      f'{" --finetune" if args.finetune else ""}{" --only " + args.only if args.only else ""}`',
      '- Every figure is a ratio against a peer measured in the same run on this machine '
      '(medians over interleaved repeats after warm-up, `block_until_ready`). On a shared, '
      'loaded host the absolute times are inflated; the ratios are the result.', '']
  parts = ['\n'.join(header)]
  for name in names:
    start = time.perf_counter()
    command = [sys.executable, os.path.abspath(__file__), '--section', name]
    try:
      text = _run(command + (['--quick'] if args.quick else [])).strip()
    except RuntimeError as error:
      text = f'## {name}: FAILED\n\n```\n{error}\n```'
    text += f'\n\n({name}: {time.perf_counter() - start:.0f} s)'
    print(text + '\n', flush=True)
    parts.append(text)
    with open(args.out, 'w') as f:
      f.write(earlier + '\n\n'.join(parts) + '\n')
  print(f'{"Appended to" if earlier else "Wrote"} {args.out}')


def _read(path: str) -> str:
  """The file's text, ending in a blank line before what is appended ('' if none)."""
  if not os.path.exists(path):
    return ''
  with open(path) as f:
    text = f.read().rstrip('\n')
  return text + '\n\n' if text else ''


if __name__ == '__main__':
  main()
