"""Q-LoRA on fused MoE experts: the 3-D expert stacks (`mlp.experts.gate_up_proj`, `down_proj`) stored in 4 bits.

bitsandbytes quantizes nn.Linear layers only, so under Q-LoRA an MoE model's fused experts, most of its weights,
stayed in bf16 (Qwen3.5/3.6-35B-A3B: 64 GB of its 69). Here each stack is quantized to NF4 as it is loaded, one
stack at a time (blocks of 64 values with an fp32 scale each: 4.5 bits per weight, 0.28x of bf16), so the bf16 model
never has to fit. The experts' forward (`nf4_experts_forward`, registered with transformers as the experts
implementation "nf4") dequantizes one expert at a time, in the forward and again in the backward, never the stack.

LoRA stays peft's: its ParamWrapper holds the adapter (saved, loaded and merged as peft does), but its forward, which
adds the delta to the whole stack through a parametrization, is bypassed. The expert forward adds the low-rank term
per expert instead, x·(s·lhs[e]·rhs[e])ᵀ from `ParamWrapper.get_delta_factors`, without forming the delta.

Order of use: `register()` and `quantizing_experts_while_loading()` around from_pretrained (model.load_model), then
the adapter (peft finds the stacks by their placeholder parameters of the full shape), then `finish()`.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator
from typing import Any

import torch

IMPLEMENTATION = "nf4"
BLOCK = 64  # values per fp32 scale (bitsandbytes' blocksize)
BITS_PER_WEIGHT = 4 + 32 / BLOCK  # 4.5: the planner counts the stacks at this size


def register() -> None:
    """Make "nf4" an experts implementation transformers accepts (from_pretrained's experts_implementation)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, nf4_experts_forward)


def quantizable(module: Any, name: str) -> bool:
    """A float 3-D parameter of a fused experts module whose per-expert size is a whole number of blocks (so no block
    spans two experts and each expert dequantizes alone)."""
    p = module._parameters.get(name)
    return (p is not None and type(module).__name__.endswith("Experts") and p.dim() == 3 and p.is_floating_point()
            and p.shape[1:].numel() % BLOCK == 0 and p.stride(0) != 0)  # stride 0: our placeholder, done


def quantize_stack(module: Any, name: str) -> None:
    """Replace `module.<name>` ([experts, a, b]) by its NF4 codes and scales, kept as buffers, and a placeholder of the
    same shape and dtype holding one value (peft reads the shape to size the adapter; nothing reads its values)."""
    from bitsandbytes.functional import quantize_4bit

    p = module._parameters[name]
    experts = p.shape[0]
    with torch.no_grad():
        codes, state = quantize_4bit(p.data.contiguous(), blocksize=BLOCK, compress_statistics=False,
                                     quant_type="nf4", quant_storage=torch.uint8)
    # persistent: transformers replaces every non-persistent buffer by an empty one after loading (modeling_utils
    # _move_missing_keys_from_meta_to_device, L4875), and these are set while it loads
    module.register_buffer(f"{name}_nf4", codes.view(experts, -1))
    module.register_buffer(f"{name}_absmax", state.absmax.view(experts, -1))
    if not hasattr(module, "nf4_stacks"):
        module.nf4_stacks = {}
    module.nf4_stacks[name] = (tuple(p.shape[1:]), p.dtype)
    placeholder = torch.nn.Parameter(torch.empty(1, dtype=p.dtype, device=p.device).expand(p.shape),
                                     requires_grad=False)
    placeholder._is_hf_initialized = True  # transformers' weight init skips it (it cannot write an expanded tensor)
    module._parameters[name] = placeholder  # the float stack is freed here


def quantize_experts(model: Any) -> int:
    """Quantize every fused expert stack not yet quantized; returns how many."""
    done = 0
    for module in model.modules():
        for name in list(module._parameters):
            if quantizable(module, name):
                quantize_stack(module, name)
                done += 1
    return done


@contextlib.contextmanager
def quantizing_experts_while_loading(counter: list[int] | None = None) -> Iterator[None]:
    """Quantize each expert stack the moment from_pretrained sets it, so at most one stack is in bf16 at a time.

    transformers 5.23 sets every loaded tensor through `core_model_loading.set_param_for_module` (L1426), called by
    its module-global name: wrapped here for the duration of the load. Registered in chattune.train.hf.SURFACE; a
    transformers that loads another way still gets its stacks quantized after the load (`quantize_experts`), with the
    bf16 peak, which tests/test_moe.py would show (it counts the stacks quantized while loading).
    """
    import transformers.core_model_loading as loading

    original = loading.set_param_for_module

    def set_and_quantize(model: Any, target_name: str, *args: Any, **kwargs: Any) -> Any:
        result = original(model, target_name, *args, **kwargs)
        module_path, _, name = target_name.rpartition(".")
        module = model.get_submodule(module_path) if module_path else model
        if quantizable(module, name):
            quantize_stack(module, name)
            if counter is not None:
                counter[0] += 1
        return result

    loading.set_param_for_module = set_and_quantize
    try:
        yield
    finally:
        loading.set_param_for_module = original


def finish(model: Any) -> int:
    """After the adapter (if any) is on: hand each stack's peft wrapper to its experts module, make the wrapper's
    forward go straight to the experts, and drop the placeholders from the parameters (DeepSpeed and DDP broadcast
    every parameter; an expanded tensor cannot be written). A tensor of the full shape stays as a plain attribute,
    so that peft can still read its shape, dtype and device; it holds NaN, so anything that reads its values instead of
    the codes shows it at once. Returns the number of adapted stacks."""
    from peft.tuners.lora.layer import ParamWrapper

    adapted = 0
    for module in model.modules():
        base = module.get_base_layer() if isinstance(module, ParamWrapper) else None
        if base is not None and module.parameter_name in getattr(base, "nf4_stacks", {}):
            if not hasattr(base, "nf4_lora"):
                base.nf4_lora = {}
            base.nf4_lora[module.parameter_name] = module
            module.forward = types.MethodType(_straight_to_experts, module)
            adapted += 1
    for module in model.modules():
        for name, (shape, dtype) in getattr(module, "nf4_stacks", {}).items():
            placeholder = module._parameters.pop(name, None)
            if placeholder is not None:
                nan = torch.full((1,), float("nan"), dtype=dtype, device=placeholder.device)
                object.__setattr__(module, name, nan.expand(placeholder.shape))
    return adapted


def _straight_to_experts(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """ParamWrapper.forward for a 4-bit stack: the experts module applies the adapter itself, per expert."""
    if kwargs.pop("adapter_names", None) is not None:
        raise ValueError("4-bit MoE experts do not support mixed-adapter batches (adapter_names)")
    return self.base_layer(x, *args, **kwargs)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """One expert's weight ([a, b]) from its NF4 codes and scales.

    Dequantized as rows of one block each and then viewed as `shape`: blocks follow the flat order, so the values are
    the same, and it sidesteps bitsandbytes 0.50.2's AVX-512 CPU kernel (bitsandbytes/backends/cpu/ops.py,
    dequantize_4bit; used where torch's CPU capability is AVX512), which scales a block that spans two rows wrongly:
    measured on a [256, 32] weight with 64-value blocks, mean error 0.28 where the portable path gives 0.07 (no
    upstream issue found; tests/test_moe_4bit.py shows it where the machine has AVX-512)."""
    from bitsandbytes.functional import QuantState, dequantize_4bit, get_4bit_type

    rows = math.prod(shape) // BLOCK
    state = QuantState(absmax=absmax, shape=torch.Size((rows, BLOCK)), code=get_4bit_type("nf4", device=codes.device),
                       blocksize=BLOCK, quant_type="nf4", dtype=dtype)
    return dequantize_4bit(codes, state).view(shape)


class _ExpertMatmul(torch.autograd.Function):
    """x @ W_eᵀ (or x @ W_e for transposed stacks) with W_e dequantized in the forward and again in the backward:
    only the 4-bit codes are kept for the backward, never a float copy of the expert."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...],
                dtype: torch.dtype, transposed: bool) -> torch.Tensor:
        ctx.save_for_backward(codes, absmax)
        ctx.meta = (shape, dtype, transposed)
        w = dequantize(codes, absmax, shape, dtype).to(x.dtype)
        return x @ w if transposed else x @ w.t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        codes, absmax = ctx.saved_tensors
        shape, dtype, transposed = ctx.meta
        w = dequantize(codes, absmax, shape, dtype).to(grad.dtype)
        return (grad @ w.t() if transposed else grad @ w), None, None, None, None, None


def _factors(module: Any, name: str) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """The active adapters' (lhs, rhs, scaling) of one stack, with delta = scaling · lhs @ rhs in the stack's layout."""
    wrapper = getattr(module, "nf4_lora", {}).get(name)
    if wrapper is None or wrapper.disable_adapters:
        return []
    if wrapper.merged:
        raise RuntimeError("a LoRA adapter cannot be merged into 4-bit experts: merge into the float model "
                           "(merge_lora.py)")
    return [wrapper.get_delta_factors(a) for a in wrapper.active_adapters if a in wrapper.lora_A]


def _expert_linear(module: Any, name: str, e: int, x: torch.Tensor, factors: list) -> torch.Tensor:
    transposed = module.is_transposed
    if name in getattr(module, "nf4_stacks", {}):
        shape, dtype = module.nf4_stacks[name]
        y = _ExpertMatmul.apply(x, getattr(module, f"{name}_nf4")[e], getattr(module, f"{name}_absmax")[e], shape,
                                dtype, transposed)
    else:  # a stack that could not be quantized: its float weight
        w = getattr(module, name)[e]
        y = x @ w if transposed else torch.nn.functional.linear(x, w)
    for lhs, rhs, scaling in factors:  # delta_e = scaling · lhs[e] @ rhs[e], never formed
        y = y + scaling * ((x @ lhs[e]) @ rhs[e] if transposed else (x @ rhs[e].t()) @ lhs[e].t())
    if module.has_bias:
        y = y + getattr(module, f"{name}_bias")[e]
    return y


def nf4_experts_forward(self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts contract (grouped_mm_experts_forward's flags: gate, bias, transposed stacks, post-expert
    norm), looping over the experts that received tokens."""
    up = "gate_up_proj" if self.has_gate else "up_proj"
    factors = {name: _factors(self, name) for name in (up, "down_proj")}
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    with torch.no_grad():
        routed = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(routed.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
    for e in hit:
        if e >= self.num_experts:  # expert-parallel sentinels
            continue
        top_k_pos, token_idx = torch.where(routed[e])
        h = _expert_linear(self, up, e, hidden_states[token_idx], factors[up])
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        h = _expert_linear(self, "down_proj", e, h, factors["down_proj"])
        if self.has_post_expert_norm:
            h = self.post_expert_norm(h)
        out.index_add_(0, token_idx, (h * top_k_weights[token_idx, top_k_pos, None]).float())
    return out.to(hidden_states.dtype)


def stack_bytes(model: Any) -> tuple[int, int]:
    """(bytes of the 4-bit stacks' codes and scales, bytes the same stacks take in their float dtype)."""
    stored = floating = 0
    for module in model.modules():
        for name, (shape, dtype) in getattr(module, "nf4_stacks", {}).items():
            codes, absmax = getattr(module, f"{name}_nf4"), getattr(module, f"{name}_absmax")
            stored += codes.numel() * codes.element_size() + absmax.numel() * absmax.element_size()
            floating += codes.shape[0] * torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    return stored, floating
