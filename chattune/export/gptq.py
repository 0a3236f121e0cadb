"""GPTQ quantization of a merged model (or an adapter, folded first), calibrated on the user's own conversations.

The run reads top to bottom in `quantize`: validate -> tokenizer and data (rendered exactly as in training) -> float
model and its perplexity on held-out conversations -> GPTQ (GPTQModel) -> output fixed up to load as is -> the
quantized model reloaded with `from_pretrained` and its perplexity -> report.

Perplexity is exp(mean cross-entropy) over the trained tokens only (assistant answers and their end-of-turn token,
labels != -100), i.e. over what the fine-tuned model was taught to write.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from chattune.cli import log
from chattune.data.split import carry_held_out, conversation_key, held_out_of
from chattune.errors import ConfigError, UserError
from chattune.export.merge import (
    DTYPES,
    base_of,
    is_adapter_dir,
    load_for_inference,
    run_info,
    save_model,
)
from chattune.export.samples import Samples, Split, perplexity, split_conversations
from chattune.staged import staged_dir
from chattune.train.layout import copy_processor_files

BITS = (4, 8)
REPORT_FILE = "gptq_report.json"
# GPTQModel's worker pool nests a 2-worker model-loader pool inside the CPU pool, so the CPU pool needs at least 2
# workers; its default is half the cores, which is 1 on a 2-core machine ("Virtual pool 'model_loader:cpu' requests
# 2 workers but parent 'cpu' only has 1").
_MIN_GPTQ_CPU_WORKERS = 2


@dataclass
class GptqArgs:
    model_name_or_path: str
    data_path: str
    out_path: str
    bits: int = 4
    group_size: int = 128  # -1: one group per column
    num_samples: int = 128  # calibration conversations
    max_len: int = 2048  # tokens per sample (calibration and evaluation), as --model_max_length in training
    eval_samples: int = 32  # held-out conversations for perplexity; 0 skips the evaluation
    template: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0  # of the calibration / evaluation split
    skip_invalid_records: bool = False  # drop invalid records (counted) instead of stopping
    data_cache_dir: str | None = None
    trust_remote_code: bool = True  # run the model's own code, as finetune.py's default


def validate(args: GptqArgs) -> None:
    """Every problem with the flags and paths, raised at once, before anything heavy is loaded."""
    problems = []
    if not os.path.isdir(args.model_name_or_path):
        problems.append(f"--model_name_or_path {args.model_name_or_path}: no such directory (pass a merged/full model "
                        "directory or the output_dir of a finetune.py --use_lora run)")
    elif not (is_adapter_dir(args.model_name_or_path)
              or os.path.isfile(os.path.join(args.model_name_or_path, "config.json"))):
        problems.append(f"--model_name_or_path {args.model_name_or_path}: holds neither config.json (a model) nor "
                        "adapter_config.json (an adapter)")
    if not args.data_path:
        problems.append("--data_path is required: the conversations to calibrate and evaluate on")
    if args.bits not in BITS:
        problems.append(f"--bits {args.bits}: choose 4 or 8")
    if args.group_size != -1 and args.group_size < 1:
        problems.append(f"--group_size {args.group_size}: use a positive size (128 is usual) or -1 (per column)")
    if args.num_samples < 1:
        problems.append(f"--num_samples {args.num_samples}: at least 1 calibration conversation is needed")
    if args.eval_samples < 0:
        problems.append(f"--eval_samples {args.eval_samples}: use 0 (no evaluation) or more")
    if args.max_len < 16:
        problems.append(f"--max_len {args.max_len}: too short to hold a conversation; 2048 is usual")
    if args.dtype not in DTYPES:
        problems.append(f"--dtype {args.dtype!r}: choose one of {', '.join(DTYPES)}")
    if args.device not in ("auto", "cpu", "cuda"):
        problems.append(f"--device {args.device!r}: choose auto, cpu or cuda")
    elif args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA GPU is visible here; use --device cpu (slow but works)")
    out, model = os.path.abspath(args.out_path or ""), os.path.abspath(args.model_name_or_path)
    if not args.out_path:
        problems.append("--out_path is required: where the quantized model goes")
    elif out == model:
        problems.append("--out_path must differ from --model_name_or_path (the source is read while writing)")
    elif os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out)):
        problems.append(f"--out_path {args.out_path}: exists and is not empty; choose a new directory or remove it")
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems with the arguments:\n" + "\n".join(f"  {p}" for p in problems))


# --------------------------------------------------------------------------------------------------------------
# Data: split the conversations, render them as in training
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Data:
    eval: Samples
    calibration: Samples
    conversations: int
    split: Split


def build_data(args: GptqArgs, tokenizer: Any, setup: Any, template_kwargs: dict | None) -> Data:
    """Read and validate the conversations, split them, and tokenize each side with the training code."""
    from chattune.data.load import load_conversations

    # preference pairs calibrate with their chosen conversations
    loaded = load_conversations(args.data_path, skip_invalid=args.skip_invalid_records, pairs=None)
    if loaded.skipped_records:
        log(f"skipped {loaded.skipped_records} invalid records (--skip_invalid_records)")
    held_out = held_out_of(args.model_name_or_path) if args.eval_samples else None
    if held_out is not None:
        return _build_with_held_out(args, loaded, held_out, tokenizer, setup, template_kwargs)
    split = split_conversations(len(loaded.conversations), args.eval_samples, args.num_samples, args.seed)

    def samples(indices: list[int], what: str) -> Samples:
        return _samples(args, [loaded.conversations[i] for i in indices], tokenizer, setup, template_kwargs,
                        loaded.files, what)

    return Data(samples(split.eval, "perplexity"), samples(split.calibration, "calibration"),
                len(loaded.conversations), split)


def _samples(args: GptqArgs, conversations: list, tokenizer: Any, setup: Any, template_kwargs: dict | None,
             files: Any, what: str) -> Samples:
    return Samples.of(conversations, tokenizer, setup.stop_tokens, args.max_len, template_kwargs, what, "--max_len",
                      args.data_cache_dir, files)


def _build_with_held_out(args: GptqArgs, loaded: Any, held_out: Path, tokenizer: Any, setup: Any,
                         template_kwargs: dict | None) -> Data:
    """The model carries its run's held-out conversations (finetune.py --val_size): perplexity is taken on them (up
    to --eval_samples, seeded), and calibration uses the other conversations of --data_path, never one of those."""
    from chattune.data.load import load_conversations

    every_held_out = load_conversations(held_out, pairs=None).conversations
    excluded = {conversation_key(c) for c in every_held_out}
    evaluation = every_held_out
    if len(evaluation) > args.eval_samples:
        order = list(range(len(evaluation)))
        random.Random(args.seed).shuffle(order)
        evaluation = [evaluation[i] for i in sorted(order[:args.eval_samples])]
    candidates = [c for c in loaded.conversations if conversation_key(c) not in excluded]
    if not candidates:
        raise UserError(f"every conversation of {args.data_path} is in the run's held-out set ({held_out}): give "
                        "--data_path the training data, which calibrates without them")
    order = list(range(len(candidates)))
    random.Random(args.seed).shuffle(order)
    calibration = [candidates[i] for i in sorted(order[:args.num_samples])]
    shortfall = None
    if len(calibration) < args.num_samples:
        shortfall = (f"only {len(calibration)} conversations of the data are not held out, fewer than --num_samples "
                     f"{args.num_samples}. GPTQ calibrates better on {args.num_samples}+ conversations.")
    log(f"perplexity on the run's held-out conversations ({held_out}: {len(evaluation)}); calibrating on "
        f"{len(calibration)} others of {args.data_path} ({len(loaded.conversations) - len(candidates)} held-out "
        "ones left out)")

    return Data(_samples(args, evaluation, tokenizer, setup, template_kwargs, loaded.files, "perplexity"),
                _samples(args, calibration, tokenizer, setup, template_kwargs, loaded.files, "calibration"),
                len(loaded.conversations), Split([], [], shortfall))


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_float_model(path: str, dtype: Any, device: str, trust_remote_code: bool) -> Any:
    """The full-precision model; an adapter directory is folded into its base in memory."""
    if is_adapter_dir(path):
        model, _ = load_for_inference(path, dtype=dtype, merge=True, trust_remote_code=trust_remote_code)
        return model.to(device).eval()
    model, _ = load_for_inference(path, dtype=dtype, device_map={"": device} if device == "cuda" else None,
                                  trust_remote_code=trust_remote_code)
    return model


def check_group_size(model: Any, group_size: int) -> None:
    """GPTQ groups split each weight's input dimension; kernels need the group size to divide it."""
    if group_size == -1:
        return
    output = model.get_output_embeddings()
    widths = sorted({m.in_features for m in model.modules()
                     if isinstance(m, torch.nn.Linear) and m is not output and m.in_features % group_size})
    if widths:
        raise ConfigError(f"--group_size {group_size} must divide the input width of every linear layer, and "
                          f"{', '.join(map(str, widths))} is not a multiple of it; use a divisor of it, or -1")


