"""The deploy check: does the artifact that will be served behave like the model that was trained?

On the run's held-out conversations (val.jsonl from finetune.py --val_size, or --data_path), three checks:

1. prompt   the artifact's own tokenizer and chat template, rendered as an engine renders them (no template
            variables passed), give for every trained turn exactly the prompt ids training used (the training
            tokenizer with the run's --template_kwargs: the token-exact contract of finetune.py).
2. stop     the artifact's generation_config lists the trained end-of-turn tokens, and greedy generation from the
            artifact stops on one of them within the reference answer's length + a margin, on a sample of turns.
3. quality  the artifact's loss on the held-out trained tokens against the trained model's (the adapter on its
            base, or the trained full model): within --max_merge_drift (1e-3 in float32, 1e-2 in 16-bit) for a
            plain model, within --max_loss_increase (5%) for a GPTQ model.

The artifact runs in transformers (--engine transformers, as chat.py serves it; both models in float32) or in
vLLM's offline engine (--engine vllm: vLLM's chat rendering and tokenization, its stops, kernels and quantized
loading, in the 16-bit dtype `vllm serve` uses; GPU); the trained model's loss is always taken with transformers
(see _resolve_dtypes for the dtypes).

Exit code 0 when every check passes, 1 when one fails (which, and by how much), 2 on bad input.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chattune.cli import log
from chattune.data.tokenizer import load_tokenizer
from chattune.errors import UserError
from chattune.export.engines import (
    ENGINES,
    Request,
    has_quantization_config,
    load_artifact,
    loss_on,
    release_memory,
)

REPORT_FILE = "deploy_check.json"


@dataclass
class DeployArgs:
    run_dir: str
    model_path: str | None = None  # the artifact; default: the run's own output (adapter or full model)
    data_path: str | None = None  # default: run_dir/val.jsonl
    max_loss_increase: float = 0.05  # GPTQ: allowed relative increase of the held-out loss
    max_merge_drift: float | None = None  # unquantized: allowed relative loss difference; 1e-3 fp32, 1e-2 16-bit
    stop_samples: int = 8  # turns generated for the stop check
    stop_margin: int = 16  # tokens allowed beyond the reference answer
    max_length: int = 0  # tokens per held-out sample; default: the run's --model_max_length (chattune.json)
    seed: int = 0
    device: str = "auto"
    dtype: str | None = None  # the trained model's (and transformers' artifact's) dtype; default float32, see _dtypes
    report_path: str | None = None  # default: ARTIFACT/deploy_check.json
    engine: str = "transformers"  # or vllm: the checks run through vLLM's own engine (GPU)
    engine_dtype: str | None = None  # resolved: the dtype the artifact runs in (vllm: as `vllm serve` runs it)
    gpu_memory_utilization: float = 0.5  # vllm: the share of the GPU its engine may take
    trust_remote_code: bool = True


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name:<8} {self.detail}"


@dataclass
class Turn:
    history: list[dict]
    tools: list[dict]
    answer_ids: list[int]  # the trained answer (through its end-of-turn token), as training tokenized it


def _held_out(args: DeployArgs) -> tuple[str, list[Any]]:
    from chattune.data.load import load_conversations
    from chattune.data.problems import DataError
    from chattune.data.split import held_out_of

    path = args.data_path or held_out_of(args.run_dir)
    if path is None:
        raise UserError(f"{args.run_dir} has no val.jsonl (train with --val_size to hold out conversations), and no "
                        "--data_path was given: pass the conversations to check on")
    try:
        conversations = load_conversations(str(path), pairs=None).conversations  # a pair: its chosen answer
    except DataError as e:
        raise UserError(str(e)) from None
    if not conversations:
        raise UserError(f"{path}: no conversations to check on")
    return str(path), conversations


def _run_setup(args: DeployArgs) -> tuple[Any, list[str], dict, int]:
    """The training tokenizer (as saved by the run), its end-of-turn tokens, template variables and length limit."""
    from chattune.data.tokenizer import load_tokenizer
    from chattune.export.merge import run_info

    info = run_info(args.run_dir)
    if not info:
        raise UserError(f"{args.run_dir}: no chattune.json; give --run_dir the output directory of a finetune.py run")
    return (load_tokenizer(args.run_dir, trust_remote_code=args.trust_remote_code),
            list(info.get("stop_tokens") or []), info.get("template_kwargs") or {},
            args.max_length or int(info.get("model_max_length") or 2048))


def _trained_loss(args: DeployArgs, samples: Any) -> float:
    """The held-out loss of the trained model (the adapter on its base, or the full model) with transformers."""
    model, _ = load_artifact(args.run_dir, args)
    return loss_on(model, samples, "loss of the trained model")[0]


def _requests(conversations: list[Any]) -> list[tuple[Any, int, Request]]:
    """Every trained turn of the held-out conversations, as (conversation, message index, request)."""
    from chattune.data.template import trained_turn_indices

    return [(conv, i, Request(list(conv.messages[:i]), list(conv.tools)))
            for conv in conversations for i in trained_turn_indices(conv.messages, conv.masked)]


def check_prompts(conversations: list[Any], run_tokenizer: Any, template_kwargs: dict, engine: Any) -> Check:
    """Check 1: for every trained turn, the prompt ids the engine feeds the artifact (its template rendered with no
    variables) == training's. Prompts longer than the engine takes (vLLM: its max_model_len) are counted, not sent."""
    trained_prompts, turns = [], []
    too_long = 0
    for conv, i, request in _requests(conversations):
        trained = list(run_tokenizer.apply_chat_template(request.history, tools=request.tools or None,
                                                         add_generation_prompt=True, tokenize=True, return_dict=True,
                                                         **template_kwargs)["input_ids"])
        if engine.max_prompt_tokens is not None and len(trained) > engine.max_prompt_tokens:
            too_long += 1
            continue
        trained_prompts.append(trained)
        turns.append((conv, i, request))
    served = engine.prompts([request for _, _, request in turns])
    mismatched = 0
    first = ""
    for (conv, i, _), ids, trained in zip(turns, served, trained_prompts, strict=True):
        if ids != trained:
            mismatched += 1
            if not first:
                first = (f"; first: {conv.source}, messages[{i}]: training ends "
                         f"{run_tokenizer.decode(trained[-12:])!r}, {engine.name} "
                         f"{run_tokenizer.decode(ids[-12:])!r}")
    passed = mismatched == 0 and bool(turns)
    if not turns:
        detail = "no prompt could be checked"
    elif passed:
        detail = f"{len(turns)} prompts identical to training's (the saved chat template renders the trained prompt)"
    else:
        detail = f"{mismatched} of {len(turns)} prompts differ from training's{first}"
    if too_long:
        detail += (f"; {too_long} longer than {engine.name} takes ({engine.max_prompt_tokens} tokens: --max_length) "
                   "not checked")
    return Check("prompt", passed, detail,
                 {"turns": len(turns), "mismatched": mismatched, "too_long": too_long, "engine": engine.name})


