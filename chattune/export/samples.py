"""Conversations as token samples for the steps after training (GPTQ calibration, perplexity, the deploy check):
split into disjoint held-out and calibration sets, tokenized by the training pipeline, and scored by perplexity over
their trained tokens (what the fine-tuned model was taught to write)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from chattune.data.encode import IGNORE_INDEX
from chattune.errors import UserError
from chattune.train.loss import accepts_logits_to_keep


@dataclass
class Split:
    eval: list[int]  # indices of held-out conversations
    calibration: list[int]  # indices of calibration conversations, disjoint from `eval`
    shortfall: str | None = None  # why fewer conversations than asked for are used, for the user


def split_conversations(count: int, eval_samples: int, num_samples: int, seed: int = 0) -> Split:
    """Disjoint held-out and calibration sets of conversation indices, the same for the same count and seed.

    With enough data the first `eval_samples` of a seeded permutation are held out and the next `num_samples`
    calibrate. With too little, the conversations are shared in the asked-for proportion, keeping at least one on
    each side, and `shortfall` says so.
    """
    order = list(range(count))
    random.Random(seed).shuffle(order)
    if count >= eval_samples + num_samples:
        return Split(sorted(order[:eval_samples]), sorted(order[eval_samples:eval_samples + num_samples]))
    if eval_samples and count < 2:
        raise UserError(f"the data holds {count} conversation(s): at least 2 are needed, one held out to measure "
                        "perplexity and one to calibrate on (or pass --eval_samples 0 to skip the evaluation)")
    n_eval = min(eval_samples, max(1, round(count * eval_samples / (eval_samples + num_samples))), count - 1)
    n_calibration = count - n_eval  # < num_samples, as count < eval_samples + num_samples
    shortfall = f"only {count} conversations in the data, fewer than --num_samples {num_samples}"
    if eval_samples:
        shortfall = (f"only {count} conversations in the data, fewer than --eval_samples {eval_samples} + "
                     f"--num_samples {num_samples}: holding out {n_eval} for evaluation and calibrating on "
                     f"{n_calibration}. A perplexity over {n_eval} conversations is a rough estimate")
    shortfall += f". GPTQ calibrates better on {num_samples}+ conversations."
    return Split(sorted(order[:n_eval]), sorted(order[n_eval:]), shortfall)


@dataclass
class Samples:
    input_ids: list[list[int]]
    labels: list[list[int]]
    conversations: int

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)

    @classmethod
    def of(cls, conversations: list, tokenizer: Any, stop_tokens: Any, max_length: int, template_kwargs: Any,
           what: str, length_flag: str, cache_dir: str | None = None, files: Any = ()) -> Samples:
        """`conversations` tokenized by the training pipeline (prepare_dataset), as lists."""
        from chattune.data.prepare import prepare_dataset

        if not conversations:
            return cls([], [], 0)
        prepared = prepare_dataset(conversations, tokenizer, stop_tokens=stop_tokens, max_length=max_length,
                                   template_kwargs=template_kwargs, cache_dir=cache_dir, files=files, what=what,
                                   length_flag=length_flag).dataset
        return cls(list(prepared["input_ids"]), list(prepared["labels"]), len(conversations))


@dataclass
class Perplexity:
    value: float
    nll: float  # summed cross-entropy (nats)
    tokens: int  # scored (trained) tokens


@torch.no_grad()
def perplexity(model: Any, samples: Samples, desc: str = "perplexity") -> Perplexity:
    """exp(mean CE) over the tokens whose label is not -100 (the assistant's part), one sample per forward.

    Only the logits of scored positions are computed where the model supports `logits_to_keep` (a 150k vocabulary
    over 2048 positions is 1.2 GB of float32 logits otherwise).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    sparse_logits = accepts_logits_to_keep(model)
    nll, count = 0.0, 0
    pairs = list(zip(samples.input_ids, samples.labels, strict=True))
    for ids, labels in tqdm(pairs, desc=desc, unit="sample", leave=False):
        input_ids = torch.tensor([ids], device=device)
        target = torch.tensor(labels[1:], device=device)  # position t predicts token t + 1
        positions = (target != IGNORE_INDEX).nonzero().squeeze(-1)
        if not len(positions):
            continue
        if sparse_logits:
            logits = model(input_ids=input_ids, logits_to_keep=positions, use_cache=False).logits[0]
        else:
            logits = model(input_ids=input_ids, use_cache=False).logits[0, positions]
        nll += torch.nn.functional.cross_entropy(logits.float(), target[positions], reduction="sum").item()
        count += len(positions)
    return Perplexity(math.exp(nll / count) if count else float("nan"), nll, count)
