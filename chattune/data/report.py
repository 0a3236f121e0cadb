"""The data report: what was read, kept, cut and dropped (nothing disappears without being counted), and the
preview of a sample with its trained part marked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from chattune.data.encode import IGNORE_INDEX, kept_samples
from chattune.data.problems import DataError


@dataclass
class DataReport:
    files: list[str] = field(default_factory=list)
    conversations: int = 0
    skipped_records: int = 0  # invalid records dropped by --skip_invalid_records
    samples: int = 0  # rendered samples (conversations + turns rendered on their own)
    own_turn_samples: int = 0  # turns trained as samples of their own (the template rewrites them later, or ...)
    token_exact_samples: int = 0  # ... their exact inference prompt tokenizes differently from the conversation
    kept: int = 0
    tokens: int = 0  # in kept samples, after truncation
    trained_tokens: int = 0
    truncated: int = 0  # kept samples cut at max_length
    truncated_tokens: int = 0  # tokens cut from kept samples
    dropped_no_trained: int = 0  # samples whose trained part lay wholly beyond max_length
    dropped_untrained: int = 0  # samples with no turn to train at all (every assistant turn marked untrained)
    eos_appended: int = 0  # last turns the template left without an end-of-turn token; eos appended
    unstopped_turns: int = 0  # trained turns followed by no end-of-turn token (the model may not learn to stop)
    trained_turns: int = 0  # assistant turns trained (tool-calling turns included)
    masked_turns: int = 0  # assistant turns marked not to train (train/loss false, weight 0, --train_on last)
    tool_call_turns: int = 0  # trained assistant turns that call tools
    unrendered_reasoning: int = 0  # trained turns with reasoning_content the template does not render (not trained)
    content_control_tokens: int = 0  # conversations whose text holds turn-structure tokens, encoded as plain text
    capped_texts: int = 0  # message texts so long they were cut before tokenizing (see char_cap)
    beyond_limit_turns: int = 0  # trained turns whose prompt alone fills max_length: not rendered (see PromptLimit)
    pairs: int = 0  # preference data: pairs read (two samples each: chosen, rejected); 0 for supervised data
    pairs_dropped: int = 0  # pairs with a side whose answer lay wholly beyond max_length (both sides dropped)
    max_length: int = 0
    length_histogram: dict[str, int] = field(default_factory=dict)  # untruncated sample lengths
    skipped_examples: list[str] = field(default_factory=list)  # the first problems of the skipped records
    ignored: list[str] = field(default_factory=list)  # entries of given directories that were not read, with why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def add(self, other: DataReport) -> None:
        """Add the counts of another part of the same data (a chunk tokenized on its own)."""
        for name, value in vars(other).items():
            if name == "length_histogram":
                for bucket, count in value.items():
                    self.length_histogram[bucket] = self.length_histogram.get(bucket, 0) + count
            elif isinstance(value, int) and not isinstance(value, bool) and name != "max_length":
                setattr(self, name, getattr(self, name) + value)

    def format(self) -> str:
        what = f"{self.conversations} preference pairs" if self.pairs else f"{self.conversations} conversations"
        lines = [
            f"data: {what} from {len(self.files)} file(s)"
            + (f", {self.skipped_records} invalid records skipped" if self.skipped_records else ""),
            f"  samples {self.samples} ({self.own_turn_samples} turns rendered on their own"
            + (f", {self.token_exact_samples} of them for a token-exact prompt" if self.token_exact_samples else "")
            + f"), kept {self.kept}",
            f"  tokens {self.tokens:,}, trained {self.trained_tokens:,}"
            + (f" ({self.trained_tokens / self.tokens:.0%})" if self.tokens else ""),
            f"  truncated at {self.max_length}: {self.truncated} samples ({self.truncated_tokens:,} tokens cut"
            + (", at least" if self.capped_texts else "") + f"); dropped with no trained token left: "
            f"{self.dropped_no_trained}",
        ]
        if self.pairs:
            lines.append(f"  pairs kept {self.pairs - self.pairs_dropped} (each a chosen and a rejected sample); dropped "
                         f"because a side's answer lies beyond {self.max_length} tokens: {self.pairs_dropped}")
        if self.dropped_untrained:
            lines.append(f"  dropped with no turn to train (every assistant turn marked untrained in the data, or by "
                         f"--train_on): {self.dropped_untrained}")
        if self.capped_texts:
            lines.append(f"  {self.capped_texts} message texts far longer than {self.max_length} tokens were cut "
                         "before tokenizing (their end lies beyond the kept tokens; sample lengths count what "
                         "remained)")
        lines.append(f"  assistant turns trained {self.trained_turns:,} ({self.tool_call_turns:,} with tool calls), "
                     f"masked {self.masked_turns:,}")
        if self.beyond_limit_turns:
            lines.append(f"  {self.beyond_limit_turns:,} assistant turns start after {self.max_length} tokens of "
                         "history (their prompt alone fills the limit): not trained, and not rendered")
        if self.content_control_tokens:
            lines.append(f"  {self.content_control_tokens} conversations hold turn-structure tokens in their text: "
                         "encoded as plain text (--special_tokens_in_content text)")
        if self.unrendered_reasoning:
            lines.append(
                f"  WARNING: {self.unrendered_reasoning} trained turns carry reasoning_content that the chat template "
                "does not render: that reasoning is not trained. Use a template that renders it (e.g. Qwen3's) or "
                "drop the field.")
        if self.eos_appended:
            lines.append(f"  eos appended to {self.eos_appended} last turns (the template leaves them open)")
        if self.unstopped_turns:
            lines.append(
                f"  WARNING: {self.unstopped_turns} trained turns end without an end-of-turn token: the model may not "
                "learn to stop. Use a template that closes assistant turns (--template)."
            )
        if self.skipped_examples:
            lines.append("  skipped records (--skip_invalid_records):")
            lines += [f"    {problem}" for problem in self.skipped_examples]
            if self.skipped_records > len(self.skipped_examples):
                lines.append(f"    ... and {self.skipped_records - len(self.skipped_examples)} more records")
        if self.ignored:
            lines.append(f"  not read from the given directories ({len(self.ignored)}):")
            lines += [f"    {entry}" for entry in self.ignored[:10]]
            if len(self.ignored) > 10:
                lines.append(f"    ... and {len(self.ignored) - 10} more")
        shown = _trim_empty(self.length_histogram)
        if shown:
            lines.append("  sample length (tokens, before truncation):")
            peak = max(shown.values()) or 1
            for bucket, count in shown.items():
                lines.append(f"    {bucket:>13} {count:>8}  {'#' * max(1 if count else 0, round(30 * count / peak))}")
        return "\n".join(lines)


def _trim_empty(histogram: dict[str, int]) -> dict[str, int]:
    """Drop the empty buckets at both ends, so the table shows the range the data covers."""
    items = list(histogram.items())
    nonzero = [i for i, (_, n) in enumerate(items) if n]
    return dict(items[nonzero[0] : nonzero[-1] + 1]) if nonzero else {}


def _bucket_edges(max_length: int) -> list[int]:
    edges, edge = [], 64
    while edge < max_length:
        edges.append(edge)
        edge *= 2
    return [*edges, max_length]


def length_histogram(lengths: Sequence[int], max_length: int) -> dict[str, int]:
    """Counts per power-of-two bucket up to max_length, then one bucket for longer samples (those truncated)."""
    edges = _bucket_edges(max_length)
    counts = [0] * (len(edges) + 1)
    for n in lengths:
        i = next((k for k, e in enumerate(edges) if n <= e), len(edges))
        counts[i] += 1
    names, low = [], 1
    for e in edges:
        names.append(f"{low}-{e}")
        low = e + 1
    names.append(f"> {max_length}")
    return dict(zip(names, counts))


def report_of(encoded: dict[str, np.ndarray], max_length: int, conversations: int, files, skipped_records: int
            ) -> DataReport:
    length, trained = encoded["length"], encoded["trained"]
    kept = kept_samples(encoded)
    pairs = len(length) // 2 if "paired" in encoded else 0
    untrained = ~kept & ((encoded["trained_turns"] + encoded["beyond_limit"]) == 0)  # nothing to train, at any length
    truncated = kept & (length > max_length)
    return DataReport(
        files=list(files), conversations=conversations, skipped_records=skipped_records, max_length=max_length,
        samples=len(length), own_turn_samples=int(encoded["own_turn"].sum()),
        token_exact_samples=int(encoded["token_exact_turns"].sum()),
        eos_appended=int(encoded["eos_appended"].sum()), unstopped_turns=int(encoded["unstopped"].sum()),
        trained_turns=int(encoded["trained_turns"].sum()), masked_turns=int(encoded["masked_turns"].sum()),
        tool_call_turns=int(encoded["tool_call_turns"].sum()),
        unrendered_reasoning=int(encoded["unrendered_reasoning"].sum()), capped_texts=int(encoded["capped"].sum()),
        beyond_limit_turns=int(encoded["beyond_limit"].sum()),
        pairs=pairs, pairs_dropped=int((~kept[0::2]).sum()) if pairs else 0,
        kept=int(kept.sum()), tokens=int(encoded["kept_length"][kept].sum()), trained_tokens=int(trained[kept].sum()),
        truncated=int(truncated.sum()), truncated_tokens=int((length[truncated] - max_length).sum()),
        dropped_no_trained=int((~(trained > 0) & ~untrained).sum()), dropped_untrained=int(untrained.sum()),
        length_histogram=length_histogram(length.tolist(), max_length),
    )


def nothing_kept_error(max_length: int, what: str = "training", flag: str = "--model_max_length",
                       report: DataReport | None = None) -> DataError:
    if report is not None and report.dropped_untrained and not report.dropped_no_trained:
        return DataError(f"no {what} sample has a turn to train: every assistant turn of the {report.samples} samples "
                         "is marked untrained (`train`/`loss` false or `weight` 0 in the data, or --train_on); mark "
                         "the answers to learn, or check --train_on")
    return DataError(f"no {what} sample has a trained token left after truncation to {max_length} tokens (every "
                     f"answer starts beyond it); raise {flag}, or shorten the prompts")


def format_preview(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int], color: bool = False) -> str:
    """The sample's text with the trained part marked: ⟦trained⟧ (and green when `color`)."""
    open_, close = ("\x1b[32m⟦", "⟧\x1b[0m") if color else ("⟦", "⟧")
    parts, run, trained = [], [], None
    for token, label in zip(input_ids, labels):
        now = label != IGNORE_INDEX
        if trained is not None and now != trained:
            parts.append((trained, run))
            run = []
        run.append(token)
        trained = now
    if run:
        parts.append((trained, run))
    text = "".join(
        open_ + tokenizer.decode(ids) + close if is_trained else tokenizer.decode(ids) for is_trained, ids in parts
    )
    return text


def trained_segments(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int]) -> list[str]:
    """The decoded runs of consecutive trained tokens, in order (what the model learns to write)."""
    segments, run = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            segments.append(tokenizer.decode(run))
            run = []
    if run:
        segments.append(tokenizer.decode(run))
    return segments