def check_layout(artifact_path: str, run_dir: str) -> Check:
    """Check: the artifact is the whole model it came from. A merged, fully trained or quantized model has the
    base's architecture and every base tensor (chattune.train.layout: a Qwen3.5 vision tower, its MTP head); an
    adapter's every module matches a module of the class the base loads as (vLLM serves that class: an adapter whose
    names match nothing is served silently as the base model)."""
    from chattune.export.merge import base_of, is_adapter_dir, run_info
    from chattune.train.layout import adapter_problems, layout_problems

    if is_adapter_dir(artifact_path):
        base = base_of(artifact_path, None)
        problems, what = adapter_problems(artifact_path, base), f"every adapter module matches {base}'s class"
    else:
        base = run_info(run_dir).get("base_model") or ""
        if not base or os.path.abspath(base) == os.path.abspath(artifact_path):
            return Check("layout", True, "the artifact is the base model itself (nothing to compare)")
        problems, what = layout_problems(artifact_path, base), f"the architecture and every tensor of {base}"
    return Check("layout", not problems, "; ".join(problems) if problems else what, {"problems": problems})


def check_parse(conversations: list[Any], artifact_tokenizer: Any) -> Check:
    """Check: the tool calls and reasoning of the held-out answers, written as the artifact's template writes them,
    are read back as the calls and reasoning the data holds (chattune.export.toolparse: the formats of vLLM's
    qwen3_coder / hermes tool parsers and qwen3 reasoning parser)."""
    from chattune.export.toolparse import parse_tool_calls, split_reasoning

    turns = failed = 0
    first = ""
    for conv, i, request in _requests(conversations):
        message = conv.messages[i]
        reasoning = (message.get("reasoning_content") or "").strip()
        calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                 for c in message.get("tool_calls", [])]
        if not calls and not reasoning:
            continue
        render = artifact_tokenizer.apply_chat_template
        prompt = render(request.history, tools=request.tools or None, add_generation_prompt=True, tokenize=False)
        upto = render([*request.history, message], tools=request.tools or None, tokenize=False)
        answer = upto[len(prompt):] if upto.startswith(prompt) else upto
        think, rest = split_reasoning(prompt[prompt.rfind("<think>"):] + answer if "<think>" in prompt[-20:]
                                      else answer)
        got = parse_tool_calls(rest, list(request.tools or []))
        turns += 1
        wrong = []
        if reasoning and reasoning in answer and (think or "") != reasoning:  # reasoning the template renders
            wrong.append(f"reasoning read back as {think!r}")
        if got != calls:
            wrong.append(f"tool calls read back as {got}, the data has {calls}")
        if wrong:
            failed += 1
            first = first or f"; first: {conv.source}, messages[{i}]: {'; '.join(wrong)}"
    if not turns:
        return Check("parse", True, "no held-out answer has tool calls or reasoning (nothing to read back)")
    detail = (f"{turns - failed} of {turns} answers with tool calls or reasoning read back as the data has them"
              + first)
    return Check("parse", failed == 0, detail, {"turns": turns, "failed": failed})


