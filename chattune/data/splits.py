"""Token-exact encoding in linear time: tokenize each piece of a sample once and prove its later prompts locally.

`encode.encode_samples` must give every later answer of a sample exactly the ids `tokenize(text[:answer start])`.
Tokenizing each of those prompts from the start costs the square of the turns. A fast tokenizer cuts its input at
every added token (`<|im_start|>`, `<|im_end|>`, ...) before anything else and tokenizes the text between them on its
own, so for tokenizers whose later stages do not look at where a piece sits in the input (checked in
`factorizes`), the ids of a prompt are the ids of its splits, and a cut of the text can change them only inside the
split it falls in. A prompt is therefore exact when every cut before it that is not at an added token (the answer
starts, "assistant\\n" | "Sure") tokenizes the same cut and whole: one tokenization of that split (the "window"),
not of the whole prompt. Where a window differs (a BPE merge across the cut), the whole prompt is tokenized, as the
reference path does.

What is tokenized: every text between added tokens once (identical strings once per batch), plus one window per
answer start that precedes a later answer. ASCII texts skip a normalizer made only of Unicode normalization forms
(Qwen's NFC), which leaves them unchanged; for large inputs, ASCII texts without added tokens are tokenized by
tiktoken where `twin.ascii_twin` proves its ids the tokenizer's. The result is identical to
`encode._encode_reference`, which a test checks over conversations of 1 to 40 turns on the real templates, and which
`encode_samples` re-checks on one sample of every batch.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Sequence
from itertools import chain
from typing import Any

# Pre-tokenizers that treat each split the same wherever it sits. Metaspace is listed separately: with
# prepend_scheme "first" it marks only the split at offset 0 of the input, which a split tokenized on its own is.
_LOCAL_PRE_TOKENIZERS = {"ByteLevel", "Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit",
                         "BertPreTokenizer", "UnicodeScripts", "CharDelimiterSplit"}


def factorizes(tokenizer: Any) -> bool:
    """Whether the tokenizer's ids of a text are the ids of its splits at added tokens, each tokenized on its own.

    True for a fast tokenizer encoded as `tokenizer(texts, add_special_tokens=False)` does it (the base class's
    encoding, no truncation or padding configured on the backend, no BPE dropout) whose added tokens match their
    literal text (no lstrip, rstrip, single_word; all matched in one pass) and whose pre-tokenizer never looks at a
    split's position in the input. Normalizers work on each split alone, so any is fine."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(tokenizer)._encode_plus is not TokenizersBackend._encode_plus:
        return False
    if backend.truncation is not None or backend.padding is not None or not hasattr(backend, "encode_batch_fast"):
        return False
    added = backend.get_added_tokens_decoder().values()
    if any(token.lstrip or token.rstrip or token.single_word for token in added):
        return False
    # Tokens marked `normalized` are matched after normalization, in the text between the others: reproduced by
    # `SplitEncoder` where normalizing changes nothing.
    if any(token.normalized for token in added) and not _identity(backend.normalizer):
        return False
    if backend.model.__class__.__name__ == "BPE" and backend.model.dropout:
        return False
    pre = backend.pre_tokenizer
    return pre is None or _local(json.loads(pre.__getstate__()))


def _identity(normalizer: Any) -> bool:
    return normalizer is None or json.loads(normalizer.__getstate__()) == {"type": "Sequence", "normalizers": []}


def leaves_ascii_alone(normalizer: Any) -> bool:
    """Whether a tokenizer's normalizer changes no ASCII text: none, or only Unicode normalization forms."""
    return normalizer is None or _unicode_forms(json.loads(normalizer.__getstate__()))


def _unicode_forms(spec: dict) -> bool:
    """Whether a normalizer only applies Unicode normalization forms (NFC, NFD, NFKC, NFKD), which change no ASCII
    text."""
    if spec.get("type") == "Sequence":
        return all(_unicode_forms(n) for n in spec.get("normalizers", []))
    return spec.get("type") in ("NFC", "NFD", "NFKC", "NFKD")


