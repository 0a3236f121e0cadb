"""Packing and fused loss: literal collator outputs, identical loss/gradients to padding, sample isolation."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from chattune.train.batches import (
    PackingCollator,
    PaddingCollator,
    pack_bins,
)
from chattune.train.loss import fused_loss_sum

SAMPLES = [
    {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
    {"input_ids": [9, 10, 11], "labels": [-100, 10, 11]},
    {"input_ids": [12, 13, 14, 15, 16], "labels": [-100, -100, -100, 15, 16]},
]


def test_padding_collator_literal():
    batch = PaddingCollator(pad_token_id=0, pad_to_multiple_of=4)(SAMPLES[:2])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, 11, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert PaddingCollator(0, 8)(SAMPLES[:1])["input_ids"].shape == (1, 8)


def test_packing_collator_literal():
    samples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = PackingCollator(boundaries=True)(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # a sample's first token would be predicted from the previous sample's last one: never a target
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == 3 and "attention_mask" not in batch
    assert "cu_seq_lens_q" not in PackingCollator()(samples)


def test_pack_bins_best_fit_decreasing():
    assert pack_bins([5, 3, 8, 2, 7], budget=10) == [[2, 3], [4, 1], [0]]
    lengths = [(i * 37) % 100 + 1 for i in range(500)]
    bins = pack_bins(lengths, 256)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    assert len(bins) <= sum(lengths) / 256 * 1.05 + 1  # nearly full bins
    with pytest.raises(ValueError, match="more than the 10-token micro-batch budget"):
        pack_bins([11], 10)


def random_samples(seed=0, lengths=(9, 14, 6)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(100, 5000, (n,), generator=g).tolist()
        labels = [-100] * (n // 2) + ids[n // 2:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def loss_and_grads(model, batch, fused: bool, num_items):
    model.zero_grad()
    labels = batch.pop("labels")
    if fused:
        hidden = model.model(**batch).last_hidden_state
        loss = fused_loss_sum("chunked", model.lm_head, hidden, labels) / num_items
    else:
        loss = model(**batch, labels=labels, num_items_in_batch=num_items).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_padded_loss_and_gradients(model, attn):
    model.set_attn_implementation(attn)
    samples = random_samples()
    num_items = torch.tensor(sum(sum(x != -100 for x in s["labels"][1:]) for s in samples))
    padded = loss_and_grads(model, PaddingCollator(0)(samples), fused=False, num_items=num_items)
    for packed_fused in (False, True):
        packed = loss_and_grads(model, PackingCollator()(samples), fused=packed_fused, num_items=num_items)
        torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=0)
        for name, grad in padded[1].items():
            torch.testing.assert_close(packed[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    model.set_attn_implementation("sdpa")


def test_fused_chunked_loss_equals_standard_and_splits_over_accumulation(model):
    samples = random_samples(seed=1, lengths=(20, 31, 17, 8))
    num_items = torch.tensor(sum(sum(x != -100 for x in s["labels"][1:]) for s in samples))
    whole, _ = loss_and_grads(model, PaddingCollator(0)(samples), fused=False, num_items=num_items)
    # two micro-batches normalized by the global trained-token count add up to the global-batch loss
    halves = [loss_and_grads(model, PackingCollator()(part), fused=True, num_items=num_items)[0]
              for part in (samples[:2], samples[2:])]
    torch.testing.assert_close(sum(halves), whole, rtol=1e-5, atol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_samples_in_a_packed_row_cannot_see_each_other(model, attn):
    model.set_attn_implementation(attn)
    samples = random_samples(seed=2)
    changed = [dict(s) for s in samples]
    changed[1] = {"input_ids": [7] * len(samples[1]["input_ids"]), "labels": samples[1]["labels"]}
    a = model(**{k: v for k, v in PackingCollator()(samples).items() if k != "labels"}).logits[0]
    b = model(**{k: v for k, v in PackingCollator()(changed).items() if k != "labels"}).logits[0]
    n0, n1 = len(samples[0]["input_ids"]), len(samples[1]["input_ids"])
    torch.testing.assert_close(a[:n0], b[:n0])  # before the changed sample: trivially equal (causal)
    torch.testing.assert_close(a[n0 + n1:], b[n0 + n1:])  # after it: equal only if attention stays in the sample
    assert not torch.allclose(a[n0:n0 + n1], b[n0:n0 + n1])
    model.set_attn_implementation("sdpa")


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["flex_attention", "flash_attention_2", "sdpa", "torch_varlen"])
@torch.no_grad()
def test_packed_isolation_and_equality_on_cuda(model_dirs, attn):
    import importlib.util

    from chattune.train import varlen

    if attn.startswith("flash") and not importlib.util.find_spec("flash_attn"):
        pytest.skip("flash-attn not installed")
    if attn == "torch_varlen":
        if varlen.varlen_problem(True):
            pytest.skip(varlen.varlen_problem(True))
        varlen.register()
    m = AutoModelForCausalLM.from_pretrained(model_dirs("qwen2"), dtype=torch.bfloat16, attn_implementation=attn)
    m = m.cuda().eval()
    m.config.use_cache = False
    samples = random_samples(seed=3, lengths=(40, 70, 33))
    changed = [dict(s) for s in samples]
    changed[1] = {"input_ids": [7] * 70, "labels": samples[1]["labels"]}

    def run(batch):
        batch = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items() if k != "labels"}
        return m(**batch).logits[0].float()

    collate = PackingCollator(boundaries=attn.startswith(("flash", "torch_varlen")))
    a, b = run(collate(samples)), run(collate(changed))
    torch.testing.assert_close(a[110:], b[110:])
    padded = m(input_ids=PaddingCollator(0)(samples)["input_ids"].cuda(),
               attention_mask=PaddingCollator(0)(samples)["attention_mask"].cuda()).logits.float()
    torch.testing.assert_close(a[40:110], padded[1, :70], rtol=2e-2, atol=2e-2)