def _answers(conversations: list[Any], tokenizer: Any, stops: list[str], template_kwargs: dict,
             max_length: int) -> list[Turn]:
    """Every trained turn with its answer ids, as the training pipeline tokenizes them (one sample per turn)."""
    from chattune.data.encode import IGNORE_INDEX, encode_samples
    from chattune.data.template import (
        make_renderer,
        render_conversation,
        trained_turn_indices,
    )

    render = make_renderer(tokenizer, template_kwargs)
    turns = []
    for conv in conversations:
        for i in trained_turn_indices(conv.messages, conv.masked):
            masked = [k for k in range(len(conv.messages)) if k != i and conv.messages[k]["role"] == "assistant"]
            samples = render_conversation(render, conv.messages[: i + 1], stops, tools=conv.tools, masked=masked)
            for ids, labels in (pair for encoded in encode_samples(tokenizer, samples) for pair in encoded):
                answer = [int(t) for t, lab in zip(ids.tolist(), labels.tolist(), strict=True)
                          if lab != IGNORE_INDEX]
                if answer and len(ids) <= max_length:
                    turns.append(Turn(list(conv.messages[:i]), list(conv.tools), answer))
    return turns


def check_stop(turns: list[Turn], engine: Any, tokenizer: Any, stop_tokens: list[str], samples: int, margin: int,
               seed: int) -> Check:
    """Check 2: the artifact's generation config stops on the trained end-of-turn tokens, and greedy generation does."""
    trained = [t for t in tokenizer.convert_tokens_to_ids(stop_tokens) if t is not None]
    configured = engine.stop_ids()
    missing = [tokenizer.convert_ids_to_tokens(t) for t in trained if t not in configured]
    listed = ", ".join(tokenizer.convert_ids_to_tokens(configured)) or "none"
    values: dict[str, Any] = {"configured": configured, "trained": trained, "engine": engine.name}
    if missing or not trained:
        return Check("stop", False, f"{engine.stops_from} stops on {listed}, not on the trained "
                     f"end-of-turn token(s) {', '.join(missing)}: an engine using it will not stop", values)
    if samples and not turns:
        return Check("stop", False, f"stops on {listed}; no held-out turn fits the length limit, so generation could "
                     "not be checked (raise --max_length)", values)
    chosen = random.Random(seed).sample(turns, min(samples, len(turns)))
    generated = engine.generate([Request(t.history, t.tools) for t in chosen],
                                [len(t.answer_ids) + margin for t in chosen])
    stopped = sum(1 for new in generated if new and new[-1] in trained)
    passed = stopped == len(chosen)
    detail = (f"stops on {listed}; greedy generation stopped on a trained end-of-turn token in {stopped} of "
              f"{len(chosen)} held-out turns (within the reference length + {margin} tokens)" if chosen else
              f"stops on {listed}; generation not checked (--stop_samples 0)")
    values.update(stopped=stopped, sampled=len(chosen), generated_lengths=[len(new) for new in generated])
    return Check("stop", passed, detail, values)


