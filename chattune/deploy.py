"""The deploy check: does the artifact that will be served behave like the model that was trained?

On the run's held-out conversations (val.jsonl from finetune.py --val_size, or --data_path), three checks:

1. prompt   the artifact's own tokenizer and chat template, rendered as an engine renders them (no template
            variables passed), give for every trained turn exactly the prompt ids training used (the training
            tokenizer with the run's --template_kwargs: the token-exact contract of finetune.py).
2. stop     the artifact's generation_config lists the trained end-of-turn tokens, and greedy generation from the
            artifact stops on one of them within the reference answer's length + a margin, on a sample of turns.
3. quality  the artifact's loss on the held-out trained tokens against the trained model's (the adapter on its
            base, or the trained full model): within --max_merge_drift (1e-3, bf16 noise) for a plain model, within
            --max_loss_increase (5%) for a GPTQ model.

Exit code 0 when every check passes, 1 when one fails (which, and by how much), 2 on bad input.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from chattune.cli import log
from chattune.errors import UserError

REPORT_FILE = "deploy_check.json"


@dataclass
class DeployArgs:
    run_dir: str
    model_path: str | None = None  # the artifact; default: the run's own output (adapter or full model)
    data_path: str | None = None  # default: run_dir/val.jsonl
    max_loss_increase: float = 0.05  # GPTQ: allowed relative increase of the held-out loss
    max_merge_drift: float = 1e-3  # unquantized artifacts: allowed relative difference of the held-out loss
    stop_samples: int = 8  # turns generated for the stop check
    stop_margin: int = 16  # tokens allowed beyond the reference answer
    max_length: int = 0  # tokens per held-out sample; default: the run's --model_max_length (chattune.json)
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    report_path: str | None = None  # default: ARTIFACT/deploy_check.json
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
    from chattune.data import DataError, load_conversations
    from chattune.split import held_out_of

    path = args.data_path or held_out_of(args.run_dir)
    if path is None:
        raise UserError(f"{args.run_dir} has no val.jsonl (train with --val_size to hold out conversations), and no "
                        "--data_path was given: pass the conversations to check on")
    try:
        conversations = load_conversations(str(path)).conversations
    except DataError as e:
        raise UserError(str(e)) from None
    if not conversations:
        raise UserError(f"{path}: no conversations to check on")
    return str(path), conversations


def _run_setup(args: DeployArgs) -> tuple[Any, list[str], dict, int]:
    """The training tokenizer (as saved by the run), its end-of-turn tokens, template variables and length limit."""
    from chattune.merge import run_info
    from chattune.tokenizer import load_tokenizer

    info = run_info(args.run_dir)
    if not info:
        raise UserError(f"{args.run_dir}: no chattune.json; give --run_dir the output directory of a finetune.py run")
    return (load_tokenizer(args.run_dir, trust_remote_code=args.trust_remote_code),
            list(info.get("stop_tokens") or []), info.get("template_kwargs") or {},
            args.max_length or int(info.get("model_max_length") or 2048))


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _load(path: str, args: DeployArgs) -> tuple[Any, Any]:
    from chattune.merge import DTYPES, load_for_inference

    device = _device(args.device)
    try:
        model, tokenizer = load_for_inference(path, dtype=DTYPES[args.dtype], device_map={"": device},
                                              trust_remote_code=args.trust_remote_code)
    except OSError as e:
        raise UserError(f"{path}: cannot be loaded as a model ({e})") from None
    return model.eval(), tokenizer


def _is_quantized(model: Any) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "quantization_config", None))


def check_prompts(conversations: list[Any], run_tokenizer: Any, template_kwargs: dict, artifact_tokenizer: Any
                  ) -> Check:
    """Check 1: for every trained turn, the artifact's prompt (its template, no variables) == training's."""
    from chattune.template import trained_turn_indices

    turns = mismatched = 0
    first = ""
    for conv in conversations:
        tools = list(conv.tools) or None
        for i in trained_turn_indices(conv.messages, conv.masked):
            history = list(conv.messages[:i])
            trained = run_tokenizer.apply_chat_template(history, tools=tools, add_generation_prompt=True,
                                                        tokenize=True, return_dict=True, **template_kwargs)
            served = artifact_tokenizer.apply_chat_template(history, tools=tools, add_generation_prompt=True,
                                                            tokenize=True, return_dict=True)
            turns += 1
            if list(served["input_ids"]) != list(trained["input_ids"]):
                mismatched += 1
                if not first:
                    first = (f"; first: {conv.source}, messages[{i}]: training ends "
                             f"{run_tokenizer.decode(trained['input_ids'][-12:])!r}, the artifact "
                             f"{artifact_tokenizer.decode(served['input_ids'][-12:])!r}")
    passed = mismatched == 0
    detail = (f"{turns} prompts identical to training's (the saved chat template renders the trained prompt)"
              if passed else f"{mismatched} of {turns} prompts differ from training's{first}")
    return Check("prompt", passed, detail, {"turns": turns, "mismatched": mismatched})


def _answers(conversations: list[Any], tokenizer: Any, stops: list[str], template_kwargs: dict,
             max_length: int) -> list[Turn]:
    """Every trained turn with its answer ids, as the training pipeline tokenizes them (one sample per turn)."""
    from chattune.template import encode_samples, make_renderer, render_conversation, trained_turn_indices

    render = make_renderer(tokenizer, template_kwargs)
    turns = []
    for conv in conversations:
        for i in trained_turn_indices(conv.messages, conv.masked):
            masked = [k for k in range(len(conv.messages)) if k != i and conv.messages[k]["role"] == "assistant"]
            samples = render_conversation(render, conv.messages[: i + 1], stops, tools=conv.tools, masked=masked)
            for ids, labels in (pair for encoded in encode_samples(tokenizer, samples) for pair in encoded):
                answer = [int(t) for t, lab in zip(ids.tolist(), labels.tolist(), strict=True) if lab != -100]
                if answer and len(ids) <= max_length:
                    turns.append(Turn(list(conv.messages[:i]), list(conv.tools), answer))
    return turns


def _stop_ids(generation_config: Any) -> list[int]:
    ids = generation_config.eos_token_id
    return [ids] if isinstance(ids, int) else list(ids or [])


@torch.no_grad()
def check_stop(turns: list[Turn], model: Any, tokenizer: Any, stop_tokens: list[str], samples: int, margin: int,
               seed: int) -> Check:
    """Check 2: the generation config stops on the trained end-of-turn tokens, and greedy generation does."""
    trained = [t for t in tokenizer.convert_tokens_to_ids(stop_tokens) if t is not None]
    configured = _stop_ids(model.generation_config)
    missing = [tokenizer.convert_ids_to_tokens(t) for t in trained if t not in configured]
    listed = ", ".join(tokenizer.convert_ids_to_tokens(configured)) or "none"
    if missing or not trained:
        return Check("stop", False, f"generation_config.json stops on {listed}, not on the trained "
                     f"end-of-turn token(s) {', '.join(missing)}: an engine using it will not stop",
                     {"configured": configured, "trained": trained})
    if samples and not turns:
        return Check("stop", False, f"stops on {listed}; no held-out turn fits the length limit, so generation could "
                     "not be checked (raise --max_length)", {"configured": configured, "trained": trained})
    chosen = random.Random(seed).sample(turns, min(samples, len(turns)))
    stopped, lengths = 0, []
    device = next(model.parameters()).device
    for turn in chosen:
        prompt = tokenizer.apply_chat_template(turn.history, tools=turn.tools or None, add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt")
        greedy = copy.deepcopy(model.generation_config)  # the artifact's stops; greedy, bounded
        greedy.update(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                      max_new_tokens=len(turn.answer_ids) + margin, eos_token_id=configured,
                      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else trained[0])
        out = model.generate(input_ids=prompt["input_ids"].to(device),
                             attention_mask=prompt["attention_mask"].to(device), generation_config=greedy)
        new = out[0, prompt["input_ids"].shape[1]:].tolist()
        lengths.append(len(new))
        if new and new[-1] in trained:
            stopped += 1
    passed = stopped == len(chosen)
    detail = (f"stops on {listed}; greedy generation stopped on a trained end-of-turn token in {stopped} of "
              f"{len(chosen)} held-out turns (within the reference length + {margin} tokens)" if chosen else
              f"stops on {listed}; generation not checked (--stop_samples 0)")
    return Check("stop", passed, detail, {"configured": configured, "trained": trained, "stopped": stopped,
                                          "sampled": len(chosen), "generated_lengths": lengths})


def _loss(model: Any, samples: Any, desc: str) -> tuple[float, int]:
    from chattune.gptq import perplexity

    result = perplexity(model, samples, desc)
    return result.nll / max(result.tokens, 1), result.tokens


def check_quality(reference_loss: float, artifact_loss: float, tokens: int, quantized: bool, args: DeployArgs
                  ) -> Check:
    """Check 3: the held-out loss of the artifact against the trained model's."""
    change = (artifact_loss - reference_loss) / reference_loss
    bound = args.max_loss_increase if quantized else args.max_merge_drift
    passed = change <= bound if quantized else abs(change) <= bound
    kind = "GPTQ model" if quantized else "unquantized model"
    detail = (f"held-out loss {artifact_loss:.4f} vs trained {reference_loss:.4f} over {tokens:,} tokens: "
              f"{change:+.3%} ({kind}, allowed {'+' if quantized else '±'}{bound:.3%})")
    return Check("quality", passed, detail, {"trained_loss": reference_loss, "artifact_loss": artifact_loss,
                                             "relative_change": change, "allowed": bound, "tokens": tokens})


