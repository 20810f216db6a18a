"""Per-example gradient norms without per-example gradients of the whole model, for DP-SGD clipping.

DP-SGD needs ||d loss_i / d params|| for every example i. `vmap(grad)` materialises every example's gradient
of every weight; for convolutions XLA turns that into grouped convolutions that are several times slower than
a normal step. Here each supported layer (Flax `nn.Dense`, `nn.Conv` of any rank and group count,
`nn.GroupNorm`, `nn.LayerNorm`, `nn.Embed`) records its input `a` and gets a zero perturbation added to its
output; one `jax.vjp` of the losses with respect to the perturbations only (no weight gradients) gives every
layer's per-example output gradient `g`. A linear layer's per-example kernel gradient is `sum_t a_t^T g_t`
over its positions t (Goodfellow 2015, arXiv:1510.01799); a convolution is the same matmul over output
positions, one per kernel tap (the unfolded input). Its squared norm is either computed from that gradient
tensor or, when T positions are few, as `sum_{t,s} (a_t . a_s)(g_t . g_s)` without forming it ("ghost
norm", Li et al. 2022, arXiv:2110.05679; Bu et al. 2023, arXiv:2210.00038), chosen per layer from static
shapes. Norm layers' per-example scale/bias gradients are small (B, C) and come from a per-example vjp of
the layer alone.

Coverage is checked at trace time on the model's jaxpr: every parameter leaf must reach the losses only
through supported layers (a parameter used elsewhere, e.g. a ViT position embedding, or by an unknown
module raises `UnsupportedModel` naming the leaves, and the caller falls back to `vmap(grad)`). A module
called several times (shared weights) is handled: its calls' positions are pooled before the norm.
Examples must not interact (no batch norm in training mode); axis 0 of every layer input is the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes as flax_dtypes
from flax.linen import linear as flax_linear
from jax import lax

PyTree = Any

# Call-like primitives whose inner jaxpr maps inputs to outputs one to one, so dependencies are followed inside;
# any other primitive with a body (scan, while, cond) counts every output as depending on every input.
_CALL_PRIMITIVES = frozenset({"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint",
                              "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
_KINDS = {nn.Dense: "dense", nn.Conv: "conv", nn.GroupNorm: "norm", nn.LayerNorm: "norm", nn.Embed: "embed"}
_LIFTED = ("a lifted transform (nn.remat, nn.scan, nn.vmap, nn.jit) or a vmap, where activations cannot be "
           "recorded; build the model without it.")
_HIGHEST = lax.Precision.HIGHEST  # per-example norms bound the clipped sensitivity: no TF32 rounding


class UnsupportedModel(ValueError):
  """The model has parameters that `grad_norms` cannot cover exactly (raised at trace time); the message
  names the parameter paths. Callers fall back to `vmap(grad)`."""


@dataclasses.dataclass
class _Call:
  """One call of a supported layer, as seen at trace time."""
  kind: str
  path: str                      # module scope path, "stage1_block0/conv1"
  module: nn.Module              # unbound clone: configuration, and `apply` for norm layers
  param_names: Tuple[str, ...]
  out_shape: Tuple[int, ...] = ()
  out_dtype: Any = None
  perturb: bool = True           # False when none of its parameters are in `params` (frozen, closed over)


@dataclasses.dataclass
class _State:
  """What one traced run of the model records. mode "cut": supported layers return zeros (so the jaxpr shows
  which parameters reach the losses other than through them); mode "perturb": they return y + eps[k]."""
  mode: str
  eps: Optional[Sequence[Any]] = None
  plan: Optional[Sequence[_Call]] = None
  calls: List[_Call] = dataclasses.field(default_factory=list)
  inputs: List[Any] = dataclasses.field(default_factory=list)
  outputs: List[Any] = dataclasses.field(default_factory=list)
  params: List[Any] = dataclasses.field(default_factory=list)


def _module_path(module: nn.Module) -> str:
  scope = module.scope
  return "/".join(scope.path) if scope is not None and scope.path else type(module).__name__


def _check_layer(module: nn.Module, kind: str, path: str, x: Any, kwargs: Dict[str, Any]) -> None:
  """Raises UnsupportedModel for layer options the norm formulas do not cover."""
  def refuse(why):
    raise UnsupportedModel(f"grad_norms: layer {path!r} ({type(module).__name__}) is not supported: {why}.")

  if kind in ("dense", "conv", "embed") and module.promote_dtype is not flax_dtypes.promote_dtype:
    refuse("custom promote_dtype")
  if kind == "dense" and (module.dot_general is not None or module.dot_general_cls is not None):
    refuse("custom dot_general")
  if kind == "conv":
    if module.mask is not None:
      refuse("a kernel mask")
    if module.conv_general_dilated is not None or module.conv_general_dilated_cls is not None:
      refuse("custom conv_general_dilated")
    nd = 1 if isinstance(module.kernel_size, int) else len(module.kernel_size)
    if x.ndim != nd + 2:
      refuse(f"input rank {x.ndim}, expected exactly one batch axis (B, {nd} spatial axes, C)")
  if kind == "norm":
    if kwargs.get("mask") is not None:
      refuse("a mask argument")
    if module.axis_name is not None:
      refuse(f"cross-device statistics (axis_name={module.axis_name!r})")
    fields = [getattr(module, f, None) for f in ("reduction_axes", "feature_axes")]
    if any(int(a) % x.ndim == 0 for v in fields if v is not None for a in np.atleast_1d(v)):
      refuse("statistics or features over the batch axis 0")
  if x.ndim < (1 if kind == "embed" else 2):
    refuse(f"input shape {tuple(x.shape)} has no batch axis")


def _interceptor(state: _State) -> Callable:
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
      use_avg = nn.merge_param("use_running_average", module.use_running_average,
                               kwargs.get("use_running_average", args[1] if len(args) > 1 else None))
      if not use_avg:
        raise UnsupportedModel(f"grad_norms: BatchNorm {_module_path(module)!r} in training mode mixes "
                               f"examples; per-example gradients are undefined (use group/instance norm).")
    kind = _KINDS.get(type(module))
    if kind is None or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = _module_path(module)
    x = args[0] if args else next(iter(kwargs.values()))
    _check_layer(module, kind, path, x, kwargs)
    y = next_fun(*args, **kwargs)
    params = dict(module.variables.get("params", {}))
    k = len(state.calls)
    state.calls.append(_Call(kind, path, module.clone(parent=None), tuple(sorted(params)), tuple(y.shape),
                             y.dtype))
    state.inputs.append(x)
    state.outputs.append(y)
    state.params.append(params)
    if state.mode == "cut":
      return jnp.zeros_like(y)
    if state.plan is None or k >= len(state.plan) or state.plan[k].path != path:
      raise ValueError(f"grad_norms: the model called layer {path!r} as call {k}, unlike its first trace; "
                       f"per_example_loss must trace the same layers in the same order every time.")
    return y + state.eps[k] if state.plan[k].perturb else y
  return intercept


def _run(per_example_loss: Callable, params: PyTree, state: _State):
  with nn.intercept_methods(_interceptor(state)):
    return per_example_loss(params)


def _leaf_names(params: PyTree) -> List[str]:
  return [jax.tree_util.keystr(path, simple=True, separator="/")
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _sub_jaxpr(eqn) -> Optional[jcore.Jaxpr]:
  if eqn.primitive.name not in _CALL_PRIMITIVES:
    return None
  for value in eqn.params.values():
    inner = value.jaxpr if isinstance(value, jcore.ClosedJaxpr) else value
    if isinstance(inner, jcore.Jaxpr) and len(inner.invars) == len(eqn.invars) \
        and len(inner.outvars) == len(eqn.outvars):
      return inner
  return None


def _dependencies(jaxpr: jcore.Jaxpr, in_deps: Sequence[int]) -> List[int]:
  """For each output of `jaxpr`, the bit set (int) of inputs it depends on, given the inputs' bit sets."""
  env: Dict[Any, int] = dict(zip(jaxpr.invars, in_deps))

  def read(v):
    return 0 if isinstance(v, jcore.Literal) else env.get(v, 0)

  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    inner = _sub_jaxpr(eqn)
    if inner is not None:
      outs = _dependencies(inner, ins)
    else:
      outs = [functools.reduce(operator.or_, ins, 0)] * len(eqn.outvars)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _bits(mask: int) -> List[int]:
  return [i for i in range(mask.bit_length()) if mask >> i & 1]  # indices of the leaves in a dependency set