def _merge_drift(args: DeployArgs) -> float:
    if args.max_merge_drift is not None:
        return args.max_merge_drift
    both_float32 = args.dtype in (None, "float32") and args.engine_dtype in (None, "float32")
    return 1e-3 if both_float32 else 1e-2  # 16-bit: 8 or 11 bits of mantissa


def _resolve_dtypes(args: DeployArgs, artifact_path: str) -> None:
    """The trained model's dtype (args.dtype) and the artifact's (args.engine_dtype). transformers: both float32,
    which keeps rounding out of the comparison. vLLM runs the artifact as `vllm serve` does, in the checkpoint's
    16-bit dtype ("auto"; bfloat16 for a LoRA, whose kernels are 16-bit only; GPTQ kernels take 16-bit activations
    only too); the trained model is then compared in bfloat16, or in float32 against a GPTQ model (the
    --max_loss_increase bound is far above the difference). --dtype sets both."""
    from chattune.export.merge import is_adapter_dir

    if args.engine != "vllm":
        args.dtype = args.engine_dtype = args.dtype or "float32"
        return
    adapter, quantized = is_adapter_dir(artifact_path), has_quantization_config(artifact_path)
    if args.dtype == "float32" and (adapter or quantized):
        what = "a LoRA adapter" if adapter else "a GPTQ model"
        raise UserError(f"--dtype float32 with --engine vllm on {what}: vLLM's {'LoRA' if adapter else 'GPTQ'} "
                        "kernels take float16 or bfloat16 only; pass --dtype bfloat16, or leave --dtype out")
    if args.dtype:
        args.engine_dtype = args.dtype
    else:
        args.engine_dtype = "bfloat16" if adapter else "auto"
        args.dtype = "float32" if quantized else "bfloat16"
    log(f"dtypes: the artifact in vLLM {args.engine_dtype}, the trained model in transformers {args.dtype}")


def check_quality(reference_loss: float, artifact_loss: float, tokens: int, quantized: bool, args: DeployArgs
                  ) -> Check:
    """Check 3: the held-out loss of the artifact against the trained model's."""
    change = (artifact_loss - reference_loss) / reference_loss
    bound = args.max_loss_increase if quantized else _merge_drift(args)
    passed = change <= bound if quantized else abs(change) <= bound
    kind = "GPTQ model" if quantized else "unquantized model"
    if args.engine_dtype and args.engine_dtype != args.dtype:
        kind += f", {args.engine_dtype} vs trained {args.dtype}"
    detail = (f"held-out loss {artifact_loss:.4f} vs trained {reference_loss:.4f} over {tokens:,} tokens: "
              f"{change:+.3%} ({kind}, allowed {'+' if quantized else '±'}{bound:.3%})")
    return Check("quality", passed, detail, {"trained_loss": reference_loss, "artifact_loss": artifact_loss,
                                             "relative_change": change, "allowed": bound, "tokens": tokens})


