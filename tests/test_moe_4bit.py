"""Q-LoRA on MoE models stores the fused experts in 4 bits (chattune.train.experts4bit): quantized while loading, at
most 0.3x their bf16 bytes, dequantized one expert at a time, and computing what transformers' own experts compute
on the dequantized weights, with peft's own LoRA."""

import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_moe import MOE, RANK, fused_experts
from test_train import train

from chattune.export.merge import merge_adapter, model_loader
from chattune.train import experts4bit


def load(path, quantize_experts: bool, dtype=torch.float32, device="cpu"):
    """The base as Q-LoRA loads it (bitsandbytes NF4 linear layers), with or without 4-bit experts."""
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                             bnb_4bit_quant_storage=dtype)
    experts4bit.register()
    counted = [0]
    kwargs = dict(dtype=dtype, quantization_config=bnb, device_map={"": device},
                  experts_implementation="nf4" if quantize_experts else "eager")
    loader = model_loader(str(path), False)
    if quantize_experts:
        with experts4bit.quantizing_experts_while_loading(counted):
            model = loader.from_pretrained(path, **kwargs)
    else:
        model = loader.from_pretrained(path, **kwargs)
    return model, counted[0]


def lora_config(model):
    from peft import LoraConfig

    from chattune.train.lora import expert_parameter_names

    # init_lora_weights=False: B is random too, so the adapter's term is not zero in the comparison
    return LoraConfig(r=RANK, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                      target_parameters=expert_parameter_names(model))


def nf4_values(codes: torch.Tensor, absmax: torch.Tensor, shape, dtype) -> torch.Tensor:
    """NF4 codes decoded by hand (an independent reference): two values a byte, the first in the high half, each
    block of 64 times its fp32 scale."""
    from bitsandbytes.functional import get_4bit_type

    packed = codes.view(torch.uint8).reshape(-1).long()
    index = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)
    values = get_4bit_type("nf4", device=codes.device)[index].float().view(-1, 64) * absmax.float().view(-1, 1)
    return values.reshape(shape).to(dtype)