def run_checks(args: DeployArgs) -> tuple[list[Check], dict[str, Any]]:
    from chattune.data import DataError
    from chattune.gptq import Samples

    artifact_path = args.model_path or args.run_dir
    for flag, path in (("--run_dir", args.run_dir), ("--model_path", artifact_path)):
        if not os.path.isdir(path):
            raise UserError(f"{flag} {path}: not a directory")
    data_path, conversations = _held_out(args)
    run_tokenizer, stop_tokens, template_kwargs, max_length = _run_setup(args)
    log(f"checking {artifact_path} against the run {args.run_dir} on {len(conversations)} conversations of "
        f"{data_path}")
    artifact, artifact_tokenizer = _load(artifact_path, args)
    checks = [check_prompts(conversations, run_tokenizer, template_kwargs, artifact_tokenizer)]
    turns = _answers(conversations, run_tokenizer, stop_tokens, template_kwargs, max_length)
    checks.append(check_stop(turns, artifact, artifact_tokenizer, stop_tokens, args.stop_samples, args.stop_margin,
                             args.seed))
    try:
        samples = Samples.of(conversations, run_tokenizer, stop_tokens, max_length, template_kwargs, "held-out",
                             "--max_length")
    except DataError as e:  # nothing trained within the limit: the quality cannot be measured, which fails it
        checks.append(Check("quality", False, f"not measured: {e}"))
        return checks, _report(args, artifact_path, data_path, conversations, checks)
    artifact_loss, tokens = _loss(artifact, samples, "loss of the artifact")
    quantized = _is_quantized(artifact)
    if os.path.abspath(artifact_path) == os.path.abspath(args.run_dir):
        reference_loss = artifact_loss  # the artifact is the trained model itself
    else:
        del artifact
        reference, _ = _load(args.run_dir, args)
        reference_loss, _ = _loss(reference, samples, "loss of the trained model")
    checks.append(check_quality(reference_loss, artifact_loss, tokens, quantized, args))
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
    path.write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
    failed = [c.name for c in checks if not c.passed]
    print(f"deploy check: {'passed' if not failed else 'FAILED (' + ', '.join(failed) + ')'}; report {path}",
          flush=True)
    return 1 if failed else 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)
