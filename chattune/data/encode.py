"""Rendered samples -> token ids and labels, token-exactly; conversations -> flat arrays with their counts.

`encode_samples` tokenizes every trained answer as its own continuation after exactly the ids inference uses as
its prompt (see chattune.data.template for the contract); `encode_conversations` renders, encodes and truncates a
range of conversations into flat arrays, one entry per sample, which the report and the cache writer read.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from chattune.data.splits import SplitEncoder, factorizes
from chattune.data.template import (
    PromptLimit,
    RenderedSample,
    make_renderer,
    render_conversation,
    trained_turn_indices,
)
from chattune.data.workers import ordered_map
from chattune.errors import TemplateError

IGNORE_INDEX = -100


def text_pieces(sample: RenderedSample) -> list[tuple[int, int, bool]]:
    """The sample's text cut at every trained span: (start, end, trained) in order, covering the whole text."""
    pieces, at = [], 0
    for start, end in sorted(sample.spans):
        if start > at:
            pieces.append((at, start, False))
        if end > start:
            pieces.append((start, end, True))
        at = max(at, end)
    if at < len(sample.text) or not pieces:
        pieces.append((at, len(sample.text), False))
    return pieces


def encode_samples(tokenizer: Any, samples: Sequence[RenderedSample], encoder: SplitEncoder | None = None
                   ) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Tokenize rendered samples token-exactly: per sample, one or more (input_ids, labels) arrays.

    Every trained answer is tokenized as its own continuation (never merged with the prompt before it), and the ids
    before it must be exactly the inference prompt, `tokenize(text[:answer start])` as apply_chat_template(history,
    add_generation_prompt=True, tokenize=True) gives it. Where the pieces before a later answer tokenize differently
    from that prompt (a BPE merge across an earlier turn boundary, e.g. an answer starting with "\n" after
    "assistant\n"), that answer is not trained in the sample and is emitted after it as a sample of its own: the
    exact prompt followed by the answer. Control-token strings inside message contents (`sample.plain`, only with
    --special_tokens_in_content text) are encoded as plain text.
    """
    if not samples:
        return []
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError(
            "masking needs a fast tokenizer; this tokenizer is a slow one. Convert it with "
            "`AutoTokenizer.from_pretrained(path, use_fast=True)` and save it, or use a model with tokenizer.json"
        )
    if encoder is None and factorizes(tokenizer):
        encoder = SplitEncoder(tokenizer)
    if encoder is not None and not any(sample.plain for sample in samples):
        fast = encoder.encode(samples, text_pieces)
        if fast is not None:
            encoded = [_assemble(parts, prompts) for parts, prompts in fast]
            if _agrees_with_reference(tokenizer, samples, encoded):
                return encoded
            print("note: this tokenizer splits text in a way the linear-time token-exact encoder does not expect; "
                  "these samples are encoded the slower reference way (same result)", file=sys.stderr, flush=True)
    return _encode_reference(tokenizer, samples)


def _agrees_with_reference(tokenizer: Any, samples: Sequence[RenderedSample],
                           encoded: list[list[tuple[np.ndarray, np.ndarray]]]) -> bool:
    """The fast path's result for the batch's first sample with several answers equals the reference path's: a
    guard, at the cost of one sample, against a tokenizer that passes `factorizes` and still cuts text otherwise."""
    k = next((k for k, sample in enumerate(samples) if len(sample.spans) > 1), None)
    if k is None:
        return True
    [reference] = _encode_reference(tokenizer, [samples[k]])
    return len(reference) == len(encoded[k]) and all(
        np.array_equal(a, b) and np.array_equal(x, y) for (a, x), (b, y) in zip(reference, encoded[k], strict=True))


def _encode_reference(tokenizer: Any, samples: Sequence[RenderedSample]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """`encode_samples` by tokenizing every later answer's whole prompt (the square of the turns)."""
    batch = _Batch(tokenizer)
    plans = []
    for sample in samples:
        pieces = text_pieces(sample)
        parts = [(batch.add(sample, a, b), trained) for a, b, trained in pieces]
        answers = [a for a, _, trained in pieces if trained][1:]  # the inference prompt of every later answer
        plans.append((parts, [batch.add(sample, 0, a) for a in answers]))
    batch.run()
    return [_assemble([(batch.get(h), trained) for h, trained in parts], [batch.get(h) for h in prompts])
            for parts, prompts in plans]


