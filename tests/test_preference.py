"""Preference losses (chattune.train.preference, PreferenceTrainer) against plain-torch references: the model's own
logits of every sequence run on its own, log-softmax in float64, the published formulas written out here."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf

from chattune.train.batches import (
    PackingCollator,
    PaddingCollator,
    StepSampler,
    StepShape,
    pair_lengths,
    pair_samples,
)
from chattune.train.pref_trainer import PreferenceTrainer
from chattune.train.preference import PrefLoss, pair_count
from chattune.train.trainer import LossSetup

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=300, initializer_range=0.2, use_cache=False, attn_implementation="sdpa")


def lora_model(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL)),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():  # a trained adapter: the policy differs from the reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.double()  # float64: the comparisons below hold to 1e-6 with room, and fail on any real difference


def pairs_data(seed: int = 0, n: int = 3, identical: bool = False) -> list[dict]:
    """Samples of n pairs, chosen then rejected: one prompt each, two answers of different lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        prompt = torch.randint(5, 300, (6 + 3 * k,), generator=g).tolist()
        chosen = torch.randint(5, 300, (4 + k,), generator=g).tolist()
        rejected = chosen if identical else torch.randint(5, 300, (7 - k,), generator=g).tolist()
        for answer in (chosen, rejected):
            out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return out


def trainer_for(model, objective: PrefLoss, tmp_path, kind: str = "chunked") -> PreferenceTrainer:
    args = tf.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False,
                                label_names=["labels"], per_device_train_batch_size=1, save_strategy="no",
                                disable_tqdm=True)
    trainer = PreferenceTrainer(model=model, args=args, loss=LossSetup(kind, kind), objective=objective)
    trainer.loss_checked = True
    return trainer


def own_logps(model, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p, trained tokens) of every sample, each run on its own through the model's own logits."""
    sums, counts = [], []
    for s in samples:
        ids, labels = torch.tensor([s["input_ids"]]), torch.tensor(s["labels"])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        target = labels[1:]
        keep = target != -100
        sums.append(logp[keep].gather(-1, target[keep][:, None]).sum())
        counts.append(keep.sum())
    return torch.stack(sums), torch.stack(counts).double()


def reference_losses(objective: PrefLoss, policy, reference):
    """The published losses, per pair (float64)."""
    (p, n), (q, _) = policy, reference
    pc, pr, qc, qr, nc, nr = p[0::2], p[1::2], q[0::2], q[1::2], n[0::2], n[1::2]
    b = objective.beta
    if objective.kind == "sigmoid":
        rc, rr = b * (pc - qc), b * (pr - qr)
        loss = -torch.log(torch.sigmoid(rc - rr))
    elif objective.kind == "ipo":
        hc, hr = pc / nc - qc / nc, pr / nr - qr / nr
        rc, rr = b * hc, b * hr
        loss = (hc - hr - 1 / (2 * b)) ** 2
    elif objective.kind == "simpo":
        rc, rr = b * pc / nc, b * pr / nr
        loss = -torch.log(torch.sigmoid(rc - rr - objective.gamma))
    else:  # orpo: NLL of chosen + alpha * odds-ratio term
        ac, ar = pc / nc, pr / nr
        odds = (ac - torch.log(1 - torch.exp(ac))) - (ar - torch.log(1 - torch.exp(ar)))
        rc, rr = ac, ar
        loss = -ac - objective.alpha * torch.log(torch.sigmoid(odds))
    loss = loss - objective.sft_weight * pc / nc
    return loss, rc, rr


OBJECTIVES = [PrefLoss("sigmoid", 0.1), PrefLoss("ipo", 0.5), PrefLoss("simpo", 2.0, gamma=0.5),
              PrefLoss("orpo", alpha=0.2), PrefLoss("sigmoid", 0.3, sft_weight=0.7)]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: f"{o.kind}{'+sft' if o.sft_weight else ''}")
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_loss_rewards_and_every_lora_gradient_match_the_plain_torch_reference(objective, packed, tmp_path):
    samples = pairs_data()
    model = lora_model()
    collate = PackingCollator() if packed else PaddingCollator(0)
    inputs = collate(samples)
    trainer = trainer_for(model, objective, tmp_path)
    count = pair_count(inputs["labels"], inputs.get("position_ids"))
    assert count.item() == 3
    with torch.no_grad():
        result = trainer.pair_result(model, {k: v for k, v in inputs.items() if k != "labels"}, inputs["labels"])
    loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=count)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    policy = own_logps(model, samples)
    with model.disable_adapter(), torch.no_grad():
        reference = own_logps(model, samples)
    per_pair, reward_c, reward_r = reference_losses(objective, policy, reference)
    expected = per_pair.mean()
    expected.backward()
    assert abs(loss.item() - expected.item()) < 1e-6
    torch.testing.assert_close(result.chosen_reward.double(), reward_c.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(result.rejected_reward.double(), reward_r.detach(), atol=1e-6, rtol=0)
    lora = [n for n in grads if "lora_" in n]
    assert len(lora) == 2 * 7 * SMALL["num_hidden_layers"]  # A and B of every linear layer of every layer
    assert all(n in grads for n, p in model.named_parameters() if p.requires_grad)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (grads[name] - p.grad).abs().max().item() < 1e-6, name


def test_packed_equals_padded_and_micro_batch_split_changes_nothing(tmp_path):
    """One step's loss and gradients: the same whether its pairs are padded, packed, or cut into micro-batches."""
    samples = pairs_data(seed=3, n=4)
    results = []
    for cut in ([4], [1, 3], [2, 2]):
        for collate in (PaddingCollator(0), PackingCollator()):
            model = lora_model(1)
            trainer = trainer_for(model, PrefLoss("sigmoid", 0.1), tmp_path)
            batches, at = [], 0
            for size in cut:
                batches.append(collate(samples[2 * at:2 * (at + size)]))
                at += size
            count = trainer.count_trained_tokens(batches, torch.device("cpu"))
            total = 0.0
            for batch in batches:
                loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=count)
                loss.backward()
                total += loss.item()
            results.append((total, torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])))
    for total, grad in results[1:]:
        assert abs(total - results[0][0]) < 1e-6
        assert (grad - results[0][1]).abs().max().item() < 1e-6


