"""Attention and packing: decided from what the model class declares; packed samples isolated in forward and backward.

The decision runs with a pretended CUDA device (it is a pure function of the flags, the class and the runtime), so the
CUDA branches are covered here; flex_attention's forward runs on CPU (torch 2.13), its backward only on CUDA.
"""

import sys
import types

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from chattune.errors import ConfigError
from chattune.train.architecture import (
    ModelClass,
    choose_attention,
    flash_attn_problem,
    model_class,
)
from chattune.train.batches import PackingCollator
from chattune.train.hf import use_common_dtype_in_flex_attention

NATIVE = ModelClass("Qwen2ForCausalLM", remote_code=False, sdpa=True, flash=True, flex=True, proven=True)
REMOTE = ModelClass("QWenLMHeadModel", remote_code=True)
NO_FLEX = ModelClass("GPT2LMHeadModel", remote_code=False, sdpa=True, flash=True, flex=False, proven=True)
OLD_STYLE = ModelClass("BloomForCausalLM", remote_code=False, sdpa=False, flash=False, flex=False,
                       packing_why="samples of a packed row see each other (logits differ by 6.8)")


@pytest.mark.parametrize("cls, cuda, flash_problem, expected", [
    (NATIVE, True, None, ("flash_attention_2", True)),  # flash-attn runs: first choice, packed
    (NATIVE, True, "flash-attn does not import", ("flex_attention", True)),  # else flex for packed rows
    (NATIVE, False, "no CUDA GPU", ("sdpa", False)),  # CPU: padded sdpa
    (NO_FLEX, True, "flash-attn does not import", ("sdpa", False)),  # no kernel that skips blocks: padded
    (NO_FLEX, True, None, ("flash_attention_2", True)),
    (REMOTE, True, None, (None, False)),  # remote code: its own attention, padded
    (OLD_STYLE, True, None, ("eager", False)),  # no sdpa declared: eager
])
def test_auto_decision_asks_the_model_class(cls, cuda, flash_problem, expected):
    choice = choose_attention("auto", "auto", cls, cuda=cuda, flash_problem=flash_problem)
    assert (choice.implementation, choice.packing) == expected
    if not choice.packing:  # the plan says why batches are padded
        assert any("padded" in note for note in choice.notes)


def test_torch_varlen_is_opt_in_packed_and_refused_where_it_cannot_run():
    """torch's varlen attention: chosen only when asked (auto stays flash-attn / flex until a GPU run shows it
    pays), always on packed rows, refused with the reason where it cannot run."""
    assert choose_attention("auto", "auto", NATIVE, cuda=True, flash_problem="x", varlen_problem=None
                            ).implementation == "flex_attention"
    asked = choose_attention("torch_varlen", "auto", NATIVE, cuda=True, flash_problem="x", varlen_problem=None)
    assert (asked.implementation, asked.packing) == ("torch_varlen", True)
    with pytest.raises(ConfigError, match="torch_varlen: no CUDA GPU"):
        choose_attention("torch_varlen", "auto", NATIVE, cuda=False, flash_problem="x")
    with pytest.raises(ConfigError, match="torch_varlen attends within packed rows: drop --packing false"):
        choose_attention("torch_varlen", "false", NATIVE, cuda=True, flash_problem="x", varlen_problem=None)
    with pytest.raises(ConfigError, match="BloomForCausalLM does not support it"):
        choose_attention("torch_varlen", "auto", OLD_STYLE, cuda=True, flash_problem="x", varlen_problem=None)


