"""The memory planner: parameter counts from configs, literal arithmetic, and the measured H100 anchors."""

from dataclasses import replace

import forkrun
import pytest
from published_profiles import (
    QWEN1,
    QWEN1_SIZES,
    QWEN_PROFILE,
    QWEN_PROFILE_GPU,
    memory_error,
    setup_of,
)
from transformers import Qwen2Config

from chattune.train.memory import (
    GB,
    LOGIT_BYTES,
    LOGIT_FRAGMENTATION,
    PERSISTENT_SLACK,
    RUNTIME_RESERVE,
    ModelShape,
    Setup,
    cheapest_fix,
    estimate,
    run_setup,
    shape_from_config,
)
from chattune.train.timing import estimate_seconds

QWEN25_7B = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def qwen7b():
    return shape_from_config(QWEN25_7B)


def test_parameter_count_matches_the_published_size(qwen7b):
    assert round(qwen7b.total / 1e9, 2) == 7.62  # Qwen2.5-7B: 7.61B parameters (7.62 with biases and norms)
    assert qwen7b.embedding_params == 2 * 152064 * 3584
    # r=1 LoRA on every decoder linear layer: in + out features summed
    per_layer = (3584 + 3584) + 2 * (3584 + 512) + (3584 + 3584) + 3 * (3584 + 18944)
    assert qwen7b.lora_params_per_rank == 28 * per_layer


def test_literal_arithmetic_full_without_deepspeed():
    shape = ModelShape(linear_params=10**9, embedding_params=0, other_params=0, hidden_size=1000,
                       intermediate_size=4000, num_layers=10, vocab_size=1000, lora_params_per_rank=0)
    parts = estimate(shape, Setup(mode="full", micro_batch_tokens=1000, gradient_checkpointing=False, fused_ce=False))
    assert parts["weights"] == parts["gradients"] == 4e9 and parts["optimizer"] == 8e9  # fp32 + Adam
    assert parts["activations"] == 1000 * 10 * (8 * 1000 + 4 * 4000) * 2
    assert parts["logits"] == 1000 * 1000 * LOGIT_BYTES
    # the peak: persistent state with its slack, the larger of (activations + logits) and the step's temporaries
    transient = max(parts["activations"] + parts["logits"] * (1 + LOGIT_FRAGMENTATION), 1e9 * 4)
    assert parts["total"] == pytest.approx(16e9 * (1 + PERSISTENT_SLACK) + transient + RUNTIME_RESERVE)
    zero3 = estimate(shape, Setup(mode="full", gpus=4, zero_stage=3, micro_batch_tokens=1000))
    # a quarter of the bf16 weights, plus up to stage3_max_live_parameters gathered for compute
    assert zero3["weights"] == 2e9 / 4 + 1e9 * 2 and zero3["optimizer"] == 12e9 / 4


# Measured peaks (H100, max_memory_allocated), DESIGN.md "Measured anchors": 7B Qwen2.5 shapes, r=64,
# packed 4096-token micro-batches, gradient checkpointing. These are allocated bytes: what the caching allocator
# reserves (the estimate's target, what decides an out-of-memory error) is more, by the CUDA context and the cached
# blocks, so they bound the estimate from below.
ANCHORS = [("lora", False, 25.0), ("lora", True, 18.6), ("qlora", False, 16.0), ("qlora", True, 9.6)]


@pytest.mark.parametrize("mode,fused,measured_gb", ANCHORS)
def test_estimate_is_above_our_measured_allocated_peaks_and_within_40_percent(qwen7b, mode, fused, measured_gb):
    total = estimate(qwen7b, Setup(mode=mode, micro_batch_tokens=4096, fused_ce=fused))["total"] / GB
    assert measured_gb < total < 1.4 * measured_gb, total


# Qwen's published profile (tests/published_profiles.py): the band the README states.
def test_qwen1_shapes_have_the_published_parameter_counts():
    for name, shape in QWEN1.items():
        assert round(shape.total / 1e9, 2) == QWEN1_SIZES[name]


