"""Mixture-of-experts LoRA on tiny random models of each MoE family we train (routed experts, shared experts, dense
MLP layers, 4 experts, top-2): every expert and MLP adapted, counted as the plan says, and merged exactly."""

import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_train import train

from chattune.export.merge import load_adapter_model, merge_adapter, model_loader

MOE = ("qwen2_moe", "qwen3_moe", "deepseek_v2", "qwen3_5_moe")
# Model types transformers v5 converts from v4 checkpoints: peft turns the v4 router (an nn.Linear named `gate`) into
# a LoRA on the router's weight, and the fused gate_up_proj gets twice the rank (the v4 gate_proj and up_proj were
# each adapted at rank r; transformers_weight_conversion._convert_peft_config_moe).
CONVERTED = ("qwen3_moe", "deepseek_v2")
RANK = 4


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    """The decoder's nn.Linear layers: not the output layer, not the vision tower."""
    out = id(model.get_output_embeddings())
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and id(m) != out
            and ".visual." not in f".{name}."}


def fused_experts(model) -> dict[str, torch.nn.Parameter]:
    return {f"{name}.{p_name}": p for name, m in model.named_modules() if type(m).__name__.endswith("Experts")
            for p_name, p in m.named_parameters(recurse=False) if p.dim() == 3}


def routers(model) -> dict[str, torch.nn.Parameter]:
    return {f"{name}.weight": m.weight for name, m in model.named_modules() if name.endswith(".mlp.gate")
            and not isinstance(m, torch.nn.Linear)}


def analytic_adapter_params(model, family: str) -> dict[str, int]:
    """LoRA's parameter count per module kind, from the base model's shapes: r * (in + out) per linear layer, and per
    expert of a fused expert weight; the fused gate_up_proj at 2r and the router where peft's conversion adds them."""
    count = {"attention": 0, "dense MLP": 0, "shared experts": 0, "routed experts": 0, "router": 0}
    for name, m in decoder_linears(model).items():
        kind = "shared experts" if "shared_expert" in name else "dense MLP" if ".mlp." in name else "attention"
        count[kind] += RANK * (m.in_features + m.out_features)
    for name, p in fused_experts(model).items():
        rank = 2 * RANK if family in CONVERTED and name.endswith("gate_up_proj") else RANK
        count["routed experts"] += rank * p.shape[0] * (p.shape[1] + p.shape[2])
    if family in CONVERTED:
        count["router"] = sum(RANK * (p.shape[0] + p.shape[1]) for p in routers(model).values())
    return {kind: n for kind, n in count.items() if n}


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits


@pytest.mark.slow
@pytest.mark.parametrize("family", MOE)
def test_lora_trains_every_expert_and_mlp_says_so_and_merges_exactly(family, model_dirs, tmp_path):
    base = model_dirs(family)
    out = tmp_path / "run"
    trainer = train(base, out, "--use_lora", "--lora_r", RANK, "--max_steps", 1, "--learning_rate", 1e-2,
                    "--lora_modules_to_save", "none")
    plain = model_loader(str(base), False).from_pretrained(base, dtype=torch.float64)
    linears, experts = decoder_linears(plain), fused_experts(plain)
    assert experts and any("shared_expert" in n for n in linears) or family == "qwen3_moe"
    # a dense MLP layer (Qwen3.5's MoE checkpoints have none)
    assert any(re.search(r"\.mlp\.(gate|up|down)_proj$", n) for n in linears) or family == "qwen3_5_moe"

    # the plan says what is adapted, and that is the analytic count for the rank
    plan = json.loads((out / "run_report.json").read_text())["plan"]
    reported = {a["kind"]: a["params"] for a in plan["adapters"]}
    assert reported == analytic_adapter_params(plain, family)
    assert plan["trainable_params"] == sum(reported.values())

    # every linear layer and every expert moved after one step: the merged weights differ from the base's (merged in
    # float64, so that comparing logits below measures the merge, not float32 rounding of a different sum order)
    merged_dir = tmp_path / "merged"
    merged, tok = merge_adapter(str(out), dtype=torch.float64)
    after = merged.state_dict()
    for name, m in linears.items():
        assert not torch.equal(after[f"{name}.weight"], m.weight), f"{name} was not trained"
    for name, p in experts.items():
        for e in range(p.shape[0]):
            assert not torch.equal(after[name][e], p[e]), f"expert {e} of {name} was not trained"

    # the merged model is the adapter's, and the saved adapter loads back into it
    merged.save_pretrained(merged_dir)
    ids = torch.tensor([tok.encode("Which experts answer this? Four of them, two at a time.")])
    trainer.model.eval()
    trained = logits(trainer.model, ids)
    reloaded, _ = load_adapter_model(str(out), dtype=torch.float32)
    torch.testing.assert_close(logits(reloaded, ids), trained, rtol=0, atol=1e-5)
    adapter, _ = load_adapter_model(str(out), dtype=torch.float64)
    written = model_loader(str(merged_dir), False).from_pretrained(merged_dir, dtype=torch.float64)
    for model in (adapter.get_base_model(), written):
        model.set_experts_implementation("eager")  # torch's grouped_mm has no float64
    torch.testing.assert_close(logits(written, ids), logits(adapter, ids), rtol=0, atol=1e-5)