def _analyse(per_example_loss: Callable, params: PyTree) -> Tuple[List[_Call], int]:
  """Traces the model once with every supported layer's output cut, and checks that each parameter leaf
  reaches the losses only through one supported module. Returns the calls and the batch size B."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  names = _leaf_names(params)
  state = _State("cut")

  def cut(leaves):
    losses = _run(per_example_loss, treedef.unflatten(leaves), state)
    return losses, state.inputs, state.outputs

  avals = [jax.ShapeDtypeStruct(np.shape(leaf), jnp.result_type(leaf)) for leaf in leaves]
  try:
    closed = jax.make_jaxpr(cut)(avals)
  except jax.errors.UnexpectedTracerError as e:  # a layer inside a vmap / lifted transform leaked its input
    raise UnsupportedModel(f"grad_norms: {_LIFTED} {str(e).splitlines()[0]}") from None
  losses_shape = closed.out_avals[0].shape
  if len(losses_shape) != 1:
    raise ValueError(f"grad_norms: per_example_loss must return per-example losses of shape (B,), got "
                     f"{tuple(losses_shape)}.")
  batch = losses_shape[0]
  calls = state.calls
  n = len(calls)
  deps = _dependencies(closed.jaxpr, [1 << i for i in range(len(leaves))])
  loss_deps, in_deps, out_deps = deps[0], deps[1:1 + n], deps[1 + n:1 + 2 * n]

  # A layer's output is always computed in this trace, so it is an equation's output here; one that is not
  # escaped from an inner trace (nn.remat, nn.scan, nn.jit bodies), where its activations cannot be recorded.
  defined = {v for eqn in closed.jaxpr.eqns for v in eqn.outvars}
  lifted = [c.path for c, v in zip(calls, closed.jaxpr.outvars[1 + n:]) if v not in defined]
  if lifted:
    raise UnsupportedModel(f"grad_norms: layers {lifted} run inside {_LIFTED}")
  problems = []
  if loss_deps:
    problems.append("used outside a supported layer (Dense, Conv, GroupNorm, LayerNorm, Embed): "
                    + ", ".join(names[i] for i in _bits(loss_deps)))
  owner: Dict[int, str] = {}
  for call, din, dout in zip(calls, in_deps, out_deps):
    if din:
      problems.append(f"used to compute the input of layer {call.path!r}: "
                      + ", ".join(names[i] for i in _bits(din)))
    if call.out_shape[:1] != (batch,):
      problems.append(f"layer {call.path!r} has output shape {call.out_shape}, whose axis 0 is not the batch "
                      f"of {batch}")
    own = _bits(dout & ~din)
    call.perturb = bool(own)
    if own and len(own) != len(call.param_names):
      problems.append(f"layer {call.path!r} has parameters {list(call.param_names)} but only "
                      f"{[names[i] for i in own]} are in params (partly frozen layer)")
    for i in own:
      if owner.setdefault(i, call.path) != call.path:
        problems.append(f"{names[i]} feeds two layers, {owner[i]!r} and {call.path!r}")
  if problems:
    raise UnsupportedModel("grad_norms cannot cover every parameter: " + "; ".join(problems) + ".")
  return calls, batch


# ------------------------------------------------------------------------------------------- per-layer norms


def _conv_taps(module: nn.Conv, x, kernel_shape) -> List[jax.Array]:
  """The input seen by each kernel tap of a Flax `nn.Conv` call (padding, strides and both dilations as the
  layer applies them): `prod(k)` arrays `(B, T, C)`, T the output positions. A conv's kernel gradient is then
  one matmul over positions per tap; no `(B, T, C * prod(k))` patch tensor is formed (1.6x faster on CPU)."""
  nd = x.ndim - 2
  ksize = tuple(kernel_shape[:nd])

  def per_axis(v):
    return (1 if v is None else v,) * nd if v is None or isinstance(v, int) else tuple(v)

  strides, in_dil, k_dil = per_axis(module.strides), per_axis(module.input_dilation), per_axis(module.kernel_dilation)
  padding = flax_linear.canonicalize_padding(module.padding, nd)
  # Mirrors nn.Conv: these paddings are applied to the input, then the convolution is VALID.
  if padding in ("CIRCULAR", "REFLECT"):
    dilated = [(k - 1) * d + 1 for k, d in zip(ksize, k_dil)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
    padding = "VALID"
  elif padding == "CAUSAL":
    x = jnp.pad(x, [(0, 0), (k_dil[0] * (ksize[0] - 1), 0), (0, 0)])
    padding = "VALID"
  in_len = [(n - 1) * d + 1 for n, d in zip(x.shape[1:-1], in_dil)]
  span = [(k - 1) * d + 1 for k, d in zip(ksize, k_dil)]
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(in_len, span, strides, padding)
  x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(padding, in_dil)]
              + [(0, 0, 0)])
  out = [(n - s) // st + 1 for n, s, st in zip(x.shape[1:-1], span, strides)]
  taps = []
  for tap in np.ndindex(*ksize):
    start = [o * d for o, d in zip(tap, k_dil)]
    limit = [a + (n - 1) * st + 1 for a, n, st in zip(start, out, strides)]
    view = lax.slice(x, [0, *start, 0], [x.shape[0], *limit, x.shape[-1]], [1, *strides, 1])
    taps.append(view.reshape(x.shape[0], -1, x.shape[-1]))
  return taps


def _linear_sq(calls: Sequence[_Call], xs, gs, params, ghost: Optional[bool]):
  """Dense / Conv: per-example squared norm of the kernel and bias gradients `sum_t a_t^T g_t` (a conv: per
  tap, G channel groups), positions of all calls of the module pooled. (B,) float32."""
  module = calls[0].module
  kernel = params["kernel"]
  groups = module.feature_group_count if calls[0].kind == "conv" else 1
  taps, g_parts = [], []  # taps[c][o]: call c's input at tap o, (B, T_c, G, C_in / G)
  for call, x, g in zip(calls, xs, gs):
    b = x.shape[0]
    seen = module.dtype if module.dtype is not None else jnp.result_type(x, kernel.dtype)  # as the layer saw it
    x = x.astype(seen).astype(jnp.float32)
    views = _conv_taps(module, x, kernel.shape) if call.kind == "conv" else [x.reshape(b, -1, x.shape[-1])]
    taps.append([v.reshape(*v.shape[:2], groups, -1) for v in views])
    g_parts.append(g.astype(jnp.float32).reshape(b, taps[-1][0].shape[1], groups, -1))
  g = jnp.concatenate(g_parts, axis=1)
  _, t, _, f = g.shape
  num_taps, c = len(taps[0]), taps[0][0].shape[-1]
  sq = 0.0
  # The ghost norm costs ~T^2 (K_in + F) per example and group, the materialised gradient T K_in F.
  if (t * (num_taps * c + f) < num_taps * c * f) if ghost is None else ghost:
    gram = 0.0  # sum over taps of the position-by-position input inner products, (B, G, T, T)
    for o in range(num_taps):
      a = jnp.concatenate([call_taps[o] for call_taps in taps], axis=1)
      gram = gram + jnp.einsum("btgk,bsgk->bgts", a, a, precision=_HIGHEST)
    sq = jnp.sum(gram * jnp.einsum("btgf,bsgf->bgts", g, g, precision=_HIGHEST), axis=(1, 2, 3))
  else:
    for o in range(num_taps):
      grad = sum(jnp.einsum("btgk,btgf->bgkf", call_taps[o], gp, precision=_HIGHEST)
                 for call_taps, gp in zip(taps, g_parts))
      sq = sq + jnp.sum(jnp.square(grad), axis=(1, 2, 3))
  if "bias" in params:
    sq = sq + jnp.sum(jnp.square(jnp.sum(g, axis=1)), axis=(1, 2))
  return sq


def _embed_sq(calls: Sequence[_Call], xs, gs, params):
  """Embed: rows hit by several positions of one example add up; squared norm from index coincidences."""
  b = xs[0].shape[0]
  idx = jnp.concatenate([x.reshape(b, -1) for x in xs], axis=1)
  g = jnp.concatenate([g.astype(jnp.float32).reshape(b, -1, g.shape[-1]) for g in gs], axis=1)
  num = params["embedding"].shape[0]
  if idx.shape[1] < num:
    same = (idx[:, :, None] == idx[:, None, :]).astype(jnp.float32)
    return jnp.einsum("bts,bts->b", same, jnp.einsum("btd,bsd->bts", g, g, precision=_HIGHEST))
  rows = jnp.einsum("btv,btd->bvd", jax.nn.one_hot(idx, num, dtype=jnp.float32), g, precision=_HIGHEST)
  return jnp.sum(jnp.square(rows), axis=(1, 2))


def _norm_layer_sq(calls: Sequence[_Call], xs, gs, params):
  """GroupNorm / LayerNorm: per-example vjp of the layer alone w.r.t. its (C,) scale and bias, summed over
  calls, then squared. The layer's statistics are per example, so a batch of one reproduces it exactly."""
  total = None
  for call, x, g in zip(calls, xs, gs):
    def one(xi, gi, module=call.module):
      out, vjp = jax.vjp(lambda p: module.apply({"params": p}, xi[None]), params)
      return vjp(gi[None].astype(out.dtype))[0]
    grads = jax.vmap(one)(x, g)
    total = grads if total is None else jax.tree.map(operator.add, total, grads)
  return sum(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=tuple(range(1, v.ndim)))
             for v in jax.tree.leaves(total))


