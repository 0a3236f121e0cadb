"""The ids of ASCII text by tiktoken, for byte-level BPE tokenizers whose ids tiktoken provably reproduces.

A fast tokenizer spends about 0.25 CPU s per million characters (its pipeline keeps offsets and alignments for every
split); tiktoken's encoder, the same algorithm family, about a fifth of that. `SplitEncoder` gives it the ASCII texts
when `ascii_twin` finds the tokenizer is one tiktoken computes exactly, and checks every batch for lost text.

Why the ids are the same. Both split the text with the same regex, then merge each piece from its bytes: the
tokenizer merges the adjacent pair that comes first in its merge list (ties: leftmost), tiktoken the adjacent pair
whose concatenation is an entry with the lowest id (ties: leftmost). An available pair (x, y) that makes entry t
covers t's bytes exactly, and nothing merged across its edges before, so the merges inside it were those of t's bytes
merged alone, in the same order: in tiktoken's process every available pair making t is the pair that merging t's
bytes alone merges last, call it last(t). So with
  (a) the merge list ordered by the id of what each merge makes (never decreasing), and
  (b) last(t) listed as a merge for every entry t (computed by merging t's bytes alone),
the candidates are the same in both (tiktoken's are last(t) pairs, all listed; the tokenizer's are entries too), the
first in the list is one of lowest id, and all pairs making one entry are the same pair: both merge the leftmost
candidate of lowest id at every step, by induction the same sequence. Then:
  (c) a piece that is a vocabulary entry is that entry (tiktoken looks it up first; the tokenizer does with
      `ignore_merges`, otherwise its merges must rebuild every entry, which is checked);
  (d) the same pieces: one `Split` regex, isolated matches, then byte-level mapping with no prefix space, no
      normalization of ASCII (Unicode forms only), no dropout, byte fallback or word affixes. The regex engines
      (Oniguruma, fancy-regex) do not agree on every pattern even for ASCII text (Oniguruma's `^` and `$` match at
      every line, its `(?i:ß)` matches "ss", an empty match panics in tiktoken), so only the patterns in
      `PATTERNS` are taken, each compared on every ASCII text of 2 characters and on random text by a test; and
      tiktoken skips text no alternative matches where the tokenizer keeps it, which `SplitEncoder` detects by
      counting each batch's bytes.
Both kinds of merge files pass where they are sound: those converted from tiktoken (every split of an entry listed)
and those from BPE training (one merge per entry, the one that built it).
Checking a 151k vocabulary takes about 2.5 s, so preparation builds the twin only for large inputs, once per process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from itertools import chain
from typing import Any

import numpy as np

from chattune.data.splits import leaves_ascii_alone

# The split patterns whose matches on ASCII text both regex engines agree on (tests/test_twin.py compares them)
PATTERNS = {
    # Qwen2, Qwen2.5, Qwen3 (and Qwen's tiktoken file): digits one by one
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "qwen2",
    # Llama 3 (cl100k_base's): digits in groups of up to three
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "llama3",
}

# by the tokenizer backend (held, so its id is not reused) and its normalizer and pre-tokenizer (changed in place, they
# are another tokenizer): the twin, or None
_TWINS: dict[tuple[int, bytes, bytes], tuple[Any, Any]] = {}


class AsciiTwin:
    """tiktoken's encoder for a tokenizer's ASCII texts; `byte_lengths[id]` is the bytes token `id` stands for (0 for
    added tokens, which never come out of it)."""

    def __init__(self, encoding: Any, byte_lengths: np.ndarray) -> None:
        self.encode: Callable[[str], list[int]] = encoding.encode_ordinary
        self.byte_lengths = byte_lengths

    def covers(self, texts: list[str], ids: list[list[int]]) -> bool:
        """Whether the ids spell as many bytes as the texts hold: no text left out between regex matches."""
        flat = np.fromiter(chain.from_iterable(ids), np.int64)
        return int(self.byte_lengths[flat].sum()) == sum(map(len, texts))


def ascii_twin(tokenizer: Any) -> AsciiTwin | None:
    """The tiktoken twin of `tokenizer` for ASCII text, or None where its ids are not provably the tokenizer's (see
    the module docstring), or tiktoken is missing. Checked once per tokenizer in a process."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    key = (id(backend), *(part.__getstate__() if part is not None else b""
                            for part in (backend.normalizer, backend.pre_tokenizer)))
    known = _TWINS.get(key)
    if known is None or known[0] is not backend:
        known = _TWINS[key] = backend, _build(backend)
    return known[1]


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level characters -> the byte each stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _build(backend: Any) -> AsciiTwin | None:
    why = twin_problem(backend)
    if isinstance(why, str):
        return None
    ranks, pattern = why
    import tiktoken

    try:
        encoding = tiktoken.Encoding("chattune-twin", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    except Exception:  # noqa: BLE001 - a pattern its regex engine rejects, ids it will not take: no twin
        return None
    lengths = np.zeros(max(backend.get_vocab_size(with_added_tokens=True), max(ranks.values()) + 1), np.int64)
    for token, index in ranks.items():
        lengths[index] = len(token)
    return AsciiTwin(encoding, lengths)


def twin_problem(backend: Any) -> str | tuple[dict[bytes, int], str]:
    """Why tiktoken would not reproduce this tokenizer's ids of ASCII text; else (its mergeable ranks, its regex)."""
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return "tiktoken is not installed"
    if not leaves_ascii_alone(backend.normalizer):
        return "its normalizer may change ASCII text"
    pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"):
        return "its pre-tokenizer is not one regex split followed by the byte-level mapping"
    split, level = steps
    pattern = split.get("pattern", {}).get("Regex")
    if pattern is None or split.get("behavior") != "Isolated" or split.get("invert"):
        return "its split is not a regex keeping each match as a piece"
    if pattern not in PATTERNS:
        return "its split pattern is not one whose matches both regex engines are known to agree on"
    if level.get("add_prefix_space") or level.get("use_regex"):
        return "its byte-level step adds a prefix space or splits again"
    model = json.loads(backend.model.__getstate__())
    if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback"):
        return "its model is not a deterministic BPE without byte fallback"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "its BPE marks word pieces"
    alphabet = _byte_level_alphabet()
    vocab: dict[str, int] = model["vocab"]
    if not set(chain.from_iterable(vocab)) <= alphabet.keys():
        return "its vocabulary is not byte-level"
    table = str.maketrans({c: chr(b) for c, b in alphabet.items()})
    spelled = {token: token.translate(table).encode("latin-1") for token in vocab}
    ranks = {spelled[token]: index for token, index in vocab.items()}
    if len(ranks) != len(vocab) or any(bytes([b]) not in ranks for b in range(256)):
        return "its vocabulary spells some bytes twice or misses a byte"
    listed, made_last = set(), -1
    for merge in model["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        made = ranks.get(spelled[left] + spelled[right]) if left in spelled and right in spelled else None
        if made is None or made < made_last:
            return "its merges are not ordered by the id of what they make"  # (a)
        made_last = made
        listed.add((spelled[left], spelled[right]))
    for token in ranks:
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
        if all(split in listed for split in splits):
            continue  # every split is a merge (files converted from tiktoken), whichever is last
        # tiktoken's last two parts are entries that spell the token: its one split, or found by merging its bytes
        pair = splits[0] if len(splits) == 1 else _last_merge(token, ranks)
        if pair is not None and pair not in listed:
            return f"the merge tiktoken makes last for {token!r} is not one of its merges"  # (b)
    if not model.get("ignore_merges"):
        tokenize = backend.model.tokenize
        for token, index in vocab.items():
            if len(token) > 1 and [t.id for t in tokenize(token)] != [index]:
                return f"its merges do not rebuild the vocabulary entry {token!r}"  # (c)
    return ranks, pattern


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The two parts tiktoken's merging of `token`'s bytes alone joins last (the adjacent pair that is an entry of
    lowest id, leftmost, until two parts are left); None when it never gets there (it then never makes `token`)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best is None or rank < best):
                best, at = rank, i
        if best is None:
            return None
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None