class _Batch:
    """Text regions to tokenize in two batched calls: the text as is, and control tokens of content as plain text."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.texts: dict[bool, list[str]] = {False: [], True: []}
        self.regions: list[list[tuple[bool, int]]] = []
        self.ids: dict[bool, list[list[int]]] = {}

    def add(self, sample: RenderedSample, start: int, end: int) -> int:
        """Register text[start:end] (cut around plain spans); returns its handle."""
        segments, at = [], start
        for a, b in sample.plain:
            if b <= start or a >= end:
                continue
            if a > at:
                segments.append((False, sample.text[at:a]))
            segments.append((True, sample.text[max(a, start):min(b, end)]))
            at = min(b, end)
        if at < end or not segments:
            segments.append((False, sample.text[at:end]))
        region = []
        for plain, text in segments:
            region.append((plain, len(self.texts[plain])))
            self.texts[plain].append(text)
        self.regions.append(region)
        return len(self.regions) - 1

    def run(self) -> None:
        for plain, texts in self.texts.items():
            self.ids[plain] = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                                             split_special_tokens=plain)["input_ids"] if texts else []

    def get(self, handle: int) -> list[int]:
        return [token for plain, k in self.regions[handle] for token in self.ids[plain][k]]


def _assemble(parts: list[tuple[list[int], bool]], prompts: list[list[int] | None]
              ) -> list[tuple[np.ndarray, np.ndarray]]:
    """A sample's ids and labels from its pieces; `prompts` holds each later answer's exact prompt ids, or None
    where they are known to be the sample's ids before it."""
    ids: list[int] = []
    trained: list[bool] = []
    extra: list[tuple[np.ndarray, np.ndarray]] = []
    later = iter(prompts)
    answers = 0
    for part, is_answer in parts:
        keep = is_answer
        if is_answer:
            answers += 1
            if answers > 1:
                prompt = next(later)
                if prompt is not None and prompt != ids:  # not the inference prompt: the answer trains on its own
                    keep = False
                    extra.append(_arrays(prompt + part, [False] * len(prompt) + [True] * len(part)))
        ids += part
        trained += [keep] * len(part)
    return [_arrays(ids, trained), *extra]


