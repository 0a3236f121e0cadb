"""The chunked fused loss (chattune.train.loss): its gradients, formed chunk by chunk in the forward, equal autograd's
through the model's own formula, and a bf16 output layer's gradient is summed over the chunks in fp32."""

import pytest
import torch
import torch.nn.functional as F

from chattune.train import loss as L
from chattune.train.loss import LogitTransform, chunked_loss_sum

N, H, V = 300, 24, 97


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 32 positions, so 300 positions take 10 chunks (the last one short)."""
    monkeypatch.setattr(L, "MIN_CHUNK_TOKENS", 32)
    monkeypatch.setattr(L, "MAX_CHUNK_TOKENS", 32)


def reference(h, weight, bias, y, transform):
    return F.cross_entropy(transform.apply(F.linear(h, weight, bias).float()), y, reduction="sum")


@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(scale=0.25), LogitTransform(softcap=3.0),
                                       LogitTransform(scale=2.0, softcap=5.0)], ids=lambda t: t.describe())
@pytest.mark.parametrize("with_bias", [False, True])
def test_loss_and_gradients_equal_autograd(small_chunks, transform, with_bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=with_bias)
    head.weight.data *= 4  # logits of a few units: the soft-cap bends them
    h = torch.randn(N, H, requires_grad=True)
    y = torch.randint(0, V, (N,))
    ours = chunked_loss_sum(head, h, y, V, transform)
    (ours * 0.37).backward()  # an upstream gradient that is not 1
    got = [h.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if with_bias else [])
    h.grad = None
    head.zero_grad()
    ref = reference(h, head.weight, head.bias, y, transform)
    (ref * 0.37).backward()
    want = [h.grad, head.weight.grad] + ([head.bias.grad] if with_bias else [])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_frozen_output_layer_gets_no_gradient_and_hidden_states_do(small_chunks):
    torch.manual_seed(1)
    head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    h = torch.randn(N, H, requires_grad=True)
    y = torch.randint(0, V, (N,))
    chunked_loss_sum(head, h, y, V).backward()
    assert head.weight.grad is None
    grad, h.grad = h.grad.clone(), None
    reference(h, head.weight, None, y, LogitTransform()).backward()
    torch.testing.assert_close(grad, h.grad, rtol=1e-5, atol=1e-6)


def test_without_gradients_the_loss_is_the_same(small_chunks):
    torch.manual_seed(2)
    head = torch.nn.Linear(H, V)
    h, y = torch.randn(N, H), torch.randint(0, V, (N,))
    with torch.no_grad():
        plain = chunked_loss_sum(head, h, y, V)
        ref = reference(h, head.weight, head.bias, y, LogitTransform())
    torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-4)


def test_bf16_output_layer_gradient_is_summed_over_chunks_in_fp32(small_chunks):
    """A bf16 weight's gradient summed chunk by chunk in bf16 (what autograd does for checkpointed chunks) drifts
    from the exact sum; summed in fp32 and rounded once it is close to the exact gradient of the same bf16 math."""
    torch.manual_seed(3)
    n = 32 * 64  # 64 chunks
    head = torch.nn.Linear(H, V, bias=False).to(torch.bfloat16)
    h = torch.randn(n, H).to(torch.bfloat16)
    y = torch.randint(0, V, (n,))
    chunked_loss_sum(head, h, y, V).backward()
    ours = head.weight.grad.double()
    # The exact sum of every chunk's bf16 gradient (as each chunk's matmul rounds it), in fp64
    exact = torch.zeros(V, H, dtype=torch.float64)
    bf16_sum = torch.zeros(V, H, dtype=torch.bfloat16)
    for start in range(0, n, 32):
        w = head.weight.detach().requires_grad_(True)
        F.cross_entropy(F.linear(h[start:start + 32], w).float(), y[start:start + 32], reduction="sum").backward()
        exact += w.grad.double()
        bf16_sum += w.grad
    ours_error = (ours - exact).abs().mean() / exact.abs().mean()
    bf16_error = (bf16_sum.double() - exact).abs().mean() / exact.abs().mean()
    assert ours_error < 2 ** -9  # one bf16 rounding at the end
    assert bf16_error > 4 * ours_error  # what summing in bf16 would have given


def test_adapted_or_disabled_wrapper_uses_the_weight_its_forward_uses(small_chunks):
    peft = pytest.importorskip("peft")
    torch.manual_seed(4)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(H, H)
            self.lm_head = torch.nn.Linear(H, V, bias=False)

    model = peft.get_peft_model(Tiny(), peft.LoraConfig(target_modules=["body"], modules_to_save=["lm_head"]))
    wrapper = model.base_model.model.lm_head
    with torch.no_grad():
        next(iter(wrapper.modules_to_save.values())).weight.mul_(3)  # the trained copy differs from the original
    h, y = torch.randn(N, H), torch.randint(0, V, (N,))
    for disabled in (False, True):
        wrapper.enable_adapters(not disabled)
        with torch.no_grad():
            want = F.cross_entropy(wrapper(h).float(), y, reduction="sum")
            torch.testing.assert_close(chunked_loss_sum(wrapper, h, y, V), want, rtol=1e-5, atol=1e-4)


def test_output_layer_matmuls_training_and_evaluation(small_chunks):
    """Training runs three output-layer matmuls per chunk (logits, the hidden states' and the weight's gradients) where
    a chunk recomputed in backward runs four; evaluation runs one."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(5)
    head = torch.nn.Linear(H, V, bias=False)
    h, y = torch.randn(N, H, requires_grad=True), torch.randint(0, V, (N,))
    one = 2 * N * H * V  # one (N x H) @ (H x V) matmul
    with FlopCounterMode(display=False) as train:
        chunked_loss_sum(head, h, y, V).backward()
    with torch.no_grad(), FlopCounterMode(display=False) as evaluation:
        chunked_loss_sum(head, h, y, V)
    assert train.get_total_flops() == 3 * one
    assert evaluation.get_total_flops() == one


@pytest.mark.parametrize("select", ["shifted_targets", "preference"])
def test_trained_positions_are_selected_without_copying_the_logits_whole(select):
    """The logits of a micro-batch are its largest tensor (rows x length x vocabulary); of a chat sample most positions
    are prompt or padding. Selecting the positions that predict a trained token copies only those: the elements of
    every tensor the selection creates add up to less than a tenth of the logits, and the result equals the
    reference (the shift, then the flat mask)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from chattune.train.preference import _shifted

    class Created(TorchDispatchMode):
        elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and func not in (torch.ops.aten.slice.Tensor, torch.ops.aten.view.default,
                                                                torch.ops.aten.alias.default):
                    self.elements += t.numel()
            return out

    torch.manual_seed(0)
    rows, length = 4, 64
    logits = torch.randn(rows, length, V)
    labels = torch.full((rows, length), L.IGNORE_INDEX)
    labels[:, 60:] = torch.randint(0, V, (rows, 4))  # the answer: the last 4 positions of each row
    index = torch.arange(rows)[:, None].expand(rows, length)
    with Created() as created:
        got = L.shifted_targets(logits, labels) if select == "shifted_targets" else _shifted(logits, labels, index)
    flat = labels[:, 1:].reshape(-1) != L.IGNORE_INDEX
    want = (logits[:, :-1].reshape(-1, V)[flat], labels[:, 1:].reshape(-1)[flat], index[:, 1:].reshape(-1)[flat])
    for a, b in zip(got, want, strict=False):
        assert torch.equal(a, b)
    assert got[0].shape == (rows * 4, V)
    assert created.elements < logits.numel() / 10, created.elements