def test_bitsandbytes_avx512_dequantization_needs_the_block_rows_workaround():
    """bitsandbytes' AVX-512 CPU kernel scales a block that spans two rows wrongly (experts4bit.dequantize works
    around it by dequantizing rows of one block). When this test fails on an AVX-512 machine, bitsandbytes is fixed
    and the workaround can go."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    torch.manual_seed(0)
    weight = torch.randn(256, 32)  # rows of 32: every 64-value block spans two rows
    codes, state = quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    expected = nf4_values(codes, state.absmax, weight.shape, torch.float32)
    assert (expected - weight).abs().mean() < 0.1  # the reference decodes what was quantized
    ours = experts4bit.dequantize(codes.view(-1), state.absmax, tuple(weight.shape), torch.float32)
    assert torch.equal(ours, expected)
    theirs = dequantize_4bit(codes, state)
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        assert torch.equal(theirs, expected)  # the portable path: right
        pytest.skip("no AVX-512 here: bitsandbytes takes its portable path, which needs no workaround")
    assert not torch.equal(theirs, expected)


@pytest.mark.parametrize("family", MOE)
def test_expert_stacks_are_stored_in_4_bits_while_loading(family, model_dirs):
    from bitsandbytes.functional import quantize_4bit

    path = model_dirs(family)
    plain = model_loader(str(path), False).from_pretrained(path, dtype=torch.bfloat16)
    stacks = fused_experts(plain)
    model, while_loading = load(path, quantize_experts=True, dtype=torch.bfloat16)
    assert while_loading == len(stacks) > 0  # every stack, each as it was loaded: never the whole model in bf16
    assert experts4bit.quantize_experts(model) == 0
    stored, floating = experts4bit.stack_bytes(model)
    assert floating == sum(p.numel() * 2 for p in stacks.values())
    assert stored <= 0.3 * floating, (stored, floating)

    # each expert dequantizes alone to exactly the NF4 values of the whole stack as bitsandbytes quantizes it
    modules = dict(model.named_modules())
    for name, p in stacks.items():
        module_name, _, param = name.rpartition(".")
        module = modules[module_name]
        codes, state = quantize_4bit(p.data, blocksize=64, compress_statistics=False, quant_type="nf4")
        whole = nf4_values(codes, state.absmax, p.shape, torch.bfloat16)
        for e in range(p.shape[0]):
            one = experts4bit.dequantize(getattr(module, f"{param}_nf4")[e], getattr(module, f"{param}_absmax")[e],
                                         tuple(p.shape[1:]), torch.bfloat16)
            assert torch.equal(one, whole[e]), f"{name}[{e}]"


@pytest.mark.parametrize("family", MOE)
def test_4bit_experts_compute_what_transformers_and_peft_compute_on_the_dequantized_weights(family, model_dirs):
    """The loss and every adapter gradient of the 4-bit path (our per-expert loop, LoRA's low-rank term per expert)
    against transformers' own eager experts over the dequantized stacks, with peft's own ParamWrapper forward."""
    from peft import get_peft_model

    path = model_dirs(family)
    torch.manual_seed(0)
    ours, _ = load(path, quantize_experts=True)
    ours = get_peft_model(ours, lora_config(ours))
    assert experts4bit.finish(ours) == len(experts4bit_stacks(ours)) > 0

    reference, _ = load(path, quantize_experts=False)
    modules = dict(reference.named_modules())
    for name, module in ours.get_base_model().named_modules():  # the reference's stacks: our stacks, dequantized
        for param, (shape, dtype) in getattr(module, "nf4_stacks", {}).items():
            codes, absmax = getattr(module, f"{param}_nf4"), getattr(module, f"{param}_absmax")
            weights = torch.stack([experts4bit.dequantize(codes[e], absmax[e], shape, dtype)
                                   for e in range(codes.shape[0])])
            getattr(modules[re.sub(r"(\.base_layer)+$", "", name)], param).data.copy_(weights)
    reference = get_peft_model(reference, lora_config(reference))
    reference.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)

    ids = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for model in (ours, reference):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert grads[0].keys() == grads[1].keys() and any("experts" in n for n in grads[0])
    for n in grads[0]:
        assert grads[0][n] is not None and grads[0][n].abs().sum() > 0 or "experts" not in n, n
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-3, atol=1e-6, msg=n)

    # with the adapter disabled, the model is the dequantized base
    with torch.no_grad(), ours.disable_adapter(), reference.disable_adapter():
        torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-5)


def experts4bit_stacks(model):
    return [(m, n) for m in model.modules() for n in getattr(m, "nf4_stacks", {})]


@pytest.mark.slow
def test_qlora_on_moe_trains_every_expert_in_4_bits_and_the_adapter_merges(model_dirs, tmp_path):
    """finetune.py's Q-LoRA path end to end: the plan says the experts run in 4 bits, every expert that received
    tokens is trained, the adapter is peft's (the plain LoRA run's tensors) and merges into the float model."""
    base = model_dirs("qwen3_moe")
    out = tmp_path / "qlora"
    trainer = train(base, out, "--use_lora", "--q_lora", "--bf16", "True", "--lora_r", RANK, "--max_steps", 1,
                    "--learning_rate", 1e-2, "--lora_modules_to_save", "none")
    plan = json.loads((out / "run_report.json").read_text())["plan"]
    assert plan["experts"] == "nf4" and "4 bits" in plan["experts_why"]
    assert trainer.model.get_base_model().config._experts_implementation == "nf4"
    stored, floating = experts4bit.stack_bytes(trainer.model)
    assert 0 < stored <= 0.3 * floating
    # no placeholder is left among the parameters: DeepSpeed broadcasts each one viewed as bytes, which an expanded
    # tensor cannot be (a two-process ZeRO-2 run died on it before experts4bit.finish dropped them)
    assert all(p.is_contiguous() for p in trainer.model.parameters())
    # the total counts the experts (at their full size), as the LoRA run does
    lora = tmp_path / "lora"
    train(base, lora, "--use_lora", "--lora_r", RANK, "--max_steps", 1, "--lora_modules_to_save", "none")
    lora_plan = json.loads((lora / "run_report.json").read_text())["plan"]
    assert (plan["trainable_params"], plan["total_params"]) == (lora_plan["trainable_params"], lora_plan["total_params"])
    assert plan["adapters"] == lora_plan["adapters"]
    assert load_file(out / "adapter_model.safetensors").keys() == load_file(lora / "adapter_model.safetensors").keys()

    plain = model_loader(str(base), False).from_pretrained(base, dtype=torch.float64)
    merged, _ = merge_adapter(str(out), dtype=torch.float64)
    after = merged.state_dict()
    for name, p in fused_experts(plain).items():
        for e in range(p.shape[0]):
            assert not torch.equal(after[name][e], p[e]), f"expert {e} of {name} was not trained"


def test_the_plan_stores_experts_in_4_bits_under_qlora_and_counts_them_so(model_dirs):
    from transformers import AutoConfig

    from chattune.errors import ConfigError
    from chattune.train.architecture import model_class
    from chattune.train.decisions import plan_experts
    from chattune.train.memory import (
        NF4_EXPERT_BYTES,
        Setup,
        estimate,
        shape_from_config,
    )

    class Args:
        experts_implementation = "auto"

    config = AutoConfig.from_pretrained(model_dirs("qwen3_moe"))
    moe = model_class(config, False)
    assert plan_experts(Args, moe, "qlora").choice == "nf4"
    assert plan_experts(Args, moe, "lora").choice == "grouped_mm"
    assert "stay in bf16" in plan_experts(Args, moe, "qlora", zero_stage=3).why
    Args.experts_implementation = "grouped_mm"
    assert "stay in bf16" in plan_experts(Args, moe, "qlora").why
    Args.experts_implementation = "nf4"
    with pytest.raises(ConfigError, match="--q_lora"):
        plan_experts(Args, moe, "lora")

    # the planner's weights: 4.5 bits per expert weight where the experts are in 4 bits, bf16 where not
    shape = shape_from_config(config)
    fused = shape.routed_expert_params - shape.routed_in_linear
    assert fused > 0.5 * shape.other_params
    four = estimate(shape, Setup(mode="qlora", lora_r=RANK, bytes_per_weight=2))["weights"]
    bf16 = estimate(shape, Setup(mode="qlora", lora_r=RANK, bytes_per_weight=2, nf4_experts=False))["weights"]
    assert bf16 - four == pytest.approx(fused * (2 - NF4_EXPERT_BYTES), rel=1e-9)
    assert NF4_EXPERT_BYTES * 8 == experts4bit.BITS_PER_WEIGHT


@pytest.mark.gpu
def test_4bit_experts_on_cuda_match_the_cpu_path(model_dirs):
    """bitsandbytes' CUDA kernels quantize and dequantize as its CPU code does: the same codes, the same logits."""
    path = model_dirs("qwen3_moe")
    ids = torch.randint(0, 2000, (1, 16), generator=torch.Generator().manual_seed(2))
    cpu, _ = load(path, quantize_experts=True)
    cuda, _ = load(path, quantize_experts=True, device="cuda")
    for model in (cpu, cuda):
        experts4bit.finish(model)
    with torch.no_grad():
        torch.testing.assert_close(cuda(input_ids=ids.cuda()).logits.cpu(), cpu(input_ids=ids).logits,
                                   rtol=1e-3, atol=1e-3)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