def test_memory_within_the_stated_band_of_every_published_row():
    """README: all 81 rows of Qwen's profile within -10%..+30%, 69 of them within -5%..+15%."""
    errors = {(r.model, r.method, r.gpus, r.tokens): memory_error(r) for r in QWEN_PROFILE}
    assert len(errors) == 81
    outside = {k: f"{e:+.1%}" for k, e in errors.items() if not -0.10 <= e <= 0.30}
    assert not outside
    assert sum(-0.05 <= e <= 0.15 for e in errors.values()) >= 69


def test_time_within_the_stated_band_of_the_published_speed():
    """README: s/it within 25% on 65 of the 81 rows; the single-node LoRA and Q-LoRA rows within 40%."""
    errors = {}
    for r in QWEN_PROFILE:
        seconds = estimate_seconds(QWEN1[r.model], setup_of(r), tokens=8 * r.tokens, gpu=QWEN_PROFILE_GPU)
        errors[r] = (seconds - r.seconds_per_iteration) / r.seconds_per_iteration
    assert sum(abs(e) <= 0.25 for e in errors.values()) >= 65
    single = [e for r, e in errors.items() if r.nodes == 1 and r.method in ("lora", "lora_emb", "qlora")]
    assert len(single) == 66 and max(abs(e) for e in single) <= 0.40


def test_data_summary_counts_padding_and_packing_as_training_batches_them():
    from types import SimpleNamespace

    import numpy as np

    from chattune.train.batches import epoch_steps
    from chattune.train.plan import Decision, plan_batch

    lengths = np.array([100, 30, 70, 10, 90, 50])
    args = SimpleNamespace(tokens_per_step=0, per_device_train_batch_size=2, gradient_accumulation_steps=2, seed=3,
                           data_seed=None, max_steps=0, num_train_epochs=1)
    packed = plan_batch(args, lengths, 1, Decision("packed", ""), 128)
    summary = packed.data_summary(lengths)
    assert summary.tokens == summary.processed_tokens == 350 and summary.peak_micro_batch_tokens <= 128
    assert summary.sequence_tokens == pytest.approx(sum(n * n for n in lengths) / 350)
    padded = plan_batch(args, lengths, 1, Decision("padded", ""), 0)
    # steps of 4 samples (2 per micro-batch x 2 accumulated), sorted by length inside the step, padded to the longest
    expected, peak = 0, 0
    for step in epoch_steps(lengths, padded.shape, 0):
        ordered = sorted(lengths[step].tolist(), reverse=True)
        widths = [2 * ordered[i] if i + 1 < len(ordered) else ordered[i] for i in range(0, len(ordered), 2)]
        expected, peak = expected + sum(widths), max(peak, *widths)
    summary = padded.data_summary(lengths)
    assert summary.processed_tokens == expected > 350 and summary.peak_micro_batch_tokens == peak
    assert summary.micro_batches == 4 and padded.steps_per_epoch == 2 and padded.samples_per_step == 4


def test_verdicts_and_cheapest_changes(qwen7b):
    qlora = Setup(mode="qlora", micro_batch_tokens=4096)
    assert cheapest_fix(qwen7b, qlora, 24) is None
    full = Setup(mode="full", gpus=4, micro_batch_tokens=8192, gradient_checkpointing=False, fused_ce=False)
    assert cheapest_fix(qwen7b, full, 80) == ("--gradient_checkpointing True, --fused_ce auto, "
                                              "--deepspeed ds_configs/zero3.json")
    assert cheapest_fix(qwen7b, Setup(mode="full", micro_batch_tokens=4096), 24) == (
        "1024-token micro-batches (x4 gradient accumulation), --use_lora")
    assert cheapest_fix(qwen7b, Setup(mode="full", micro_batch_tokens=4096), 8) == (
        "does not fit even with Q-LoRA and small micro-batches: use more GPUs or a smaller model")


