"""Packing only where isolation is proven (chattune.train.packing_proof), and Gated DeltaNet packs exactly."""

import json

import pytest
import torch
import transformers

from chattune.errors import ConfigError
from chattune.train import packing_proof
from chattune.train.architecture import ModelClass, choose_attention, model_class
from chattune.train.hf import install_packed_linear_attention

SHIPPED = json.loads(packing_proof.PROOF_FILE.read_text())["proofs"].get(transformers.__version__, {"classes": {}})


def test_the_shipped_proof_is_for_the_installed_transformers():
    assert packing_proof.proof_for_this_transformers() == SHIPPED
    assert json.loads(packing_proof.PROOF_FILE.read_text())["tolerance"] == packing_proof.TOLERANCE
    proven = {name for name, v in SHIPPED["classes"].items() if v["packs"]}
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "MistralForCausalLM",
            "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM", "Qwen3_5ForConditionalGeneration"} <= proven
    assert all(v["error"] is not None and v["error"] <= packing_proof.TOLERANCE
               for v in SHIPPED["classes"].values() if v["packs"])


@pytest.mark.parametrize("name, packs", [("Qwen2ForCausalLM", True), ("Qwen3_5ForCausalLM", True),
                                         ("Qwen3_5MoeForConditionalGeneration", True), ("Lfm2ForCausalLM", False),
                                         ("MiniMaxForCausalLM", False), ("BloomForCausalLM", False)])
def test_a_class_proves_now_what_the_shipped_proof_says(name, packs):
    now = packing_proof.prove(getattr(transformers, name))
    assert now.packs == packs == SHIPPED["classes"][name]["packs"], now
    if not packs:  # the leak is measured, not guessed
        assert now.error > 1e-2 and "see each other" in now.why


@pytest.mark.slow
def test_the_whole_mapping_proves_as_shipped():
    """Every causal-LM class of transformers, recomputed: the shipped file cannot claim what the code does not show."""
    now = {name: packing_proof.prove(cls) for name, cls in packing_proof.classes().items()}
    assert {n for n, v in now.items() if v.packs} == {n for n, v in SHIPPED["classes"].items() if v["packs"]}
    assert set(now) == set(SHIPPED["classes"])


def test_gated_deltanet_leaks_without_its_boundaries():
    """The proof is not vacuous: the Gated DeltaNet layers (torch path) let samples see each other unless they get
    the boundaries, which only our replacement of the library's torch fallbacks reads (installed here, not left to
    whichever test ran before in this process)."""
    cls = transformers.Qwen3_5ForCausalLM
    config = packing_proof.tiny_config(cls)
    assert install_packed_linear_attention(config.model_type)
    assert packing_proof.isolation_error(cls, config, boundaries=False) > 1e-2
    assert packing_proof.isolation_error(cls, config, boundaries=True) <= packing_proof.TOLERANCE


def test_a_class_that_leaks_is_padded_under_auto_and_refused_under_true():
    lfm2 = model_class(transformers.Lfm2Config(), trust_remote_code=False)
    assert not lfm2.packs and "logits differ by" in lfm2.packing_why
    auto = choose_attention("auto", "auto", lfm2, cuda=True, flash_problem=None)
    assert not auto.packing and any("cannot train on packed rows (samples of a packed row see each other" in note
                                    for note in auto.notes)
    with pytest.raises(ConfigError, match=r"--packing true: Lfm2ForCausalLM cannot train on packed rows \(samples of a "
                                          r"packed row see each other \(logits differ by [\d.]+\)\)"):
        choose_attention("auto", "true", lfm2, cuda=True, flash_problem=None)


def test_packing_auto_turns_on_for_gated_deltanet_on_cuda():
    """sdpa computes the masked blocks of a packed row, but the linear-attention layers (most of Qwen3.5's) lose all
    their padding work: auto packs them on CUDA (a pretended device), and the rows carry their boundaries."""
    qwen35 = model_class(transformers.Qwen3_5TextConfig(), trust_remote_code=False)
    assert qwen35.packs and qwen35.linear_attention
    cuda = choose_attention("auto", "auto", qwen35, cuda=True, flash_problem="flash-attn does not import")
    assert (cuda.implementation, cuda.packing) == ("sdpa", True)
    assert not choose_attention("auto", "auto", qwen35, cuda=False, flash_problem="no CUDA GPU").packing
    dense = ModelClass("Qwen2ForCausalLM", False, proven=True)
    assert not choose_attention("auto", "auto", dense, cuda=True, flash_problem="flash-attn does not import").packing