def quantized_linear_count(model: Any) -> int:
    """Linear layers replaced by GPTQ modules (they hold packed `qweight` buffers instead of a float weight)."""
    return sum(1 for m in model.modules() if hasattr(m, "qweight"))


def check_processor_support(model_dir: str) -> None:
    """GPTQModel loads a vision-language checkpoint (Qwen3.5's) with its processor, whose video part needs a working
    torchvision; without one it fails after the float model is loaded and evaluated. Said up front instead."""
    from transformers import AutoConfig

    if getattr(AutoConfig.from_pretrained(model_dir), "vision_config", None) is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # ImportError, or RuntimeError when its build does not match torch's
        raise ConfigError(
            f"{model_dir} is a vision-language checkpoint: GPTQModel loads its image/video processor, which needs "
            f"torchvision built for your torch {torch.__version__} ({type(e).__name__}: {str(e)[:120]}); install the "
            "matching one (pip install torchvision --index-url https://download.pytorch.org/whl/<your CUDA, e.g. "
            "cu128>)") from None


def _gptq_engine() -> Any:
    workers = os.environ.get("GPTQMODEL_CPU_WORKERS")
    if workers is None and ((os.cpu_count() or 1) + 1) // 2 < _MIN_GPTQ_CPU_WORKERS:
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(_MIN_GPTQ_CPU_WORKERS)
    try:
        import gptqmodel
    except ImportError as e:
        raise ConfigError(f"GPTQ needs the gptqmodel package ({e}); install the pins in requirements.txt "
                          "(pip install -r requirements.txt)") from None
    return gptqmodel