def _arrays(ids: list[int], trained: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    array = np.asarray(ids, dtype=np.int64)
    return array, np.where(np.asarray(trained, dtype=bool), array, IGNORE_INDEX)


def tokenize_samples(tokenizer: Any, samples: Sequence[RenderedSample]) -> list[tuple[list[int], list[int]]]:
    """`encode_samples` as plain lists, every encoding of every sample in order."""
    return [(ids.tolist(), labels.tolist()) for encodings in encode_samples(tokenizer, samples)
            for ids, labels in encodings]


@dataclass
class EncodeJob:
    """What a tokenizer worker needs; inherited by forked workers instead of pickled for every chunk."""
    conversations: Sequence[Any]
    tokenizer: Any
    template_kwargs: dict[str, Any] | None
    stop_tokens: list[str]
    max_length: int
    train_on: str = "all"
    plain_tokens: tuple[str, ...] = ()  # turn-structure tokens to encode as plain text where content holds them
    char_cap: int = 0  # message texts are cut to this many characters before rendering (0: never)
    bound_turns: bool = True  # stop rendering a conversation at the first turn whose prompt fills max_length
    pairs: bool = False  # preference pairs: every conversation gives its chosen sample, then its rejected one
    twin: Any = None  # twin.AsciiTwin of the tokenizer, for large inputs (built once, inherited by forked workers)


def char_cap(tokenizer: Any, max_length: int) -> int:
    """A message text length beyond which the rest cannot reach the kept tokens: no token stands for more characters
    than the longest vocabulary entry spells (byte-level entries spell at least as many characters as they decode
    to), so the first half of a text this long holds more than max_length tokens, and cutting the second half leaves
    the first max_length tokens of any sample unchanged. Bounds the work and memory of a 49 MB message by the
    tokens kept rather than by the message."""
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return 2 * (max_length + 1) * max(longest, 1)


def cap_messages(messages: Sequence[dict], cap: int) -> tuple[Sequence[dict], int]:
    """Messages with content / reasoning_content cut to `cap` characters; the number of texts cut."""
    if not cap:
        return messages, 0
    out, cut = [], 0
    for message in messages:
        long = [k for k in ("content", "reasoning_content")
                if isinstance(message.get(k), str) and len(message[k]) > cap]
        if long:
            message = dict(message) | {k: message[k][:cap] for k in long}
            cut += len(long)
        out.append(message)
    return (tuple(out) if cut else messages), cut


def encode_conversations(bounds: tuple[int, int], job: EncodeJob) -> dict[str, np.ndarray]:
    """Render, tokenize and truncate conversations[lo:hi]; flat arrays, one entry per sample."""
    lo, hi = bounds
    render = make_renderer(job.tokenizer, job.template_kwargs)
    encoder = SplitEncoder(job.tokenizer, job.twin) if factorizes(job.tokenizer) else None
    limit = PromptLimit(job.tokenizer, job.max_length, encoder and encoder.count) if job.bound_turns else None
    rendered, tool_turns, capped = [], [], []
    for index in range(lo, hi):
        conv = job.conversations[index]
        # a pair's two sides: the prompt with the chosen answer, the same prompt with the rejected one
        sides = [conv.messages, (*conv.messages[:-1], conv.rejected)] if job.pairs else [conv.messages]
        for side, whole in enumerate(sides):
            messages, cut = cap_messages(whole, job.char_cap)
            samples = render_conversation(render, messages, job.stop_tokens, tools=conv.tools, masked=conv.masked,
                                          train_on=job.train_on, source=conv.source, plain_tokens=job.plain_tokens,
                                          limit=limit, check=index == lo and side == 0)
            trained = trained_turn_indices(messages, conv.masked, job.train_on)
            trained = trained[: len(trained) - samples[0].beyond_limit_turns]
            for k, sample in enumerate(samples):
                rendered.append(sample)
                tool_turns.append(sum(bool(messages[i].get("tool_calls")) for i in trained) if k == 0 else 0)
                capped.append(cut if k == 0 else 0)
    # One sample can give several encodings (answers whose token-exact prompt differs train on their own): the
    # per-sample counts go with the first encoding, the extra ones are "turns rendered on their own".
    encoded, rows = [], []
    for k, encodings in enumerate(encode_samples(job.tokenizer, rendered, encoder)):
        for m, pair in enumerate(encodings):
            encoded.append(pair)
            rows.append((k, m))
    first = [m == 0 for _, m in rows]

    def per_row(values: list, empty: Any = 0) -> np.ndarray:
        return np.array([values[k] if m == 0 else empty for k, m in rows])

    if job.pairs and len(encoded) != 2 * (hi - lo):  # one trained turn per side: one encoding each
        raise AssertionError("a preference pair must encode to exactly two samples")
    ids = [i[: job.max_length] for i, _ in encoded]
    labels = [lab[: job.max_length] for _, lab in encoded]
    flat = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    paired = {"paired": np.ones(len(ids), bool)} if job.pairs else {}
    return paired | {
        "input_ids": flat.astype(np.int32),
        "labels": (np.concatenate(labels) if labels else flat).astype(np.int32),
        "kept_length": np.array([len(i) for i in ids], np.int64),
        "length": np.array([len(i) for i, _ in encoded], np.int64),
        "trained": np.array([int((lab != IGNORE_INDEX).sum()) for lab in labels], np.int64),
        "own_turn": np.array([rendered[k].own_turn or not f for (k, _), f in zip(rows, first, strict=True)], bool),
        "token_exact_turns": np.array([not f for f in first], bool),
        "eos_appended": per_row([s.eos_appended for s in rendered], False).astype(bool),
        "unstopped": per_row([s.unstopped_turns for s in rendered]).astype(np.int64),
        "trained_turns": per_row([s.trained_turns for s in rendered]).astype(np.int64),
        "masked_turns": per_row([s.masked_turns for s in rendered]).astype(np.int64),
        "tool_call_turns": per_row(tool_turns).astype(np.int64),
        "unrendered_reasoning": per_row([s.unrendered_reasoning for s in rendered]).astype(np.int64),
        "capped": per_row(capped).astype(np.int64),
        "beyond_limit": per_row([s.beyond_limit_turns for s in rendered]).astype(np.int64),
    }


def encode_all(job: EncodeJob, num_proc: int, chunk: int = 1000) -> dict[str, np.ndarray]:
    """Encode every conversation, in `num_proc` forked workers when there are enough of them to pay off."""
    from tqdm.auto import tqdm

    n = len(job.conversations)
    ranges = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    parts = []
    with tqdm(total=n, desc="Tokenizing conversations", unit="conv", disable=n < chunk) as bar:
        for (lo, hi), part in zip(ranges, ordered_map(encode_conversations, job, ranges,
                                                      num_proc if len(ranges) > 1 else 1), strict=True):
            parts.append(part)
            bar.update(hi - lo)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else encode_conversations((0, 0), job)

def kept_samples(encoded: dict[str, np.ndarray]) -> np.ndarray:
    """Which samples are kept: those with a trained token; of preference pairs, those whose two sides both have one
    (a pair is kept or dropped whole, so the kept samples stay chosen, rejected, chosen, ...)."""
    keep = encoded["trained"] > 0
    if "paired" in encoded:
        keep = np.repeat(keep[0::2] & keep[1::2], 2)
    return keep


def kept_arrays(encoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The flat ids, labels and lengths of the kept samples (`kept_samples`; the others are dropped and counted)."""
    keep = kept_samples(encoded)
    token_keep = np.repeat(keep, encoded["kept_length"])
    return {"input_ids": encoded["input_ids"][token_keep], "labels": encoded["labels"][token_keep],
            "lengths": encoded["kept_length"][keep]}