@pytest.mark.slow
def test_cli_estimate_memory_needs_no_weights(tmp_path):

    QWEN25_7B.save_pretrained(tmp_path)  # config only: no weights exist

    def estimate_memory(*flags):
        return forkrun.script("finetune.py", "--model_name_or_path", tmp_path, "--output_dir", tmp_path / "o",
                              "--estimate_memory", "--use_lora", "--q_lora", "--bf16", "True", "--model_max_length",
                              "4096", "--per_device_train_batch_size", "1", *flags, timeout=300)

    proc = estimate_memory("--gradient_checkpointing", "False")
    assert "7.62B parameters, qlora, 1 GPU(s)" in proc.stdout
    # without gradient checkpointing a 24 GB card needs it: the verdict names the change
    assert "24 GB card: does not fit; cheapest changes: --gradient_checkpointing True" in proc.stdout
    assert "40 GB card: fits" in proc.stdout
    # not given, the plan picks it per card: all layers on 24 GB, none on 80 GB
    planned = estimate_memory().stdout
    assert "gradient checkpointing planned per card" in planned
    assert "24 GB card: fits (recompute all layers)" in planned and "80 GB card: fits (recompute off)" in planned
    # no data: the time of 1,000 worst-case micro-batches per card kind
    assert "per 1,000 micro-batches of 4096 tokens per GPU" in proc.stdout and "RTX 3090" in proc.stdout


@pytest.mark.slow
def test_cli_estimate_with_data_uses_its_lengths(tmp_path):
    """--estimate_memory --data_path: the activations come from the largest real micro-batch, not the flags' worst
    case, and the time is given per epoch of the data."""

    from fixtures import build_model

    model = build_model("qwen2", tmp_path / "m")
    proc = forkrun.script("finetune.py", "--model_name_or_path", model, "--output_dir", tmp_path / "o",
                          "--estimate_memory", "--use_lora", "--data_path", "examples/sharegpt.json", "--packing",
                          "false", "--per_device_train_batch_size", "2", "--num_train_epochs", "2", "--data_cache_dir",
                          tmp_path / "cache", timeout=300)
    assert "data: 13 conversations" in proc.stderr  # the report of the prepared data
    longest = max(len(row["input_ids"]) for row in _rows(tmp_path / "cache"))
    assert f"{2 * longest} tokens per micro-batch" in proc.stdout  # batch 2 x the longest sample, not 2 x 8192
    assert "data: 13 samples, 620 tokens + " in proc.stdout and "padded to the longest of each batch" in proc.stdout
    assert "per epoch" in proc.stdout and "for 2 epoch(s)" in proc.stdout


def _rows(cache):
    from chattune.data.cache import load_cached

    [target] = [p.parent for p in cache.rglob("dataset.arrow")]
    return load_cached(target)


def test_the_run_plan_sizes_activations_by_the_longest_sample_of_padded_data(tmp_path):
    """The plan printed before training uses the prepared data: padded batches are as wide as their longest sample,
    so a 8192-token limit with 300-token samples is estimated at 300 tokens per row, not 8192."""

    from chattune.train.args import parse_args

    QWEN25_7B.save_pretrained(tmp_path / "m")
    _, _, training, lora = parse_args(["--model_name_or_path", str(tmp_path / "m"), "--output_dir", str(tmp_path),
                                       "--data_path", "examples/sharegpt.json", "--use_lora", "--use_cpu", "True",
                                       "--bf16", "False", "--model_max_length", "8192",
                                       "--per_device_train_batch_size", "2", "--gradient_checkpointing", "True"])
    from chattune.train.architecture import ModelClass
    from chattune.train.plan import Hardware, OutputDir, make_plan

    model, data = parse_args(["--model_name_or_path", str(tmp_path / "m"), "--output_dir", str(tmp_path),
                              "--data_path", "examples/sharegpt.json"])[:2]
    shape, setup = shape_from_config(QWEN25_7B), run_setup(training, lora, "lora", 1)
    plan = make_plan(model, data, training, lora, ModelClass("Qwen2ForCausalLM", False, proven=True),
                     [300, 120, 40], Hardware(), OutputDir(str(tmp_path)), has_eval=False, shape=shape)
    gb = plan.memory_gb
    assert setup.micro_batch_tokens == 16384  # the flags' worst case: 2 x 8192
    peak = plan.batch.peak_micro_batch_tokens  # 300 alone, or padded beside a shorter one: 2 x 300
    assert peak in (300, 600) and gb == round(estimate(shape, replace(setup, micro_batch_tokens=peak))["total"] / GB, 1)
    assert gb < round(estimate(shape, setup)["total"] / GB, 1)