def test_identical_chosen_and_rejected_give_exactly_ln_2(tmp_path):
    samples = pairs_data(seed=5, identical=True)
    model = lora_model(2)
    trainer = trainer_for(model, PrefLoss("sigmoid", 0.1), tmp_path)
    for collate in (PaddingCollator(0), PackingCollator()):
        inputs = collate(samples)
        with torch.no_grad():
            loss = trainer.compute_loss(model, dict(inputs))
        assert loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_a_filler_pair_counts_for_nothing(tmp_path):
    """The filler a short step gets (every label masked) adds no pair and no loss."""
    samples = pairs_data()
    fillers = [{"input_ids": s["input_ids"], "labels": [-100] * len(s["labels"])} for s in samples[:2]]
    model = lora_model()
    trainer = trainer_for(model, PrefLoss("sigmoid", 0.1), tmp_path)
    real = PaddingCollator(0)(samples)
    with_filler = PaddingCollator(0)(samples + fillers)
    assert pair_count(with_filler["labels"], None).item() == 3
    count = torch.tensor(3)
    with torch.no_grad():
        a = trainer.compute_loss(model, dict(real), num_items_in_batch=count)
        b = trainer.compute_loss(model, dict(with_filler), num_items_in_batch=count)
    assert abs(a.item() - b.item()) < 1e-6


def test_the_sampler_keeps_pairs_together_chosen_first():
    shape = StepShape(samples_per_step=4, tokens_per_step=0, per_device=2, budget=0, processes=1, seed=0)
    sampler = StepSampler(pair_lengths([10, 12, 7, 9, 30, 3, 5, 5, 8, 8]), shape, per_rank=2, rank=0, pairs=True)
    batches = list(sampler)
    assert all(len(b) % 2 == 0 for b in batches)
    for batch in batches:
        for chosen, rejected in zip(batch[0::2], batch[1::2], strict=True):
            if chosen >= 0:
                assert chosen % 2 == 0 and rejected == chosen + 1
            else:  # a filler pair: both sides masked copies of one pair
                assert ~chosen % 2 == 0 and ~rejected == ~chosen + 1
    seen = sorted(i for b in batches for i in b if i >= 0)
    assert seen == list(range(10))
    assert pair_samples([1, ~2]) == [2, 3, ~4, ~5]


def test_the_plan_counts_pairs_two_sequences_each_and_a_reference_copy_only_where_one_is_kept(tmp_path):
    """LoRA DPO adds no weights, only the second sequence's activations (pair lengths: both sides); full DPO holds a
    frozen copy of the base (under ZeRO-3 partitioned over the GPUs); the reference-free losses hold none."""
    from dataclasses import replace

    from chattune.train.architecture import ModelClass
    from chattune.train.args import parse_args
    from chattune.train.memory import (
        PERSISTENT_SLACK,
        estimate,
        run_setup,
        shape_from_config,
    )
    from chattune.train.plan import Hardware, OutputDir, make_plan

    config = tf.Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                            num_key_value_heads=2, vocab_size=151936)
    shape = shape_from_config(config)

    def args(*flags):
        return parse_args(["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--data_path",
                           "examples/pairs.jsonl", "--stage", "dpo", "--model_max_length", "1024",
                           "--per_device_train_batch_size", "2", *flags])

    def plan(*flags):
        return make_plan(*args(*flags), ModelClass("Qwen2ForCausalLM", False, proven=True), [300, 500, 120],
                         Hardware(), OutputDir(str(tmp_path)), has_eval=False, shape=shape)

    lora = plan("--use_lora")
    assert lora.batch.peak_micro_batch_tokens == 1000  # two pairs padded to the longer: 2 x 500
    assert "objective  DPO (sigmoid), beta 0.1; reference: the base model with the adapter disabled" in lora.format()
    assert "batch      2 pairs" in lora.format()
    training = args()[2]
    assert training.micro_batch_tokens() == 2 * 2 * 1024  # padded worst case: pairs x 2 sequences x max length
    full = run_setup(training, args()[3], "full", 1)
    assert full.reference_copy
    added = estimate(shape, full)["total"] - estimate(shape, replace(full, reference_copy=False))["total"]
    assert abs(added - shape.total * full.bytes_per_weight * (1 + PERSISTENT_SLACK)) < 1
    assert not run_setup(args("--pref_loss", "simpo")[2], args()[3], "full", 1).reference_copy
    assert not run_setup(args("--use_lora")[2], args()[3], "lora", 1).reference_copy
    assert plan("--pref_loss", "orpo").objective.why.startswith("none (reference-free")
    assert plan("--deepspeed", "ds_configs/zero3.json").objective.why.startswith(
        "a frozen copy of the base model, partitioned like the policy")
    zero3 = run_setup(args("--deepspeed", "ds_configs/zero3.json")[2], args()[3], "full", 2)
    sharded = estimate(shape, zero3)["total"] - estimate(shape, replace(zero3, reference_copy=False))["total"]
    assert abs(sharded - shape.total * zero3.bytes_per_weight / 2 * (1 + PERSISTENT_SLACK)) < 1  # half per GPU
