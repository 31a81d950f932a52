"""The train state, created directly in its sharded layout, and the jitted update step.

Shardings come from the logical axis names the model puts on its parameters
(`jax.eval_shape` of the init: nothing is materialised to find them), mapped to the mesh by
the strategy's rules. The whole state, step counter included, is created by one
`jax.jit(init, out_shardings=...)`, so no leaf ends up on a single device.
"""

import concurrent.futures
import contextlib
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from e2e_vlp.train import mesh as mesh_lib
from e2e_vlp.train import optimizer as optimizer_lib

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32, batches consumed (skipped updates included)
  params: Any  # trainable parameters
  constants: Any  # non-trainable variables, e.g. {'batch_stats': frozen BatchNorm}
  opt_state: Any
  skipped: jax.Array  # [] int32, updates skipped because loss or gradients were not finite


def strip_boxes(tree: Any) -> Any:
  """Unboxes logical-partitioning metadata without adding sharding constraints.

  (`nn.meta.unbox` constrains each value to its sharding, which needs a traced value.)
  """
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False)
                      if isinstance(x, nn.meta.AxisMetadata) else x,
                      tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def split_variables(variables: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
  variables = dict(variables)
  return variables.pop('params'), variables


def state_shardings(init_variables: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                    mesh: Mesh, rules) -> tuple[TrainState, TrainState]:
  """(abstract state, shardings) from the logical names of `init_variables(rng)`'s output."""
  return _abstract_and_shardings(jax.eval_shape(init_variables, jax.random.key(0)), tx, mesh,
                                 rules)


class TrainStatePlan(NamedTuple):
  """What a run needs before it materialises anything: the optimizer and the state's layout."""
  tx: optimizer_lib.GuardedTransformation
  schedule: optax.Schedule  # the learning rate at each step, for logging
  abstract: TrainState  # shapes and dtypes only (`jax.ShapeDtypeStruct` leaves)
  shardings: TrainState  # `NamedSharding` per leaf


def plan_train_state(init_variables: Callable[[jax.Array], Any], optim: Any, total_steps: int,
                     mesh: Mesh, rules) -> TrainStatePlan:
  """`make_optimizer(optim)` over `init_variables`' parameters and the train state's abstract
  value and shardings under `mesh` and `rules`: the set-up shared by the training loop, the
  benchmarks and the tests (one abstract trace of the init serves both).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init_variables, jax.random.key(0))
    tx, schedule = optimizer_lib.make_optimizer(optim, strip_boxes(boxed)['params'],
                                                total_steps)
    return TrainStatePlan(tx, schedule, *_abstract_and_shardings(boxed, tx, mesh, rules))


def _abstract_and_shardings(boxed: Any, tx: optax.GradientTransformation, mesh: Mesh, rules
                            ) -> tuple[TrainState, TrainState]:
  specs = nn.get_partition_spec(boxed)
  var_shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  variables = strip_boxes(boxed)
  params, constants = split_variables(variables)
  param_shardings, const_shardings = split_variables(var_shardings)
  opt_state = jax.eval_shape(tx.init, params)
  replicated = NamedSharding(mesh, P())
  opt_shardings = optax.tree_utils.tree_map_params(
      tx, lambda _, s: s, opt_state, param_shardings,
      transform_non_params=lambda _: replicated)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        constants=constants, opt_state=opt_state,
                        skipped=jax.ShapeDtypeStruct((), jnp.int32))
  shardings = TrainState(step=replicated, params=param_shardings, constants=const_shardings,
                         opt_state=opt_shardings, skipped=replicated)
  return abstract, shardings


def create_train_state(init_variables: Callable[[jax.Array], Any],
                       tx: optax.GradientTransformation, rng: jax.Array,
                       shardings: TrainState) -> TrainState:
  """Initialises parameters and optimizer state in place on the mesh."""

  def init(rng):
    params, constants = split_variables(nn.meta.unbox(init_variables(rng)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, constants=constants,
                      opt_state=tx.init(params), skipped=jnp.zeros((), jnp.int32))

  return jax.jit(init, out_shardings=shardings)(rng)


def _microbatches(batch: Mapping[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """[B, ...] -> [k, B/k, ...] taking every k-th row, so each device keeps its own rows."""
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
  return {key: split(value) for key, value in batch.items()}


def _stop_frozen_gradients(loss_fn: LossFn, frozen: Any) -> LossFn:
  """`loss_fn` seeing the `frozen` (True) parameters as constants of autodiff."""
  def wrapped(params, *args):
    params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
    return loss_fn(params, *args)
  return wrapped


def make_train_step(loss_fn: LossFn, tx: optimizer_lib.GuardedTransformation,
                    schedule: optax.Schedule, *, grad_accum_steps: int = 1,
                    seed: int = 0, frozen: Any = None
                    ) -> Callable[[TrainState, dict[str, jax.Array]],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """`step(state, batch) -> (state, metrics)`; jit it with the state's shardings.

  `loss_fn(params, constants, batch, rng) -> (loss, metrics)`. `tx` (from
  `optimizer.make_optimizer`, or any optax transformation wrapped by
  `optimizer.keep_state_unless_finite`) takes `finite=` in its update. The dropout key is
  derived from the seed and the step, so a resumed run draws exactly the same randomness. A step
  whose loss or gradients are not finite leaves parameters and optimizer state unchanged
  and increments `state.skipped`.

  `frozen` (`optimizer.frozen_mask`: bools shaped like the params, or None) marks
  parameters the optimizer never moves. They enter the loss through `lax.stop_gradient`,
  so XLA drops their backward pass (PyTorch's requires_grad=False), e.g. through DETR's
  frozen ResNet stem and stage 1. Their gradients are exact zeros, so they no longer count
  in the `grad_norm` metric or its finiteness check (the optimizer ignored them already).
  """
  if not isinstance(tx, optimizer_lib.GuardedTransformation):
    raise TypeError(f'make_train_step got a {type(tx).__name__}; it needs an optimizer whose '
                    'update takes finite= (the non-finite guard): optimizer.make_optimizer, '
                    'or wrap it in optimizer.keep_state_unless_finite.')
  base_key = jax.random.key(seed)
  if frozen is not None:
    loss_fn = _stop_frozen_gradients(loss_fn, frozen)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def compute_grads(params, constants, batch, rng):
    if grad_accum_steps == 1:
      return grad_fn(params, constants, batch, rng)

    def body(carry, inputs):
      micro, index = inputs
      out = grad_fn(params, constants, micro, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, carry, out), None

    zeros = jax.eval_shape(grad_fn, params, constants,
                           jax.tree.map(lambda x: x[0], _microbatches(batch, grad_accum_steps)),
                           rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
    total, _ = jax.lax.scan(body, zeros, (_microbatches(batch, grad_accum_steps),
                                          jnp.arange(grad_accum_steps)))
    return jax.tree.map(lambda x: x / grad_accum_steps, total)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(base_key, state.step)
    (loss, metrics), grads = compute_grads(state.params, state.constants, batch, rng)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # The optimizer keeps its own state where not `finite` (optimizer.make_optimizer).
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params, finite=finite)
    new_params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1,
        params=optimizer_lib.where_finite(finite, new_params, state.params),
        opt_state=new_opt_state,
        skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                   learning_rate=schedule(state.step), nonfinite=(~finite).astype(jnp.int32))
    return new_state, metrics

  return step


def jit_train_step(step, shardings: TrainState, mesh: Mesh, batch_spec: Mapping[str, Any]):
  """The step jitted with explicit in/out shardings and the state donated."""
  batch_shardings = {k: mesh_lib.batch_sharding(mesh, len(v.shape)) for k, v in batch_spec.items()}
  return jax.jit(step, in_shardings=(shardings, batch_shardings),
                 out_shardings=(shardings, NamedSharding(mesh, P())),
                 donate_argnums=(0,))


def compile_train_step(step, shardings: TrainState, mesh: Mesh, rules: Any,
                       abstract_state: TrainState, batch_spec: Mapping[str, Any],
                       train_config: Any) -> Any:
  """`jit_train_step(step, ...)` compiled for the abstract state and batch with
  `compiler_options(train_config, backend)`. It enters the mesh and the logical axis rules
  itself (both are per thread), so it may run on a worker thread (`in_background`)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jitted = jit_train_step(step, shardings, mesh, batch_spec)
    # The jit's in_shardings place the abstract arguments.
    return jitted.lower(abstract_state, batch_spec).compile(
        compiler_options(train_config, jax.default_backend()))


@contextlib.contextmanager
def in_background(fn: Callable[..., Any], *args: Any) -> Iterator[concurrent.futures.Future]:
  """`fn(*args)` on a worker thread while the body runs; yields its future.

  For compiling the step while the state initialises: XLA compiles without the GIL, so the
  two take the longer of their times rather than the sum. An error in the body is raised at
  once, without waiting for `fn`.
  """
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='compile')
  try:
    yield pool.submit(fn, *args)
  finally:
    pool.shutdown(wait=False)


def compiler_options(train_config: Any, backend: str) -> dict[str, Any] | None:
  """XLA options for compiling the train step on `backend`: on CPU only,
  `train.cpu_backend_optimization_level` (LLVM's level for XLA's generated kernels) and
  `train.cpu_ynn_fusion_types` (which operations YNNPACK runs)."""
  if backend != 'cpu':
    return None
  options = {}
  if train_config.cpu_backend_optimization_level >= 0:
    options['xla_backend_optimization_level'] = train_config.cpu_backend_optimization_level
  if train_config.cpu_ynn_fusion_types != YNN_XLA_DEFAULT:
    options['xla_cpu_experimental_ynn_fusion_type'] = ','.join(
        'LIBRARY_FUSION_TYPE_' + kind.upper()
        for kind in ynn_fusion_types(train_config.cpu_ynn_fusion_types))
  return options or None


YNN_FUSION_TYPES = ('individual_dot', 'individual_convolution', 'dot', 'eltwise', 'reduce')
YNN_XLA_DEFAULT = 'default'  # train.cpu_ynn_fusion_types value: leave XLA's choice


def ynn_fusion_types(value: str) -> list[str]:
  """The kinds named in `train.cpu_ynn_fusion_types` ('a,b'; '' none)."""
  return [kind.strip() for kind in value.split(',') if kind.strip()]
