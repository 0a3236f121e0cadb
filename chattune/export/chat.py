"""Generation with the training chat template, stop tokens and template variables of the run."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from chattune.export.merge import load_for_inference, parse_dtype, run_info


@dataclass
class Chat:
    model: Any
    tokenizer: Any
    template_kwargs: dict
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0

    @classmethod
    def load(cls, path: str, adapter_path: str | None = None, dtype: str = "auto", device: str = "auto",
             trust_remote_code: bool = False, **generation: Any) -> "Chat":
        from chattune.errors import ConfigError

        if not os.path.exists(path) and not adapter_path:
            raise ConfigError(f"--model_name_or_path {path}: no such directory")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_for_inference(path, adapter_path, dtype=parse_dtype(dtype),
                                              device_map={"": device} if device == "cuda" else None,
                                              trust_remote_code=trust_remote_code)
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{adapter_path or path}: the tokenizer has no chat template; use the output_dir of a "
                              "finetune.py run (it saves the template), or a chat model")
        info = run_info(adapter_path or path)
        return cls(model, tokenizer, info.get("template_kwargs") or {}, **generation)

    def reply(self, history: list[dict], system: str | None = None) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + list(history)
        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True, **self.template_kwargs)
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        sample = self.temperature > 0
        with torch.no_grad():
            output = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=sample,
                temperature=self.temperature if sample else None, top_p=self.top_p if sample else None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def interactive(self, system: str | None = None) -> None:
        history: list[dict] = []
        print("chat: /reset clears the history, /exit quits", file=sys.stderr)
        while True:
            try:
                line = input("user> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return
            if line.strip() == "/exit":
                return
            if line.strip() == "/reset":
                history = []
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            answer = self.reply(history, system)
            history.append({"role": "assistant", "content": answer})
            print(f"assistant> {answer}", flush=True)