def run_checks(args: DeployArgs) -> tuple[list[Check], dict[str, Any]]:
    from chattune.data.problems import DataError
    from chattune.export.samples import Samples

    artifact_path = args.model_path or args.run_dir
    for flag, path in (("--run_dir", args.run_dir), ("--model_path", artifact_path)):
        if not os.path.isdir(path):
            raise UserError(f"{flag} {path}: not a directory")
    engine_class = ENGINES.get(args.engine)
    if engine_class is None:
        raise UserError(f"--engine {args.engine}: choose one of {', '.join(ENGINES)}")
    engine_class.preflight(artifact_path)
    _resolve_dtypes(args, artifact_path)
    data_path, conversations = _held_out(args)
    run_tokenizer, stop_tokens, template_kwargs, max_length = _run_setup(args)
    log(f"checking {artifact_path} ({args.engine}) against the run {args.run_dir} on {len(conversations)} "
        f"conversations of {data_path}")
    try:
        samples = Samples.of(conversations, run_tokenizer, stop_tokens, max_length, template_kwargs, "held-out",
                             "--max_length")
        unmeasurable = ""
    except DataError as e:  # nothing trained within the limit: the quality cannot be measured, which fails it
        samples, unmeasurable = None, str(e)
    reference_loss = None
    same_model = os.path.abspath(artifact_path) == os.path.abspath(args.run_dir) and args.engine == "transformers"
    if samples is not None and not same_model:  # the trained model first: its memory is free before the artifact's
        reference_loss = _trained_loss(args, samples)
        release_memory()
    engine = engine_class(artifact_path, args, max_length)
    try:
        checks = [check_layout(artifact_path, args.run_dir),
                  check_prompts(conversations, run_tokenizer, template_kwargs, engine)]
        turns = _answers(conversations, run_tokenizer, stop_tokens, template_kwargs, max_length)
        checks.append(check_stop(turns, engine, run_tokenizer, stop_tokens, args.stop_samples, args.stop_margin,
                                 args.seed))
        if samples is None:
            checks.append(Check("quality", False, f"not measured: {unmeasurable}"))
        else:
            artifact_loss, tokens = engine.loss(samples, "loss of the artifact")
            checks.append(check_quality(artifact_loss if reference_loss is None else reference_loss, artifact_loss,
                                        tokens, engine.quantized, args))
        # the artifact's own tokenizer: transformers' engine has it loaded already (loading Qwen's takes seconds)
        artifact_tokenizer = engine.tokenizer if engine.name == "transformers" else load_tokenizer(artifact_path)
        checks.append(check_parse(conversations, artifact_tokenizer))
    finally:
        engine.close()
    return checks, _report(args, artifact_path, data_path, conversations, checks)


def _report(args: DeployArgs, artifact_path: str, data_path: str, conversations: list, checks: list[Check]) -> dict:
    return {"run_dir": os.path.abspath(args.run_dir), "artifact": os.path.abspath(artifact_path),
            "data": data_path, "conversations": len(conversations), "passed": all(c.passed for c in checks),
            "checks": [asdict(c) for c in checks], "args": asdict(args)}


def main(args: DeployArgs) -> int:
    checks, report = run_checks(args)
    for check in checks:
        print(check.line(), flush=True)
    path = Path(args.report_path or os.path.join(args.model_path or args.run_dir, REPORT_FILE))
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    failed = [c.name for c in checks if not c.passed]
    print(f"deploy check: {'passed' if not failed else 'FAILED (' + ', '.join(failed) + ')'}; report {path}",
          flush=True)
    return 1 if failed else 0