def _local(spec: dict) -> bool:
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_local(p) for p in spec.get("pretokenizers", []))
    if kind == "Metaspace":
        return spec.get("prepend_scheme", "always") in ("always", "never")
    return kind in _LOCAL_PRE_TOKENIZERS


class SplitEncoder:
    """Encodes samples as `encode._encode_reference` does, tokenizing each split once (see the module docstring)."""

    def __init__(self, tokenizer: Any, twin: Any = None) -> None:
        backend = tokenizer.backend_tokenizer
        self.backend = backend
        self.twin = twin  # twin.AsciiTwin: ASCII texts tokenized by tiktoken, where that is exact
        tokens = backend.get_added_tokens_decoder()
        # an added token alone tokenizes to its id: known without asking the tokenizer
        self.cache: dict[str, list[int]] = {token.content: [index] for index, token in tokens.items()}
        # Unicode normalization forms leave ASCII text as it is, so ASCII texts skip the normalizer: 11% of the
        # tokenizer's time with Qwen's NFC, measured. Only ASCII: every Unicode version agrees on it.
        self.ascii_skips_normalizer = backend.normalizer is not None and leaves_ascii_alone(backend.normalizer)
        # Leftmost-longest matching, as the tokenizer's: at the leftmost position, the longest alternative first
        self.passes = [re.compile("|".join(re.escape(t) for t in sorted(group, key=len, reverse=True)))
                       for group in ([t.content for t in tokens.values() if not t.normalized],
                                     [t.content for t in tokens.values() if t.normalized]) if group]

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """`tokenizer(texts, add_special_tokens=False)["input_ids"]`, each distinct text once in the encoder's life
        (one chunk of conversations: a prompt's splits are the ones its sample is cut into later)."""
        cache = self.cache
        new = [t for t in dict.fromkeys(texts) if t not in cache]
        if new and self.twin is not None:  # ASCII texts without added tokens (a prompt has them)
            plain = [t for t in new if t.isascii() and not any(p.search(t) for p in self.passes)]
            ids = list(map(self.twin.encode, plain))
            if self.twin.covers(plain, ids):  # else a regex match skipped text: the tokenizer encodes them
                cache.update(zip(plain, ids, strict=True))
                new = [t for t in new if t not in cache]
        if new and self.ascii_skips_normalizer:
            ascii_texts = [t for t in new if t.isascii()]
            new = [t for t in new if not t.isascii()]
            normalizer, self.backend.normalizer = self.backend.normalizer, None
            try:
                self._encode(ascii_texts)
            finally:
                self.backend.normalizer = normalizer
        if new:
            self._encode(new)
        return list(map(cache.__getitem__, texts))

    def _encode(self, texts: list[str]) -> None:
        """Tokenize `texts` in one batch into the cache."""
        self.backend.encode_special_tokens = False
        encoded = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        self.cache.update(zip(texts, (e.ids for e in encoded), strict=True))

    def count(self, text: str) -> int:
        """len(tokenize(text)): its added tokens, and the tokens of the text between them."""
        matches, gaps, at = self._matches(text), [], 0
        for start, end in matches:
            gaps.append(text[at:start])
            at = end
        gaps.append(text[at:])
        return len(matches) + sum(len(ids) for ids in self.tokenize([g for g in gaps if g]))

    def encode(self, samples: Sequence[Any], pieces_of) -> list[tuple[list, list]] | None:
        """Per sample: its pieces as (ids, trained), and per later answer None when the sample's ids before it are
        exactly its prompt, else the prompt's own ids. None when a sample's pieces do not cut where the tokenizer
        splits (a cut inside an added token): the caller then encodes the batch by the reference path."""
        plans, texts = [], []
        for sample in samples:
            plan = self._plan(sample, pieces_of(sample), texts)
            if plan is None:
                return None
            plans.append(plan)
        ids = self.tokenize(texts)
        out, prompts = [], []
        for sample, (pieces, (windows, later)) in zip(samples, plans, strict=True):
            parts = [(list(chain.from_iterable(map(ids.__getitem__, atoms))), trained) for atoms, trained in pieces]
            proven = [True]  # proven[m]: the first m windows tokenize the same cut and whole
            for _, whole, cut in windows:
                proven.append(proven[-1] and ids[whole] == list(chain.from_iterable(map(ids.__getitem__, cut))))
            handles = []
            for answer, m in later:
                exact = m is not None and proven[m]
                handles.append(None if exact else len(prompts))
                if not exact:
                    prompts.append(sample.text[:answer])
            out.append((parts, handles))
        prompt_ids = self.tokenize(prompts)
        return [(parts, [None if k is None else prompt_ids[k] for k in later]) for parts, later in out]

    def _matches(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of the added tokens in `text` as the tokenizer finds them: the tokens matched as written, then
        the `normalized` ones in the text between those."""
        matches = [(0, 0), (len(text), len(text))]
        for pattern in self.passes:
            found = []
            for (_, a), (b, _) in zip(matches, matches[1:], strict=False):
                found += [(m.start(), m.end()) for m in pattern.finditer(text, a, b)]
            matches = sorted(matches + found)
        return matches[1:-1]

    def _plan(self, sample: Any, pieces: list[tuple[int, int, bool]], texts: list[str]):
        text = sample.text
        matches = self._matches(text)
        starts, ends = [s for s, _ in matches], [e for _, e in matches]
        cuts = [b for _, b, _ in pieces[:-1]]
        for p in cuts:  # a cut inside an added token: the pieces do not split where the tokenizer does
            k = bisect.bisect_right(starts, p) - 1
            if k >= 0 and starts[k] < p < ends[k]:
                return None

        def atoms(a: int, b: int) -> list[int]:
            """text[a:b] cut at its added tokens, each part as its index into `texts`."""
            out, at = [], a
            for k in range(bisect.bisect_left(starts, a), len(starts)):
                s, e = matches[k]
                if e > b:
                    break
                if s > at:
                    out.append(len(texts))
                    texts.append(text[at:s])
                out.append(len(texts))
                texts.append(text[s:e])  # an added token: its id from the cache
                at = e
            if at < b or not out:
                out.append(len(texts))
                texts.append(text[at:b])
            return out

        plan_pieces = [(atoms(a, b), trained) for a, b, trained in pieces]
        answers = [a for a, _, trained in pieces if trained][1:]
        if not answers:  # one trained answer: no later prompt to prove
            return plan_pieces, ((), ())
        bounds = {p for m in matches for p in m}
        windows, at = [], []  # (end, whole, parts) of the split around each cut not at an added token; the cuts
        for p in cuts:
            if p < answers[-1] and p not in bounds:
                lo = ends[bisect.bisect_right(ends, p) - 1] if ends and ends[0] <= p else 0
                hi = starts[bisect.bisect_left(starts, p)] if starts and starts[-1] >= p else len(text)
                inner = [lo, *cuts[bisect.bisect_right(cuts, lo):bisect.bisect_left(cuts, hi)], hi]
                texts.append(text[lo:hi])
                parts = list(range(len(texts), len(texts) + len(inner) - 1))
                texts += [text[a:b] for a, b in zip(inner, inner[1:], strict=False)]
                windows.append((hi, parts[0] - 1, parts))
                at.append(p)
        later = []  # per later answer: how many windows lie before it, or None when its prompt is tokenized whole
        for answer in answers:
            k = bisect.bisect_left(starts, answer)
            m = bisect.bisect_left(at, answer)
            # an added token across the prompt's end, or a window that runs past it: tokenize the prompt
            whole = (k > 0 and ends[k - 1] > answer) or (m and windows[m - 1][0] > answer)
            later.append((answer, None if whole else m))
        return plan_pieces, (windows, later)