def test_peft_alone_leaves_dense_and_shared_mlps_unadapted(model_dirs, monkeypatch):
    """The reason for hf.keep_linear_moe_targets (peft#3711): without it, peft 0.21 moves the gate/up/down_proj
    targets of a converted MoE type to the fused experts, and DeepSeek's dense first layer and shared experts train
    nothing. When this fails, peft fixed it: drop the workaround."""
    import peft.utils.transformers_weight_conversion as conversion
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from chattune.train import hf

    hf.keep_linear_moe_targets()
    monkeypatch.setattr(conversion, "_convert_peft_config_moe", conversion._convert_peft_config_moe.original)
    model = AutoModelForCausalLM.from_pretrained(model_dirs("deepseek_v2"), dtype=torch.float32)
    adapted = get_peft_model(model, LoraConfig(r=RANK, target_modules="all-linear", lora_dropout=0.0))
    names = {n for n, _ in adapted.named_modules()}
    assert "base_model.model.model.layers.1.mlp.experts.lora_A" in names  # the experts are
    assert not [n for n in names if re.search(r"(layers\.0\.mlp|shared_experts)\.(gate|up|down)_proj\.lora_A$", n)]


@pytest.mark.parametrize("family, kept", [("deepseek_v2", True), ("qwen2", False)])
def test_the_peft_3711_note_names_the_kept_layers_of_converted_moe_models_only(family, kept, model_dirs, capsys):
    """peft writes all-linear as full module names for every model: the note must not fire on a dense model."""
    from transformers import AutoModelForCausalLM

    from chattune.train.args import LoraArguments
    from chattune.train.lora import apply_lora

    model = AutoModelForCausalLM.from_pretrained(model_dirs(family), dtype=torch.float32)
    training = type("T", (), {"gradient_checkpointing": False})()
    apply_lora(model, training, LoraArguments(lora_r=RANK, lora_dropout=0.0), [])
    note = "dense/shared-expert MLP layers of this MoE model are adapted" in capsys.readouterr().err
    assert note == kept


def switch_load_balancing_loss(router_logits: list[torch.Tensor], mask: torch.Tensor, top_k: int) -> torch.Tensor:
    """The Switch Transformer load-balancing loss over all MoE layers' real tokens, written here from the paper (eqs.
    4-6) as transformers applies it to Qwen-MoE: E * sum_e f_e * P_e, where f_e is the share of top-k assignments
    that went to expert e and P_e the mean router probability of e, both over every layer's tokens together."""
    keep = mask.reshape(-1).bool()
    logits = torch.cat([layer.reshape(-1, layer.shape[-1])[keep] for layer in router_logits]).double()
    experts = logits.shape[-1]
    probs = logits.softmax(-1)
    chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
    return experts * (chosen.mean(0) * probs.mean(0)).sum()


