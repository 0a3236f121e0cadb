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

import copy
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from chattune.cli import log
from chattune.errors import UserError

REPORT_FILE = "deploy_check.json"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora: the ranks it allocates for


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


def _load(path: str, args: DeployArgs) -> tuple[Any, Any]:
    from chattune.gptq import resolve_device
    from chattune.merge import DTYPES, load_for_inference

    try:
        model, tokenizer = load_for_inference(path, dtype=DTYPES[args.dtype],
                                              device_map={"": resolve_device(args.device)},
                                              trust_remote_code=args.trust_remote_code)
    except OSError as e:
        raise UserError(f"{path}: cannot be loaded as a model ({e})") from None
    return model.eval(), tokenizer


def _release_memory() -> None:
    """Give the (GPU) memory of models no longer referenced back before the next one loads."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _trained_loss(args: DeployArgs, samples: Any) -> float:
    """The held-out loss of the trained model (the adapter on its base, or the full model) with transformers."""
    model, _ = _load(args.run_dir, args)
    return _loss(model, samples, "loss of the trained model")[0]


@dataclass
class Request:
    history: list[dict]
    tools: list[dict]


class TransformersEngine:
    """The artifact as transformers (and so chat.py) serves it: its own tokenizer and template, rendered with no
    template variables, its generation_config's stops."""

    name = "transformers"
    stops_from = "generation_config.json"
    max_prompt_tokens = None  # no limit of its own

    def __init__(self, path: str, args: DeployArgs, max_length: int):
        self.model, self.tokenizer = _load(path, args)
        self.quantized = bool(getattr(self.model.config, "quantization_config", None))

    @staticmethod
    def preflight(path: str) -> None:
        pass

    def prompts(self, requests: list[Request]) -> list[list[int]]:
        return [list(self.tokenizer.apply_chat_template(r.history, tools=r.tools or None, add_generation_prompt=True,
                                                        tokenize=True, return_dict=True)["input_ids"])
                for r in requests]

    def stop_ids(self) -> list[int]:
        from chattune.tokenizer import eos_ids

        return eos_ids(self.model.generation_config.eos_token_id)

    @torch.no_grad()
    def generate(self, requests: list[Request], max_new_tokens: list[int]) -> list[list[int]]:
        """Greedy, with the artifact's own stops: the new ids of each request, through the stop token if any."""
        device = next(self.model.parameters()).device
        stops = self.stop_ids()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (stops or [0])[0]
        out = []
        for request, limit in zip(requests, max_new_tokens, strict=True):
            prompt = self.tokenizer.apply_chat_template(request.history, tools=request.tools or None,
                                                        add_generation_prompt=True, tokenize=True, return_dict=True,
                                                        return_tensors="pt")
            greedy = copy.deepcopy(self.model.generation_config)  # the artifact's stops; greedy, bounded
            greedy.update(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                          max_new_tokens=limit, eos_token_id=stops, pad_token_id=pad)
            ids = self.model.generate(input_ids=prompt["input_ids"].to(device),
                                      attention_mask=prompt["attention_mask"].to(device), generation_config=greedy)
            out.append(ids[0, prompt["input_ids"].shape[1]:].tolist())
        return out

    def loss(self, samples: Any, desc: str) -> tuple[float, int]:
        return _loss(self.model, samples, desc)

    def close(self) -> None:
        self.model = None
        _release_memory()