def run_gptq(model_dir: str, calibration: Samples, out: str, *, bits: int, group_size: int, device: str,
             dtype: torch.dtype, trust_remote_code: bool = True) -> str:
    """Quantize the model in `model_dir` with GPTQModel on the calibration samples and save it to `out`.

    Returns the engine's name and version. desc_act=False and sym=True are the settings every GPTQ kernel (and
    transformers' loader) supports; pack_impl="original" is GPTQModel's reference packer (the tested round trip).
    """
    gptqmodel = _gptq_engine()
    config = gptqmodel.QuantizeConfig(bits=bits, group_size=group_size, desc_act=False, sym=True,
                                      offload_to_disk=False, pack_impl="original")
    model_dir, out = os.path.abspath(model_dir), os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    # GPTQModel writes its logs to ./logs: keep them with the output instead of the user's working directory.
    with contextlib.chdir(out):
        model = gptqmodel.GPTQModel.load(model_dir, config, device=device, dtype=dtype,
                                         trust_remote_code=trust_remote_code)
        examples = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calibration.input_ids]
        model.quantize(examples)
        model.save(out)
        del model
    return f"gptqmodel {gptqmodel.__version__}"


def generation_config_of(source: str, model: Any) -> Any:
    """The source directory's generation config (an adapter dir carries the run's stop tokens), else the model's."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source)
    except OSError:
        return model.generation_config


def finish_output(out: str, tokenizer: Any, generation_config: Any, source: str, bits: int, group_size: int) -> None:
    """Make `out` the user's model: the training tokenizer and template, the source's generation config, chattune.json.

    GPTQModel saves the tokenizer through its own wrapper (which rewrites tokenizer_config.json) and a generation
    config with sampling switched on; both are replaced by the source's.
    """
    tokenizer.save_pretrained(out)
    generation_config.save_pretrained(out)
    info = run_info(source)
    if info:
        info["quantized_from"] = os.path.abspath(source)
        info["gptq"] = {"bits": bits, "group_size": group_size}
        with open(os.path.join(out, "chattune.json"), "w") as f:
            json.dump(info, f, indent=1)
    carry_held_out(source, out)


def weights_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path)
               if name.endswith((".safetensors", ".bin")))


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Report:
    model: str
    source: str  # "adapter" (folded into its base first) or "model"
    out_path: str
    engine: str
    bits: int
    group_size: int
    dtype: str
    device: str
    conversations: int  # in the data
    eval_conversations: int
    calibration_conversations: int
    eval_samples: int
    calibration_samples: int
    calibration_tokens: int
    eval_trained_tokens: int  # tokens the perplexity is over
    shortfall: str | None
    perplexity_before: float | None
    perplexity_after: float | None
    relative_change: float | None  # (after - before) / before
    weights_bytes_before: int
    weights_bytes_after: int
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        def size(n: int) -> str:
            return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"

        def row(name: str, perplexity: str, weights: str = "") -> str:
            return f"  {name:<20} {perplexity:>12} {weights:>10}"

        def ppl(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}"

        evaluated = (f"perplexity over {self.eval_trained_tokens:,} trained tokens of {self.eval_conversations} "
                     "held-out conversations:") if self.eval_conversations else "not evaluated (--eval_samples 0):"
        calibrated = (f"GPTQ {self.bits}-bit, group size {self.group_size}, {self.engine}; calibrated on "
                      f"{self.calibration_conversations} conversations ({self.calibration_samples} samples, "
                      f"{self.calibration_tokens:,} tokens)")
        lines = [
            calibrated,
            evaluated,
            row("model", "perplexity", "weights"),
            row(f"float ({self.dtype})", ppl(self.perplexity_before), size(self.weights_bytes_before)),
            row(f"GPTQ {self.bits}-bit", ppl(self.perplexity_after), size(self.weights_bytes_after)),
            row("change", "-" if self.relative_change is None else f"{self.relative_change:+.2%}"),
            "time: " + ", ".join(f"{step} {s:.1f} s" for step, s in self.seconds.items()),
        ]
        if self.shortfall:
            lines.append(f"WARNING: {self.shortfall}")
        return "\n".join(lines)


def _tokenizer_and_template(args: GptqArgs) -> tuple[Any, Any, dict]:
    """The tokenizer with the chat template installed exactly as finetune.py does, and the run's template variables."""
    from chattune.data.tokenizer import prepare_tokenizer

    tokenizer, setup = prepare_tokenizer(args.model_name_or_path, args.template,
                                         trust_remote_code=args.trust_remote_code)
    if setup.added_tokens:
        raise ConfigError(
            f"--template {args.template} adds tokens the model has never seen ({', '.join(setup.added_tokens)}): "
            "quantize the output of a finetune.py run trained with that template (its tokenizer carries it), "
            "with --template auto")
    return tokenizer, setup, run_info(args.model_name_or_path).get("template_kwargs") or {}