def test_planner_counts_linear_attention_layers_and_only_the_active_experts():
    """Qwen3.5-35B-A3B's shape (the MoE config's defaults): the planner's FLOPs grow with the sequence only in its
    10 softmax-attention layers (the 30 Gated DeltaNet layers cost per token), and count a token's 8 of 256 routed
    experts, against counts written from the config's dimensions."""
    import transformers

    from chattune.train.timing import flops_per_token

    config = transformers.Qwen3_5MoeTextConfig()
    shape = shape_from_config(config)
    d, layers = config.hidden_size, config.num_hidden_layers
    softmax_layers = sum(kind == "full_attention" for kind in config.layer_types)
    assert shape.attention_layers == softmax_layers == layers // 4
    assert shape.routed_expert_params == layers * config.num_experts * 3 * d * config.moe_intermediate_size
    assert shape.active_expert_fraction == config.num_experts_per_tok / config.num_experts
    s = Setup(mode="full", gradient_checkpointing=False)
    # forward + backward (2x) of QK^T and AV: 2 x layers x d per token of context, in the softmax layers only
    assert flops_per_token(shape, s, 8192) - flops_per_token(shape, s, 0) == 3 * 2 * softmax_layers * d * 8192
    # every routed expert active instead of 8 of 256: the difference is all the routed weights' forward and backward
    dense = replace(shape, active_expert_fraction=1.0)
    inactive = shape.routed_expert_params * (1 - config.num_experts_per_tok / config.num_experts)
    assert flops_per_token(dense, s, 0) - flops_per_token(shape, s, 0) == pytest.approx(3 * 2 * inactive, rel=1e-9)
    # memory counts every expert at its storage dtype: all 34.7B weights, not the ~3B a token uses
    assert estimate(shape, Setup(mode="lora", micro_batch_tokens=1024))["weights"] >= shape.total * 2


@pytest.mark.parametrize("hidden, tokens", [(1536, 8192), (3584, 4096), (3584, 16384)])
def test_fused_loss_chunks_are_sized_in_tokens_not_as_a_share_of_the_micro_batch(hidden, tokens):
    """Every chunk of the fused loss reads the 152k-row output layer again. Liger's default cuts a micro-batch into
    ceil(vocab / hidden) chunks (99 for a 1.5B Qwen); ours are about 1,024 tokens, for our chunked loss and, through
    chunk_mem_const, for Liger's kernel (its chunking written out here from ops/fused_linear_cross_entropy.py)."""
    import math

    from chattune.train.loss import chunk_tokens, liger_chunk_mem_const

    vocab = 151936
    assert chunk_tokens(vocab) == 1024

    def liger_chunks(const: int) -> int:
        inc_factor = math.ceil(vocab / (const * hidden))
        size = min(1 << (math.ceil(tokens / inc_factor) - 1).bit_length(), tokens)
        return math.ceil(tokens / size)

    assert liger_chunks(1) >= 32  # Liger left alone: 32-64 chunks of 128-512 tokens, the per-chunk tax
    chunks = liger_chunks(liger_chunk_mem_const(tokens, vocab, hidden))
    assert chunks == tokens // 1024  # 1,024-token chunks
