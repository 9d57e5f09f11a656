"""Megatron-Core's distributed optimizer: its per-parameter state, as checkpoints read and write it.

:func:`index_main_params_by_dtype_order`: ``DistributedOptimizer.model_param_group_index_map`` (checked
in 0.16.1) maps each model parameter to ``(group, position)`` in the order of the group's model
parameters, but the torch optimizer's group lists the fp32 parameters' shards first and then the
fp32 master copies of the 16-bit ones. When a group mixes the two (the local and SDPA layer specs
keep ``torch.nn.RMSNorm`` weights in fp32 under bf16), the positions point at other parameters'
shards: a checkpoint save fails on a size mismatch, or, where two sizes coincide, silently stores
one parameter's state under another's name. Training itself never reads the map. The function
rebuilds it in the torch group's order (the same map when a group holds one dtype), for every
distributed optimizer, right after it is built (``hpt_megatron.train.optim.build_optimizer``).

:func:`keep_adam_step_on_load`: loading a checkpoint into torch's Adam (no Transformer Engine, no
apex), whose state holds a per-parameter ``step`` tensor. Two faults of that fallback path:

1. ``DistributedOptimizer.load_state_dict`` gives every parameter's state the SAME ``step`` tensor.
   torch's Adam increments each parameter's step in place, so after a load one optimizer step adds
   the number of parameters to the shared counter and every later bias correction is wrong (a
   resumed run drifted by ~4e-4 per weight after one step). The wrapper gives each state its own
   copy.
2. ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies every entry of the shard's
   optimizer state from the checkpoint's tensors, which never carry ``step`` (megatron-core keeps
   it in the common param groups and has already restored it by then): ``KeyError: 'step'`` on
   every load. The wrapper keeps the value already restored; every other key is copied as before.

TE's and apex's fused Adam keep no per-parameter step: then it does nothing. Idempotent; applied on
CPU and GPU alike, before loading optimizer state in ``hpt_megatron.train.dist_checkpoint``.
"""

from __future__ import annotations

import functools
import importlib

_MODULE = "megatron.core.optimizer.distrib_optimizer"
_METHOD = "_set_main_param_and_optimizer_states"


def index_main_params_by_dtype_order(optimizers: list) -> None:
    """Rebuild ``model_param_group_index_map`` of each ``DistributedOptimizer`` in ``optimizers``."""
    module = importlib.import_module(_MODULE)
    for opt in optimizers:
        if not isinstance(opt, module.DistributedOptimizer):
            continue
        index = {}
        groups = zip(opt.model_fp32_groups, opt.model_float16_groups, opt.optimizer.param_groups)
        for g, (fp32, float16, torch_group) in enumerate(groups):
            ordered = [*fp32, *float16]  # the order in which the torch group lists their shards
            assert len(ordered) == len(torch_group["params"])
            for i, model_param in enumerate(ordered):
                index[model_param] = (g, i)
        assert index.keys() == opt.model_param_group_index_map.keys()
        opt.model_param_group_index_map = index


def keep_adam_step_on_load() -> None:
    """Raises RuntimeError on a megatron-core without the expected method."""
    module = importlib.import_module(_MODULE)
    cls = module.DistributedOptimizer
    if not hasattr(cls, _METHOD) or not hasattr(module, "HAVE_APEX_OR_TE"):
        raise RuntimeError(
            f"{_MODULE}.DistributedOptimizer has no {_METHOD}: this megatron-core differs from the one "
            "patches/dist_optimizer_state.py was checked against (0.16.1); review the patch"
        )
    real, real_load = getattr(cls, _METHOD), cls.load_state_dict
    if module.HAVE_APEX_OR_TE or getattr(real, "_keeps_adam_step", False):
        return

    @functools.wraps(real_load)
    def load_state_dict(self, state_dict):
        result = real_load(self, state_dict)
        for state in self.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()
        return result

    @functools.wraps(real)
    def set_states(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        return real(self, model_param, tensors)

    set_states._keeps_adam_step = True
    setattr(cls, _METHOD, set_states)
    cls.load_state_dict = load_state_dict
