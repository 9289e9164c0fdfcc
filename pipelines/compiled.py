"""Compiled inference copies of the pipeline's networks (``pipe.compile()``).

``torch.compile`` with inductor's *weight freezing*: weights become constants of the generated code, so inductor
folds them and hands convolutions oneDNN's pre-packed weights, instead of re-laying them out on every call; and
with inductor's C++ wrapper, so the generated code calls its kernels from C++ rather than Python. On the
project's 2-core CPU both cut a step of the shipped model's small UNet, which is bound by per-call overhead rather
than arithmetic (README, "Benchmarks"). Frozen constants go stale when the weights change, so a compiled network
remembers what its weights were and is recompiled when they differ. The pipeline checks once per request
(:meth:`CompiledNetwork.refresh`): checking on every step cost 0.55 ms of a 12 ms step of the shipped UNet.

Dynamo checks its ~3 000 guards of that UNet (module attributes, one per submodule) on every call, another
0.85 ms a step. Those guards choose among compiled graphs and notice when one is stale; here the weights and
module state are checked per request by :meth:`CompiledNetwork.refresh`, and a call whose input signature
(:func:`call_signature`: tensor shapes, strides, dtypes, devices, other arguments, grad and autocast modes) has
already run since the last compile skips them (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, which
still dispatches among the graphs compiled for different signatures). A new signature runs with full guards.
"""
from __future__ import annotations

import itertools
from typing import Callable

import torch

COMPILE_BACKENDS = ("eager", "inductor")
SKIPS_GUARDS = hasattr(torch.compiler, "set_stance")  # torch >= 2.6; older versions check every guard


def weights_key(module: torch.nn.Module) -> tuple:
    """Identity, in-place version counter, dtype and device of every parameter and buffer: it changes when
    weights are replaced, edited in place (``load_state_dict``, optimizer steps), cast or moved, and when adapter
    layers (LoRA) are added or removed. Edits through ``.data`` bypass the version counter; call
    ``pipe.compile()`` again after those."""
    return tuple((id(t), t._version, t.dtype, t.device)
                 for t in itertools.chain(module.parameters(), module.buffers()))


def inductor_frozen(function: Callable) -> Callable:
    """``torch.compile`` for inference with weight freezing and inductor's C++ wrapper. Both are set through the
    config while each call runs (a compile happens lazily inside a call): ``torch.compile(options={"freezing":
    True})`` skips the convolution weight pre-packing (measured 11.7 against 8.5 ms a step of the shipped UNet).
    The C++ wrapper took that UNet's compiled step from 11.3 to 9.1 ms (float32; 7.4 ms in bfloat16) on this
    project's 2-core AMD EPYC."""
    compiled = torch.compile(function, dynamic=False)

    def call(*args, **kwargs):
        with torch._inductor.config.patch(freezing=True, cpp_wrapper=True):
            return compiled(*args, **kwargs)

    return call


class CompiledNetwork:
    """``function`` (a network or one of its methods) compiled by ``compiler``, recompiled when the weights of
    ``module`` or the value of ``state()`` (e.g. LoRA scales, plain Python attributes of adapter layers) have
    changed at the last :meth:`refresh`, which the pipeline runs once per request. Only for inference: callers use
    the eager network whenever gradients are on."""

    def __init__(self, function: Callable, module: torch.nn.Module, state: Callable[[], tuple] = tuple,
                 compiler: Callable[[Callable], Callable] = inductor_frozen):
        self.function, self.module, self.state, self.compiler = function, module, state, compiler
        self.compiled, self.key = None, None
        self.refresh()

    def refresh(self) -> None:
        """Recompile if the weights were edited in place, replaced, cast or moved, adapter layers were added or
        removed, or ``state()`` changed since the last compile."""
        key = (weights_key(self.module), self.state())
        if key != self.key:
            if self.compiled is not None:
                torch.compiler.reset()  # compiled code is cached per code object; drop the stale constants
            self.compiled, self.key, self.seen = self.compiler(self.function), key, set()

    def __call__(self, *args, **kwargs):
        if not SKIPS_GUARDS:
            return self.compiled(*args, **kwargs)
        try:
            signature = call_signature(args, kwargs)
        except TypeError:
            return self.compiled(*args, **kwargs)
        if signature in self.seen:
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return self.compiled(*args, **kwargs)
            except RuntimeError as error:  # raised before running when the graphs were dropped (compiler.reset())
                if "skip_guard_eval_unsafe" not in str(error):
                    raise
                self.seen.clear()
        output = self.compiled(*args, **kwargs)
        self.seen.add(signature)
        return output


def call_signature(args: tuple, kwargs: dict) -> tuple:
    """What a compiled graph was specialised on, for one call: each tensor's shape, stride, dtype and device
    (inside tuples, lists and dicts too), every other argument's value, and the grad and autocast modes. Raises
    TypeError for an unhashable argument."""

    def describe(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device, value.requires_grad)
        if isinstance(value, (tuple, list)):
            return (type(value).__name__, *map(describe, value))
        if isinstance(value, dict):
            return ("dict", *((k, describe(v)) for k, v in value.items()))
        hash(value)  # TypeError for an unhashable argument: no signature, full guards
        return ("value", type(value).__name__, value)

    autocast = tuple(torch.is_autocast_enabled(kind) for kind in ("cpu", "cuda"))
    return describe(args), describe(kwargs), torch.is_grad_enabled(), autocast