# ------------------------------------------------------------------------------------------------ public API


def grad_norms(per_example_loss: Callable[[PyTree], jax.Array], params: PyTree,
               *, ghost: Optional[bool] = None) -> Tuple[jax.Array, jax.Array]:
  """Per-example gradient L2 norms over all of `params`, without per-example gradients of the whole model.

  Args:
    per_example_loss: `params -> (B,) losses`; runs a Flax Linen model (any `model.apply(...)` inside) on a
      batch whose examples do not interact (no batch norm in training mode). Axis 0 of every layer input is
      the batch. Traced twice (a jaxpr for the coverage check, then the forward); call it inside jit.
    params: the pytree differentiated; parameters the model reads from elsewhere count as constants.
    ghost: force the ghost-norm (True) or materialised (False) kernel norm in every Dense/Conv; None picks per
      layer from static shapes (the cheaper one).

  Returns:
    `(norms, losses)`: `norms` (B,) float32, `||d loss_i / d params||_2`; `losses` (B,) float32, the
    per-example losses.

  Raises:
    UnsupportedModel: at trace time, naming the parameter paths that are used outside a supported layer
      (Dense, Conv with any group count, GroupNorm, LayerNorm, Embed), by two layers, or by an unsupported
      layer option; the caller then falls back to `vmap(grad)`.
  """
  plan, batch = _analyse(per_example_loss, params)
  active = [k for k, call in enumerate(plan) if call.perturb]
  eps0 = {k: jnp.zeros(plan[k].out_shape, plan[k].out_dtype) for k in active}

  def perturbed(eps):
    state = _State("perturb", eps=eps, plan=plan)
    losses = _run(per_example_loss, params, state)
    return losses, ([state.inputs[k] for k in active], [state.params[k] for k in active])

  losses, vjp, (xs, layer_params) = jax.vjp(perturbed, eps0, has_aux=True)
  (gs,) = vjp(jnp.ones_like(losses))
  groups: Dict[str, List[int]] = {}
  for j, k in enumerate(active):
    groups.setdefault(plan[k].path, []).append(j)
  sq = jnp.zeros((batch,), jnp.float32)
  for members in groups.values():
    calls = [plan[active[j]] for j in members]
    layer_sq = {"dense": functools.partial(_linear_sq, ghost=ghost), "conv": functools.partial(_linear_sq, ghost=ghost),
                "embed": _embed_sq, "norm": _norm_layer_sq}[calls[0].kind]
    sq = sq + layer_sq(calls, [xs[j] for j in members], [gs[active[j]] for j in members], layer_params[members[0]])
  return jnp.sqrt(sq), losses.astype(jnp.float32)


def supported(per_example_loss: Callable[[PyTree], jax.Array], params: PyTree) -> Tuple[bool, str]:
  """Whether `grad_norms` covers this model: `(True, "")`, or `(False, reason)` naming the parameter paths.
  Traces the model once to a jaxpr (abstract shapes only; nothing is computed)."""
  try:
    _analyse(per_example_loss, params)
  except UnsupportedModel as e:
    return False, str(e)
  return True, ""