@pytest.mark.slow
def test_router_load_balancing_loss_is_added_with_its_weight_and_loads_are_reported(model_dirs, tmp_path):
    coef = 0.5
    out = tmp_path / "aux"
    trainer = train(model_dirs("qwen3_moe"), out, "--use_lora", "--lora_r", RANK, "--max_steps", 1,
                    "--router_aux_loss_coef", coef)
    report = json.loads((out / "run_report.json").read_text())
    assert report["plan"]["router_aux_loss_coef"] == coef
    k = trainer.model.config.num_experts_per_tok
    load = report["expert_load"]["tokens_per_expert"]
    assert len(load) == 1 and len(load[0]) == 4  # layer 1 is MoE (layer 0 dense), 4 experts
    assert sum(load[0]) == k * report["tokens_seen"]  # every real token routed to k experts, padding to none
    assert report["expert_load"]["min"] == min(load[0]) and report["expert_load"]["max"] == max(load[0])

    batch = trainer.prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labels = batch["labels"]
    count = (labels[:, 1:] != -100).sum()
    captured = []
    routers = [m for m in trainer.model.modules() if type(m).__name__.endswith("TopKRouter")]
    hooks = [m.register_forward_hook(lambda mod, args, output: captured.append(output[0])) for m in routers]
    with torch.no_grad():
        total = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=count)
        for h in hooks:
            h.remove()
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    cross_entropy = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(),
                                                      labels[:, 1:].flatten(), ignore_index=-100,
                                                      reduction="sum") / count
    aux = switch_load_balancing_loss(captured[:len(routers)], batch["attention_mask"], k)
    assert aux > 1.0  # E * sum f_e P_e is 1 when perfectly balanced, above it otherwise
    torch.testing.assert_close(total.double() - cross_entropy, coef * aux, rtol=0, atol=1e-5)

    # a filler micro-batch (every label masked) trains nothing: no routers' loss, no routed tokens counted
    before = trainer.expert_load.clone()
    filler = {**batch, "labels": torch.full_like(labels, -100)}
    with torch.no_grad():
        assert trainer.compute_loss(trainer.model, filler, num_items_in_batch=count).item() == 0.0
    assert torch.equal(trainer.expert_load, before)


def test_the_router_loss_weight_defaults_to_the_config_and_is_refused_where_the_model_has_none(model_dirs):
    from transformers import AutoConfig

    from chattune.errors import ConfigError
    from chattune.train.architecture import model_class
    from chattune.train.plan import plan_router_aux

    class Args:
        router_aux_loss_coef = None

    qwen = model_class(AutoConfig.from_pretrained(model_dirs("qwen3_moe")), False)
    assert plan_router_aux(Args, qwen) == {"router_aux": 0.001, "router_aux_why": "the model config's router_aux_loss_coef"}
    Args.router_aux_loss_coef = 0.0
    assert plan_router_aux(Args, qwen)["router_aux"] == 0.0  # off, loads still recorded
    deepseek = model_class(AutoConfig.from_pretrained(model_dirs("deepseek_v2")), False)
    assert deepseek.router_aux is None and plan_router_aux(Args, deepseek) == {}
    Args.router_aux_loss_coef = 0.01
    with pytest.raises(ConfigError, match="computes no router load-balancing loss"):
        plan_router_aux(Args, deepseek)
    assert plan_router_aux(Args, model_class(AutoConfig.from_pretrained(model_dirs("qwen3_5_moe")), False)) == {
        "router_aux": 0.01, "router_aux_why": "--router_aux_loss_coef 0.01"}


@pytest.mark.slow
def test_grouped_experts_train_as_the_loop_over_experts_does(model_dirs, tmp_path):
    """The plan runs the experts through transformers' grouped GEMM; the per-expert loop (eager) trains the same
    step: the same loss, the same adapter."""
    runs = {}
    for implementation in ("auto", "eager"):
        out = tmp_path / implementation
        trainer = train(model_dirs("qwen3_moe"), out, "--use_lora", "--lora_r", RANK, "--max_steps", 2,
                        "--learning_rate", 1e-2, "--experts_implementation", implementation)
        plan = json.loads((out / "run_report.json").read_text())["plan"]
        ran = trainer.model.get_base_model().config._experts_implementation
        assert plan["experts"] == ran == ("grouped_mm" if implementation == "auto" else "eager")
        runs[implementation] = (trainer.state.log_history, load_file(out / "adapter_model.safetensors"))
    losses = [[h["loss"] for h in runs[k][0] if "loss" in h] for k in runs]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for name, tensor in runs["auto"][1].items():
        torch.testing.assert_close(tensor, runs["eager"][1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_plan_says_how_experts_run_and_refuses_the_flag_on_a_dense_model(model_dirs):
    from transformers import AutoConfig

    from chattune.errors import ConfigError
    from chattune.train.architecture import model_class
    from chattune.train.decisions import plan_experts

    class Args:
        experts_implementation = "auto"

    moe = model_class(AutoConfig.from_pretrained(model_dirs("qwen3_5_moe")), False)
    dense = model_class(AutoConfig.from_pretrained(model_dirs("qwen2")), False)
    assert moe.experts and not dense.experts
    assert plan_experts(Args, moe).choice == "grouped_mm" and plan_experts(Args, dense) is None
    Args.experts_implementation = "eager"
    assert plan_experts(Args, moe).choice == "eager"
    with pytest.raises(ConfigError, match="has no fused MoE experts"):
        plan_experts(Args, dense)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