@contextlib.contextmanager
def timed(seconds: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[step] = round(time.perf_counter() - start, 2)


def load_quantized(path: str, dtype: torch.dtype, device: str, trust_remote_code: bool) -> Any:
    """The output as a user loads it (transformers + GPTQModel kernels), refusing one that came back unquantized."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 device_map={"": device})
    if not quantized_linear_count(model):
        raise RuntimeError(f"{path} reloaded without GPTQ layers: the quantized checkpoint is not usable")
    return model.eval()


def quantize(args: GptqArgs) -> Report:
    """Quantize args.model_name_or_path to args.out_path, measure perplexity before and after, write the report."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    validate(args)
    tokenizer, setup, template_kwargs = _tokenizer_and_template(args)
    data = build_data(args, tokenizer, setup, template_kwargs)
    if data.split.shortfall:
        log(f"WARNING: {data.split.shortfall}")
    device, adapter = resolve_device(args.device), is_adapter_dir(args.model_name_or_path)
    base = base_of(args.model_name_or_path, None) if adapter else None
    check_processor_support(base or args.model_name_or_path)
    with timed(seconds, "load"):
        model = load_float_model(args.model_name_or_path, DTYPES[args.dtype], device, args.trust_remote_code)
        check_group_size(model, args.group_size)
    dtype, generation_config = model.dtype, generation_config_of(args.model_name_or_path, model)
    with timed(seconds, "evaluate float"):
        before = perplexity(model, data.eval, "perplexity before") if data.eval.input_ids else None

    with staged_dir(args.out_path) as out:  # a kill leaves no folder that looks like a model
        with tempfile.TemporaryDirectory(prefix=".chattune-merged-", dir=os.path.dirname(out)) as tmp:
            source_dir = args.model_name_or_path
            if adapter:  # GPTQModel reads a model directory: the folded model is saved next to the output for it
                with timed(seconds, "save merged"):
                    save_model(model, tokenizer, tmp, source=args.model_name_or_path, base=base)
                source_dir = tmp
            weights_before = weights_bytes(source_dir)
            del model  # GPTQModel loads its own copy
            _release_memory()
            log(f"quantizing to {args.bits} bits on {device} with {len(data.calibration.input_ids)} calibration "
                "samples")
            with timed(seconds, "quantize"):
                engine = run_gptq(source_dir, data.calibration, out, bits=args.bits, group_size=args.group_size,
                                  device=device, dtype=dtype, trust_remote_code=args.trust_remote_code)
            copy_processor_files(out, source_dir)
        finish_output(out, tokenizer, generation_config, args.model_name_or_path, args.bits, args.group_size)
        with timed(seconds, "evaluate GPTQ"):
            quantized = load_quantized(out, dtype, device, args.trust_remote_code)
            after = perplexity(quantized, data.eval, "perplexity after") if data.eval.input_ids else None
        seconds["total"] = round(time.perf_counter() - started, 2)
        report = Report(
            model=os.path.abspath(args.model_name_or_path), source="adapter" if adapter else "model",
            out_path=os.path.abspath(args.out_path), engine=engine, bits=args.bits, group_size=args.group_size,
            dtype=str(dtype).removeprefix("torch."), device=device, conversations=data.conversations,
            eval_conversations=data.eval.conversations, calibration_conversations=data.calibration.conversations,
            eval_samples=len(data.eval.input_ids), calibration_samples=len(data.calibration.input_ids),
            calibration_tokens=data.calibration.tokens, eval_trained_tokens=before.tokens if before else 0,
            shortfall=data.split.shortfall,
            perplexity_before=before.value if before else None, perplexity_after=after.value if after else None,
            relative_change=(after.value - before.value) / before.value if before and after else None,
            weights_bytes_before=weights_before, weights_bytes_after=weights_bytes(out), seconds=seconds,
        )
        with open(os.path.join(out, REPORT_FILE), "w") as f:
            json.dump(report.to_dict(), f, indent=1)
    return report