def test_explicit_packing_or_kernel_the_class_cannot_honour_is_an_error():
    with pytest.raises(ConfigError, match="QWenLMHeadModel cannot train on packed rows .*remote.*--packing false"):
        choose_attention("auto", "true", REMOTE, cuda=True, flash_problem=None)
    with pytest.raises(ConfigError, match="BloomForCausalLM cannot train on packed rows"):
        choose_attention("auto", "true", OLD_STYLE, cuda=True, flash_problem=None)
    with pytest.raises(ConfigError, match="GPT2LMHeadModel does not support it"):
        choose_attention("flex_attention", "auto", NO_FLEX, cuda=True, flash_problem=None)
    with pytest.raises(ConfigError, match="flash-attn does not import"):
        choose_attention("flash_attention_2", "auto", NATIVE, cuda=True, flash_problem="flash-attn does not import")
    # what can be honoured is: packing on CPU with sdpa (isolation tested below), padded flex on CUDA
    assert choose_attention("auto", "true", NATIVE, cuda=False, flash_problem="x").packing
    assert choose_attention("auto", "false", NATIVE, cuda=True, flash_problem="x").implementation == "sdpa"


@pytest.mark.slow
def test_model_class_reads_declared_support_and_remote_code(model_dirs):
    config = AutoConfig.from_pretrained(model_dirs("qwen2"))
    cls = model_class(config, trust_remote_code=True)
    assert (cls.name, cls.remote_code, cls.flex, cls.flash, cls.packs) == ("Qwen2ForCausalLM", False, True, True, True)
    config.auto_map = {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}  # what Qwen-7B-Chat's config says
    # its code is not there to read: the model's own logits (no logits_to_keep) are assumed
    assert model_class(config, trust_remote_code=True) == ModelClass("QWenLMHeadModel", remote_code=True,
                                                                     logits_to_keep=False)
    assert not model_class(config, trust_remote_code=True).packs
    assert model_class(config, trust_remote_code=False).name == "Qwen2ForCausalLM"  # no remote code runs then


def test_flash_attn_detected_by_import_capability_and_dtype(monkeypatch):
    """Package presence is not enough: it must import, on Ampere+, computing in bf16/fp16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    broken = types.ModuleType("flash_attn")
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # installed but broken: import raises
    assert "does not import" in flash_attn_problem(torch.bfloat16)
    monkeypatch.setitem(sys.modules, "flash_attn", broken)
    assert flash_attn_problem(torch.bfloat16) is None
    assert "bf16" in flash_attn_problem(torch.float32)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))  # T4, V100-class
    assert "Ampere" in flash_attn_problem(torch.bfloat16)


def test_run_refuses_packing_on_a_remote_code_model_before_tokenizing(model_dirs, tmp_path):
    import json

    from chattune.train.args import parse_args
    from chattune.train.run import run

    remote = tmp_path / "remote"
    remote.mkdir()
    for f in model_dirs("qwen2").iterdir():
        (remote / f.name).write_bytes(f.read_bytes())
    config = json.loads((remote / "config.json").read_text())
    (remote / "modeling_fake.py").write_text(
        "from transformers import Qwen2ForCausalLM\nclass FakeRemoteLM(Qwen2ForCausalLM):\n    pass\n")
    (remote / "configuration_fake.py").write_text(
        "from transformers import Qwen2Config\nclass FakeConfig(Qwen2Config):\n    model_type = 'qwen2'\n")
    config["auto_map"] = {"AutoConfig": "configuration_fake.FakeConfig",
                          "AutoModelForCausalLM": "modeling_fake.FakeRemoteLM"}
    (remote / "config.json").write_text(json.dumps(config))
    cache = tmp_path / "cache"
    argv = ["--model_name_or_path", str(remote), "--data_path", "examples/sharegpt.json", "--output_dir",
            str(tmp_path / "out"), "--use_cpu", "True", "--packing", "true", "--data_cache_dir", str(cache)]
    with pytest.raises(ConfigError, match="FakeRemoteLM cannot train on packed rows"):
        run(*parse_args(argv))
    assert not cache.exists()  # refused before any tokenization


# --------------------------------------------------------------------------------------------------------------
# Isolation of packed samples
# --------------------------------------------------------------------------------------------------------------


def samples(lengths=(9, 14, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(100, 5000, (n,), generator=g).tolist(), "labels": [1] * n} for n in lengths]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_loss_on_one_packed_sample_gives_zero_gradient_to_the_others(model, attn):
    """Backward isolation: a loss on sample 1 alone must not reach the inputs of samples 0 and 2 (exactly zero)."""
    model.set_attn_implementation(attn)
    batch = PackingCollator()(samples())
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, position_ids=batch["position_ids"]).logits
    logits[0, 9:23].float().logsumexp(-1).sum().backward()
    grad = embeds.grad[0].abs().sum(-1)
    assert torch.all(grad[:9] == 0) and torch.all(grad[23:] == 0)
    assert torch.all(grad[9:23] > 0)
    model.set_attn_implementation("sdpa")


@torch.no_grad()
def assert_each_sample_as_alone(packed, parts, model):
    """The logits of each sample's span of a packed row equal `model`'s on that sample run on its own."""
    start = 0
    for part in parts:
        n = len(part["input_ids"])
        alone = model(input_ids=torch.tensor([part["input_ids"]])).logits[0]
        torch.testing.assert_close(packed[start:start + n], alone, rtol=1e-4, atol=1e-4)
        start += n


@pytest.fixture
def static_flex_compiles():
    """Each compiled flex_attention test compiles its own kernels for static shapes: on CPU, torch 2.13's inductor
    fails to compile the dynamic-shape kernel it builds after a second sequence length (CppCompileError,
    'cur_qSplitSize2' was not declared), a compiler bug of the CPU path only, not of the code under test."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        yield
    torch._dynamo.reset()


