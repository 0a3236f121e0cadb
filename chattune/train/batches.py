"""Optimizer steps and micro-batches: the step is the user's recipe, the micro-batch is ours to make fast.

An optimizer step holds exactly the samples the user asked for: `per_device_train_batch_size x
gradient_accumulation_steps x processes` of them, consecutive in a seeded shuffle of the data (the last step of an
epoch holds the rest), the same samples packed or padded. How a step's samples are cut into micro-batches changes
no number, because the loss is the mean over the step's trained tokens (chattune.train.trainer):

* padded: at most `per_device_train_batch_size` samples per micro-batch, each padded to the longest of its
  micro-batch; a step's samples are sorted by length first, so samples of similar length share one (less padding).
* packed: a step's samples are packed into rows of at most `budget` tokens (first-fit decreasing), no padding.

Every rank runs the same number of micro-batches in every step (the Trainer's gradient accumulation): the most any
step of the run needs, planned once. A step that needs fewer splits its largest micro-batches; a slot left empty (a
step with fewer samples than slots) gets a filler: the shortest sample with every label masked, which trains
nothing but keeps the ranks' collective calls in step. `--tokens_per_step N` cuts steps by tokens instead (about N
tokens each, nanochat-style): the number of steps per epoch is then fixed and the samples per step vary.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from chattune.data.encode import IGNORE_INDEX


@dataclass(frozen=True)
class StepShape:
    """How the run cuts its data into optimizer steps and micro-batches (see the module docstring)."""

    samples_per_step: int  # global samples per optimizer step (0 when steps are cut by tokens)
    tokens_per_step: int  # global tokens per optimizer step (0 when steps are cut by samples)
    per_device: int  # padded: samples per micro-batch at most
    budget: int  # packed: tokens per micro-batch at most; 0: padded
    processes: int
    seed: int

    @property
    def packed(self) -> bool:
        return self.budget > 0


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded shuffle of an epoch (the same on every rank)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_steps(lengths: np.ndarray, shape: StepShape, epoch: int) -> list[np.ndarray]:
    """The sample indices of every optimizer step of an epoch, in order."""
    order = epoch_order(len(lengths), shape.seed, epoch)
    if shape.samples_per_step:
        return [order[i:i + shape.samples_per_step] for i in range(0, len(order), shape.samples_per_step)]
    # by tokens: a fixed number of steps, cut where the running token count crosses each step's share
    tokens = np.cumsum(lengths[order])
    steps = max(1, round(int(tokens[-1]) / shape.tokens_per_step)) if len(tokens) else 0
    cuts = np.searchsorted(tokens, tokens[-1] * np.arange(1, steps) / steps, side="right") if steps else []
    return [part for part in np.split(order, cuts)]


def pack_bins(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: indices grouped so each bin's total length is at most `budget`.

    Longest samples first, each into the fullest bin it still fits, which leaves bins nearly full (few wasted
    tokens per micro-batch) in O(n log n).
    """
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


def natural_micro_batches(step: np.ndarray, lengths: np.ndarray, shape: StepShape) -> list[list[int]]:
    """A step's samples cut into micro-batches before they are spread over ranks and slots."""
    if shape.packed:
        return [[int(step[i]) for i in b] for b in pack_bins(lengths[step].tolist(), shape.budget)]
    ordered = step[np.argsort(-lengths[step], kind="stable")]
    return [ordered[i:i + shape.per_device].tolist() for i in range(0, len(ordered), shape.per_device)]


def _cost(batch: list[int], lengths: np.ndarray, packed: bool) -> int:
    """Tokens a micro-batch computes: its samples' tokens packed, or its width times its samples padded."""
    if not batch:
        return 0
    return int(lengths[batch].sum()) if packed else int(lengths[batch].max()) * len(batch)


def rank_slots(batches: list[list[int]], lengths: np.ndarray, shape: StepShape, per_rank: int) -> list[list[list[int]]]:
    """`processes x per_rank` micro-batches from a step's natural ones: the largest split in two until there are
    enough (an empty list where even single samples run out: a filler), then dealt to the ranks largest first, each
    to the rank with the least work so far."""
    slots = shape.processes * per_rank
    if len(batches) > slots:
        raise ValueError(f"a step needs {len(batches)} micro-batches, more than the {slots} planned")
    batches = [list(b) for b in batches]
    while len(batches) < slots:
        splittable = [b for b in batches if len(b) > 1]
        if not splittable:
            batches.append([])
            continue
        largest = max(splittable, key=lambda b: _cost(b, lengths, shape.packed))
        batches.remove(largest)
        ordered = sorted(largest, key=lambda i: -lengths[i])
        batches += [ordered[0::2], ordered[1::2]]  # alternating: two halves of about equal work
    batches.sort(key=lambda b: -_cost(b, lengths, shape.packed))
    ranks: list[list[list[int]]] = [[] for _ in range(shape.processes)]
    load = [0] * shape.processes
    for batch in batches:
        rank = min((r for r in range(shape.processes) if len(ranks[r]) < per_rank), key=lambda r: load[r])
        ranks[rank].append(batch)
        load[rank] += _cost(batch, lengths, shape.packed)
    return ranks


