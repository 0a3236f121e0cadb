"""The engines the deploy check runs an artifact in: transformers (as chat.py serves it) and vLLM's offline engine
(as `vllm serve` serves it). One interface: the prompt ids the engine feeds the model, the stops it applies, greedy
generation, and the loss on held-out trained tokens."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from chattune.cli import log
from chattune.errors import UserError

if TYPE_CHECKING:
    from chattune.export.deploy import DeployArgs

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora: the ranks it allocates for


def load_artifact(path: str, args: DeployArgs) -> tuple[Any, Any]:
    from chattune.export.gptq import resolve_device
    from chattune.export.merge import DTYPES, load_for_inference

    try:
        model, tokenizer = load_for_inference(path, dtype=DTYPES[args.dtype],
                                              device_map={"": resolve_device(args.device)},
                                              trust_remote_code=args.trust_remote_code)
    except OSError as e:
        raise UserError(f"{path}: cannot be loaded as a model ({e})") from None
    return model.eval(), tokenizer


def loss_on(model: Any, samples: Any, desc: str) -> tuple[float, int]:
    from chattune.export.samples import perplexity

    result = perplexity(model, samples, desc)
    return result.nll / max(result.tokens, 1), result.tokens


def release_memory() -> None:
    """Give the (GPU) memory of models no longer referenced back before the next one loads."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
        self.model, self.tokenizer = load_artifact(path, args)
        self.quantized = bool(getattr(self.model.config, "quantization_config", None))

    @staticmethod
    def preflight(path: str) -> None:
        pass

    def prompts(self, requests: list[Request]) -> list[list[int]]:
        return [list(self.tokenizer.apply_chat_template(r.history, tools=r.tools or None, add_generation_prompt=True,
                                                        tokenize=True, return_dict=True)["input_ids"])
                for r in requests]

    def stop_ids(self) -> list[int]:
        from chattune.data.tokenizer import eos_ids

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
        return loss_on(self.model, samples, desc)

    def close(self) -> None:
        self.model = None
        release_memory()


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
        from chattune.export.merge import is_adapter_dir

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

        from chattune.export.merge import base_of, is_adapter_dir

        # prefix caching off: the prompt checks would fill it with prefixes of the loss samples, and prompt
        # logprobs have depended on request order with it on (vllm-project/vllm#42019)
        options: dict[str, Any] = dict(
            dtype=args.engine_dtype, seed=args.seed, enforce_eager=True, enable_prefix_caching=False,
            gpu_memory_utilization=args.gpu_memory_utilization, trust_remote_code=args.trust_remote_code)
        self.lora = None
        model_dir = path
        if is_adapter_dir(path):
            adapter = json.loads(Path(path, "adapter_config.json").read_text())
            model_dir = base_of(path, None)
            # vLLM takes the base's tokenizer and generation_config unless told: give it the run's (README "Serve it")
            options.update(model=model_dir, tokenizer=path, generation_config=path, enable_lora=True, max_loras=1,
                           max_lora_rank=_vllm_lora_rank(int(adapter.get("r") or 8)))
            self.lora = LoRARequest("artifact", 1, path)
        else:
            options.update(model=path, generation_config=path)
        self.quantized = has_quantization_config(model_dir)
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
        from chattune.data.tokenizer import eos_ids

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

        from chattune.data.encode import IGNORE_INDEX

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
        release_memory()


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


def has_quantization_config(model_dir: str) -> bool:
    config = Path(model_dir, "config.json")
    return config.is_file() and bool(json.loads(config.read_text()).get("quantization_config"))


ENGINES = {"transformers": TransformersEngine, "vllm": VllmEngine}