class VllmEngine:
    """The artifact as vLLM serves it, through vLLM's own engine: its model loading (quantization_config included),
    chat rendering and tokenization, stops and kernels. A merged or GPTQ model directory is served as it is; an
    adapter as a LoRA on its base with the run's tokenizer (its baked template) and generation_config, as README
    "Serve it" serves it."""

    name = "vllm"
    stops_from = "vLLM (the tokenizer's eos_token and generation_config.json)"

    @staticmethod
    def preflight(path: str) -> None:
        """What would fail in vLLM, found before any model is loaded."""
        from chattune.merge import is_adapter_dir

        try:
            import vllm  # noqa: F401
        except ImportError:
            raise UserError("--engine vllm: vLLM is not installed here (pip install vllm, on a machine with a CUDA "
                            "GPU); --engine transformers runs the same checks without it") from None
        if not torch.cuda.is_available():
            raise UserError("--engine vllm needs a CUDA GPU, and none is visible here; --engine transformers runs "
                            "the same checks on the CPU") from None
        if is_adapter_dir(path):
            adapter = json.loads(Path(path, "adapter_config.json").read_text())
            if adapter.get("modules_to_save"):
                raise UserError(f"{path}: the adapter also trains {', '.join(adapter['modules_to_save'])} "
                                "(modules_to_save), which vLLM cannot serve as a LoRA: merge it (merge_lora.py) and "
                                "check the merged model with --model_path")
            if adapter.get("bias", "none") != "none":
                raise UserError(f"{path}: the adapter trains biases (bias={adapter['bias']!r}), which vLLM's LoRA does "
                                "not serve: merge it (merge_lora.py) and check the merged model with --model_path")

    def __init__(self, path: str, args: DeployArgs, max_length: int):
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        from chattune.merge import _base_of, is_adapter_dir

        # prefix caching off: the prompt checks would fill it with prefixes of the loss samples, and prompt
        # logprobs have depended on request order with it on (vllm-project/vllm#42019)
        options: dict[str, Any] = dict(
            dtype=args.engine_dtype, seed=args.seed, enforce_eager=True, enable_prefix_caching=False,
            gpu_memory_utilization=args.gpu_memory_utilization, trust_remote_code=args.trust_remote_code)
        self.lora = None
        model_dir = path
        if is_adapter_dir(path):
            adapter = json.loads(Path(path, "adapter_config.json").read_text())
            model_dir = _base_of(path, None)
            # vLLM takes the base's tokenizer and generation_config unless told: give it the run's (README "Serve it")
            options.update(model=model_dir, tokenizer=path, generation_config=path, enable_lora=True, max_loras=1,
                           max_lora_rank=_vllm_lora_rank(int(adapter.get("r") or 8)))
            self.lora = LoRARequest("artifact", 1, path)
        else:
            options.update(model=path, generation_config=path)
        self.quantized = _has_quantization_config(model_dir)
        options["max_model_len"] = _vllm_max_len(model_dir, max_length, args.stop_margin, args.trust_remote_code)
        self.max_prompt_tokens = options["max_model_len"] - 1  # vLLM refuses longer prompts
        self.llm = LLM(**options)
        self.tokenizer = self.llm.get_tokenizer()
        self.defaults = self.llm.get_default_sampling_params()  # generation_config's sampling settings

    def prompts(self, requests: list[Request]) -> list[list[int]]:
        """The prompt ids vLLM's chat path feeds the model: one token generated per request, its prompt read back."""
        from vllm import SamplingParams

        one = SamplingParams(max_tokens=1, temperature=0.0)
        return [list(out.prompt_token_ids) for out in self._chat(requests, [one] * len(requests))]

    def stop_ids(self) -> list[int]:
        """What vLLM stops on: the tokenizer's end-of-sequence token and generation_config's eos_token_id."""
        from chattune.tokenizer import eos_ids

        model_config = getattr(self.llm, "model_config", None) or self.llm.llm_engine.model_config
        ids = eos_ids((model_config.try_get_generation_config() or {}).get("eos_token_id"))
        eos = self.tokenizer.eos_token_id
        return list(dict.fromkeys(([eos] if eos is not None else []) + ids))

    def generate(self, requests: list[Request], max_new_tokens: list[int]) -> list[list[int]]:
        from vllm import SamplingParams

        # greedy, keeping generation_config's repetition penalty as transformers' generate does
        penalty = getattr(self.defaults, "repetition_penalty", 1.0) or 1.0
        params = [SamplingParams(max_tokens=limit, temperature=0.0, repetition_penalty=penalty)
                  for limit in max_new_tokens]
        return [list(out.outputs[0].token_ids) for out in self._chat(requests, params)]

    def _chat(self, requests: list[Request], params: list[Any]) -> list[Any]:
        """`LLM.chat` over the requests, batched per tool list (one `tools` per call), in the requests' order."""
        groups: dict[str, list[int]] = {}
        for k, request in enumerate(requests):
            groups.setdefault(json.dumps(request.tools, sort_keys=True), []).append(k)
        outputs: list[Any] = [None] * len(requests)
        for members in groups.values():
            tools = requests[members[0]].tools or None
            results = self.llm.chat([requests[k].history for k in members], [params[k] for k in members],
                                    use_tqdm=False, lora_request=self.lora, add_generation_prompt=True, tools=tools)
            for k, out in zip(members, results, strict=True):
                outputs[k] = out
        return outputs

    def loss(self, samples: Any, desc: str) -> tuple[float, int]:
        """Mean negative log-likelihood of the trained tokens from vLLM's prompt logprobs (the token at position t
        scored by the model given the tokens before it, as training's shifted labels score it)."""
        from vllm import SamplingParams, TokensPrompt

        from chattune.template import IGNORE_INDEX

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)  # each dict holds the prompt token
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in samples.input_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=True, lora_request=self.lora)
        nll, count = 0.0, 0
        for ids, labels, out in zip(samples.input_ids, samples.labels, outputs, strict=True):
            for t in range(1, len(ids)):
                if labels[t] == IGNORE_INDEX:
                    continue
                nll -= out.prompt_logprobs[t][ids[t]].logprob
                count += 1
        log(f"{desc}: {nll / max(count, 1):.4f} over {count:,} tokens (vLLM prompt logprobs)")
        return nll / max(count, 1), count

    def close(self) -> None:
        self.llm = None  # vLLM has no close(): dropping the last reference shuts its engine process down
        _release_memory()