def micro_batches_per_step(lengths: np.ndarray, shape: StepShape, epochs: int) -> int:
    """Micro-batches per rank and step for the whole run: the most any step of the first `epochs` epochs needs."""
    most = 1
    for epoch in range(max(1, epochs)):
        for step in epoch_steps(lengths, shape, epoch):
            most = max(most, math.ceil(len(natural_micro_batches(step, lengths, shape)) / shape.processes))
    return most


class StepSampler(torch.utils.data.Sampler):
    """This rank's micro-batches (lists of sample indices; `[~i]` is a filler made of sample i) for every step of
    the current epoch, `per_rank` per step. `set_epoch` reshuffles (the Trainer's epoch callback calls it); the
    order is read when iteration starts."""

    def __init__(self, lengths: Sequence[int], shape: StepShape, per_rank: int, rank: int, pairs: bool = False
                 ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)  # of preference pairs: both sides (`pair_lengths`)
        self.shape, self.per_rank, self.rank, self.pairs = shape, per_rank, rank, pairs
        self.filler = int(np.argmin(self.lengths)) if len(self.lengths) else 0
        self.epoch = 0
        self.steps = len(epoch_steps(self.lengths, shape, 0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def step_layout(self, epoch: int) -> list[list[list[list[int]]]]:
        """Every step of `epoch`: [rank][slot] -> sample indices (an empty slot is a filler)."""
        return [rank_slots(natural_micro_batches(step, self.lengths, self.shape), self.lengths, self.shape,
                           self.per_rank) for step in epoch_steps(self.lengths, self.shape, epoch)]

    def __iter__(self):
        for step in self.step_layout(self.epoch):
            for batch in step[self.rank]:
                batch = batch or [~self.filler]
                yield pair_samples(batch) if self.pairs else batch

    def __len__(self) -> int:
        return self.steps * self.per_rank


def pair_lengths(lengths: Sequence[int]) -> np.ndarray:
    """Tokens of every preference pair (its samples are chosen, rejected, chosen, ...): both sides together, which is
    what a pair costs in a micro-batch."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return lengths[0::2] + lengths[1::2]


def pair_samples(pairs: Sequence[int]) -> list[int]:
    """The samples of pairs, each pair's chosen then rejected side (a filler pair `~k`: both sides as fillers)."""
    return [s for k in pairs for s in ((2 * k, 2 * k + 1) if k >= 0 else (~(2 * ~k), ~(2 * ~k + 1)))]


class Fillable(torch.utils.data.Dataset):
    """The tokenized dataset, where a negative index `~i` is sample i with every label masked (a filler)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> dict[str, Any]:
        if key >= 0:
            return self.dataset[key]
        row = self.dataset[~key]
        return {"input_ids": row["input_ids"], "labels": [IGNORE_INDEX] * len(row["labels"])}


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
    eager and flex_attention paths detect packed rows and keep attention inside each sample. With `boundaries` the
    cumulative sequence lengths go along (`cu_seq_lens_*`, `max_length_*`): flash-attention reads them instead of
    rediscovering them with a device sync in every layer, and linear-attention layers (Gated DeltaNet) need them to
    restart their state and convolution at every sample. The first label of every sample is -100: it would be
    predicted from the previous sample's last token.
    """

    boundaries: bool = False

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        input_ids = torch.cat([torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features])
        labels = torch.cat([torch.as_tensor(f["labels"], dtype=torch.long) for f in features])
        position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths])
        starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
        labels[starts] = IGNORE_INDEX
        batch = {"input_ids": input_ids[None], "labels": labels[None], "position_ids": position_ids[None]}
        if self.boundaries:
            cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
        return batch


def sample_lengths(dataset: Any) -> list[int]:
    """Token count of every sample of a tokenized `datasets.Dataset`, read from the Arrow column (no Python rows)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.data.column("input_ids")).to_pylist()