def gated_model(moe: bool):
    cls = transformers.Qwen3_5MoeForCausalLM if moe else transformers.Qwen3_5ForCausalLM
    config = packing_proof.tiny_config(cls)
    config._attn_implementation = "sdpa"
    if hasattr(config, "_experts_implementation"):
        config._experts_implementation = "eager"
    torch.manual_seed(0)
    install_packed_linear_attention(config.model_type)
    return cls(config).to(torch.float64).train()


@pytest.mark.parametrize("moe", [False, True])
def test_packed_equals_padded_in_loss_and_every_gradient(moe):
    """Tiny Qwen3.5 (dense and MoE, Gated DeltaNet + full attention): the same samples as one packed row (boundaries
    passed as the collator passes them) and as a right-padded batch give the same summed loss and the same
    gradient of every parameter, within 1e-6 of the gradient's scale (the model runs in float64, but its norms
    compute in float32: rounding differs at ~1e-7 relative; a leak moves them by far more)."""
    from chattune.train.batches import PackingCollator, PaddingCollator
    from chattune.train.loss import logits_loss_sum

    model = gated_model(moe)
    g = torch.Generator().manual_seed(1)
    features = []
    for n in (9, 70, 5, 33):
        ids = torch.randint(3, 400, (n,), generator=g).tolist()
        features.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})

    def loss_and_grads(batch):
        model.zero_grad()
        labels = batch.pop("labels")
        total = logits_loss_sum(model(**batch, use_cache=False).logits, labels)
        total.backward()
        return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    packed_loss, packed = loss_and_grads(PackingCollator(boundaries=True)(features))
    padded_loss, padded = loss_and_grads(PaddingCollator(0)(features))
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-9, abs=1e-6)
    assert packed.keys() == padded.keys() and len(packed) > 10
    for name, grad in padded.items():
        assert (packed[name] - grad).abs().max() <= 1e-6 * grad.abs().max().clamp(min=1), name


@pytest.mark.gpu
def test_the_cuda_kernels_keep_samples_apart_like_the_torch_reference():
    """flash-linear-attention (cu_seqlens) and causal-conv1d (seq_idx) on a packed row against the exact torch path
    (needs both packages: pip install -r requirements-cuda.txt)."""
    pytest.importorskip("fla")
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m

    from chattune.train.hf import _torch_function
    from chattune.train.linear_attention import (
        masked_causal_conv1d,
        packed_causal_conv1d,
        packed_chunk_gated_delta_rule,
        segmented_chunk_rule,
        seq_idx_of,
    )

    torch.manual_seed(0)
    device, length, heads, v_heads, dim = "cuda", 300, 2, 4, 64
    cu = torch.tensor([0, 37, 101, 230, 300], dtype=torch.int32, device=device)
    q, k = (torch.randn(1, length, heads, dim, device=device) for _ in range(2))
    v = torch.randn(1, length, v_heads, dim, device=device)
    g, beta = -torch.rand(1, length, v_heads, device=device) * 0.5, torch.rand(1, length, v_heads, device=device)
    rule = _torch_function(m.torch_chunk_gated_delta_rule)
    kernel, _ = packed_chunk_gated_delta_rule(rule, q, k, v, g, beta, use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    reference = segmented_chunk_rule(rule, q, k, v, g, beta, cu, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(kernel.float(), reference.float(), rtol=2e-3, atol=2e-3)
    channels = 256
    x = torch.randn(1, length, channels, device=device).transpose(1, 2)  # channel-last, as the layer makes it
    w = torch.randn(channels, 4, device=device)
    conv = packed_causal_conv1d(_torch_function(m.causal_conv1d_fn), x, w, None, "silu", cu_seq_lens_q=cu)
    torch.testing.assert_close(conv, masked_causal_conv1d(x, w, None, "silu", seq_idx_of(cu, length)),
                               rtol=2e-3, atol=2e-3)
