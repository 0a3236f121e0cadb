"""Batches: padding to the longest sample of the batch (never to model_max_length, as Qwen's script does)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chattune.template import IGNORE_INDEX


@dataclass
class PaddingCollator:
    """Right-pads input_ids with `pad_token_id`, labels with -100 and builds the attention mask.

    `pad_to_multiple_of` rounds the padded length up (8 suits tensor cores) without changing the loss.
    """

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.as_tensor(f["input_ids"])
            labels[row, :n] = torch.as_tensor(f["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@dataclass
class PackingCollator:
    """Concatenates a micro-batch of samples into one row, with no padding at all.

    `position_ids` restart at 0 for every sample and there is no attention_mask, which is how transformers' sdpa,
    eager and flex_attention paths detect packed rows and keep attention inside each sample. For flash-attention the
    cumulative sequence lengths are precomputed here (`cu_seq_lens_*`), so the model does not rediscover them with a
    device sync in every layer. The first label of every sample is -100: it would be predicted from the previous
    sample's last token.
    """

    flash_kwargs: bool = False

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        input_ids = torch.cat([torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features])
        labels = torch.cat([torch.as_tensor(f["labels"], dtype=torch.long) for f in features])
        position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths])
        starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
        labels[starts] = IGNORE_INDEX
        batch = {"input_ids": input_ids[None], "labels": labels[None], "position_ids": position_ids[None]}
        if self.flash_kwargs:
            cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
        return batch


def sample_lengths(dataset: Any) -> list[int]:
    """Token count of every sample of a tokenized `datasets.Dataset`, read from the Arrow column (no Python rows)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.data.column("input_ids")).to_pylist()


def pack_bins(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: sample indices grouped so each bin's total length is at most `budget`.

    Longest samples first, each into the fullest bin it still fits, which leaves bins nearly full (few wasted
    tokens per micro-batch) in O(n log n).
    """
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), sorted
    for i in order:
        n = lengths[i]
        if n > budget:
            raise ValueError(f"sample {i} has {n} tokens, more than the {budget}-token micro-batch budget")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            remaining, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (remaining - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (budget - n, len(bins) - 1))
    return bins


class PackedBatchSampler(torch.utils.data.Sampler):
    """Yields bins of sample indices (one micro-batch each), packed once, in a seeded order per epoch."""

    def __init__(self, lengths: Sequence[int], budget: int, seed: int = 0) -> None:
        self.bins = pack_bins(lengths, budget)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        for k in torch.randperm(len(self.bins), generator=g).tolist():
            yield self.bins[k]

    def __len__(self) -> int:
        return len(self.bins)