@pytest.fixture
def eager_flex_on_cpu(monkeypatch):
    """transformers' flex_attention path with torch's flex_attention run uncompiled: on CPU, torch 2.13's inductor
    kernel for it depends on the host. On AMD EPYC (AVX2) with 2 threads it is wrong: on a plain causal mask the
    compiled kernel differs from sdpa by 1.2 while the uncompiled one agrees to 4e-7 (the hosts of earlier CI runs
    compiled it right). What this test checks is ours, the block mask from packed position_ids, and the uncompiled
    kernel is the same math; the compiled CUDA kernel is checked by tests/test_packing.py's GPU test. Training never
    runs flex_attention on CPU (the plan picks sdpa there)."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as hf_flex

    def uncompiled(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", uncompiled)
    yield


@pytest.mark.slow
@pytest.mark.usefixtures("eager_flex_on_cpu")
def test_flex_attention_forward_on_cpu_isolates_packed_samples(model_dirs):
    """transformers' flex_attention path on CPU: the block mask built from restarting position_ids keeps samples apart
    and gives the padded-free result of each sample run alone."""
    from transformers.masking_utils import find_packed_sequence_indices

    m = AutoModelForCausalLM.from_pretrained(model_dirs("qwen2"), dtype=torch.float32,
                                             attn_implementation="flex_attention").eval()
    m.config.use_cache = False
    parts = samples(lengths=(40, 70, 18), seed=3)
    batch = PackingCollator()(parts)
    assert find_packed_sequence_indices(batch["position_ids"]).tolist() == [[0] * 40 + [1] * 70 + [2] * 18]
    with torch.no_grad():
        packed = m(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    assert_each_sample_as_alone(packed, parts, m)


@pytest.mark.usefixtures("static_flex_compiles")
def test_flex_attention_with_fp32_master_weights_under_bf16_autocast(model_dirs):
    """Full fine-tuning keeps fp32 weights; under bf16 autocast RoPE leaves q/k in fp32 and v in bf16. The kernel gets
    one dtype (the autocast one) and the result matches sdpa, which autocast casts the same way."""
    from transformers import AttentionInterface

    use_common_dtype_in_flex_attention()
    use_common_dtype_in_flex_attention()  # idempotent: registered once
    wrapper = AttentionInterface._global_mapping["flex_attention"]
    assert wrapper.casts_to_common_dtype
    seen = []
    inner = wrapper.__closure__[0].cell_contents  # transformers' own flex_attention_forward

    def spy(module, q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return inner(module, q, k, v, *args, **kwargs)

    wrapper.__closure__[0].cell_contents = spy
    try:
        batch = PackingCollator()(samples(lengths=(20, 30), seed=5))
        out = {}
        for attn in ("flex_attention", "sdpa"):
            m = AutoModelForCausalLM.from_pretrained(model_dirs("qwen2"), dtype=torch.float32,
                                                     attn_implementation=attn).eval()
            m.config.use_cache = False
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                out[attn] = m(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.float()
    finally:
        wrapper.__closure__[0].cell_contents = inner
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen)
    error = (out["flex_attention"] - out["sdpa"]).norm() / out["sdpa"].norm()
    assert error < 1e-2  # bf16 rounding in different kernels


# --------------------------------------------------------------------------------------------------------------
# torch's varlen attention (--attn_implementation torch_varlen): its kernel is CUDA-only; here a reference kernel with
# its signature (per-sample causal sdpa) stands in, so what is ours is tested on CPU: the layout in and out, GQA,
# the scale, the sliding window, the boundaries from the collator, and that transformers builds no mask that would
# mix samples. tests/test_gpu.py runs the real kernel against sdpa.
# --------------------------------------------------------------------------------------------------------------


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """varlen_attn's contract, computed per sample with sdpa: (tokens, heads, dim) in and out."""
    assert q.dim() == k.dim() == 3 and cu_q.dtype == cu_k.dtype == torch.int32
    assert enable_gqa == (q.shape[1] != k.shape[1])
    out = torch.empty_like(q)
    bounds = cu_q.tolist()
    assert max_q == max(b - a for a, b in zip(bounds, bounds[1:]))
    for a, b in zip(bounds, bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        n = b - a
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        keep = (j <= i) if window_size[1] == 0 else torch.ones(n, n, dtype=torch.bool)
        if window_size[0] >= 0:
            keep &= i - j <= window_size[0]
        o = torch.nn.functional.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=keep, scale=scale,
                                                             enable_gqa=enable_gqa)
        out[a:b] = o[0].transpose(0, 1)
    return out