def _vllm_max_len(model_dir: str, max_length: int, margin: int, trust_remote_code: bool) -> int:
    """Room for the held-out samples (up to --max_length tokens) and generation (+ --stop_margin); vLLM refuses a
    max_model_len beyond the model's positions."""
    from transformers import AutoConfig

    want = max_length + margin + 1
    limit = getattr(AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code),
                    "max_position_embeddings", None)
    if limit and want > limit:
        raise UserError(f"--max_length {max_length} + --stop_margin {margin} + 1 tokens is more than {model_dir} has "
                        f"positions for ({limit}): pass --max_length {max(limit - margin - 1, 1)} or less")
    return want


def _vllm_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds the adapter's rank."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), rank)


def _has_quantization_config(model_dir: str) -> bool:
    config = Path(model_dir, "config.json")
    return config.is_file() and bool(json.loads(config.read_text()).get("quantization_config"))


ENGINES = {"transformers": TransformersEngine, "vllm": VllmEngine}


def _requests(conversations: list[Any]) -> list[tuple[Any, int, Request]]:
    """Every trained turn of the held-out conversations, as (conversation, message index, request)."""
    from chattune.template import trained_turn_indices

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


def _answers(conversations: list[Any], tokenizer: Any, stops: list[str], template_kwargs: dict,
             max_length: int) -> list[Turn]:
    """Every trained turn with its answer ids, as the training pipeline tokenizes them (one sample per turn)."""
    from chattune.template import (
        IGNORE_INDEX,
        encode_samples,
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


def _loss(model: Any, samples: Any, desc: str) -> tuple[float, int]:
    from chattune.gptq import perplexity

    result = perplexity(model, samples, desc)
    return result.nll / max(result.tokens, 1), result.tokens


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
    from chattune.merge import is_adapter_dir

    if args.engine != "vllm":
        args.dtype = args.engine_dtype = args.dtype or "float32"
        return
    adapter, quantized = is_adapter_dir(artifact_path), _has_quantization_config(artifact_path)
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
    from chattune.data import DataError
    from chattune.gptq import Samples

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
        _release_memory()
    engine = engine_class(artifact_path, args, max_length)
    try:
        checks = [check_prompts(conversations, run_tokenizer, template_kwargs, engine)]
        turns = _answers(conversations, run_tokenizer, stop_tokens, template_kwargs, max_length)
        checks.append(check_stop(turns, engine, run_tokenizer, stop_tokens, args.stop_samples, args.stop_margin,
                                 args.seed))
        if samples is None:
            checks.append(Check("quality", False, f"not measured: {unmeasurable}"))
        else:
            artifact_loss, tokens = engine.loss(samples, "loss of the artifact")
            checks.append(check_quality(artifact_loss if reference_loss is None else reference_loss, artifact_loss,
                                        tokens, engine.quantized, args))
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