@pytest.fixture
def varlen_on_cpu(monkeypatch):
    from chattune.train import varlen

    calls = []

    def kernel(*args, **kwargs):
        calls.append(kwargs)
        return reference_varlen(*args, **kwargs)

    monkeypatch.setattr(varlen, "_kernel", lambda: kernel)
    varlen.register()
    return calls


@pytest.mark.parametrize("sliding_window", [None, 16])
def test_torch_varlen_keeps_packed_samples_apart_and_equals_each_alone(model_dirs, varlen_on_cpu, sliding_window):
    config = AutoConfig.from_pretrained(model_dirs("qwen2"), use_cache=False)
    if sliding_window:  # every layer a sliding-window one
        config.use_sliding_window, config.sliding_window = True, sliding_window
        config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    m, ref = (AutoModelForCausalLM.from_pretrained(model_dirs("qwen2"), config=config, dtype=torch.float32,
                                                   attn_implementation=attn).eval() for attn in ("torch_varlen", "eager"))
    assert m.config.num_key_value_heads < m.config.num_attention_heads  # GQA
    parts = samples(lengths=(40, 70, 18), seed=3)
    batch = PackingCollator(boundaries=True)(parts)
    with torch.no_grad():
        packed = m(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    assert_each_sample_as_alone(packed, parts, ref)
    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    assert len(varlen_on_cpu) == m.config.num_hidden_layers
    head_dim = m.config.hidden_size // m.config.num_attention_heads
    assert all(c["window_size"] == window and c["scale"] == head_dim ** -0.5 for c in varlen_on_cpu)


def test_torch_varlen_without_boundaries_says_what_to_do(model_dirs, varlen_on_cpu):
    m = AutoModelForCausalLM.from_pretrained(model_dirs("qwen2"), dtype=torch.float32,
                                             attn_implementation="torch_varlen").eval()
    with pytest.raises(ConfigError, match="attends within packed rows.*--packing true"):
        m(input_ids=torch.tensor([[5, 6, 7]]))
