"""Optimizer steps hold exactly the samples the user asked for; micro-batches are cut from them (chattune.train.batches)."""

import numpy as np
import pytest

from chattune.train.batches import (
    StepSampler,
    StepShape,
    epoch_steps,
    micro_batches_per_step,
)

LENGTHS = np.array([(i * 37) % 90 + 10 for i in range(53)])


def shape(per_step=8, budget=0, processes=1, per_device=2, tokens=0, seed=3):
    return StepShape(per_step, tokens, per_device, budget, processes, seed)


def layout(s, epoch=0):
    k = micro_batches_per_step(LENGTHS, s, epochs=2)
    ranks = [StepSampler(LENGTHS, s, k, rank) for rank in range(s.processes)]
    for r in ranks:
        r.set_epoch(epoch)
    return k, ranks, ranks[0].step_layout(epoch)


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_packed_and_padded_steps_hold_the_same_samples(processes):
    padded, packed = shape(processes=processes), shape(budget=128, processes=processes)
    for epoch in (0, 1):
        steps = epoch_steps(LENGTHS, padded, epoch)
        assert [len(s) for s in steps] == [8] * 6 + [5]  # 53 samples, 8 per optimizer step, the last one the rest
        assert sorted(np.concatenate(steps).tolist()) == list(range(53))
        for s in (padded, packed):
            _, _, steps_laid = layout(s, epoch)
            for step, ranks in zip(steps, steps_laid, strict=True):
                got = sorted(i for slots in ranks for batch in slots for i in batch)
                assert got == sorted(step.tolist())  # the same samples, wherever and however they are cut


def test_every_rank_runs_the_same_number_of_micro_batches_within_the_budget():
    s = shape(per_step=12, budget=100, processes=2)
    k, ranks, steps = layout(s)
    assert all(len(r) == len(steps) * k for r in ranks)  # the Trainer's accumulation: k per rank and step
    for step in steps:
        assert all(len(slots) == k for slots in step)
        assert all(LENGTHS[b].sum() <= 100 for slots in step for b in slots if b)
    for r in ranks:
        batches = list(r)
        assert len(batches) == len(r) and all(batch for batch in batches)  # a filler is [~i], never empty


def test_a_step_with_fewer_samples_than_slots_gets_fillers():
    lengths = np.array([50, 40, 30])
    s = StepShape(3, 0, 1, 0, 2, 0)  # 3 samples per step over 2 ranks, one sample per micro-batch: 2 per rank
    k = micro_batches_per_step(lengths, s, 1)
    assert k == 2
    batches = [b for rank in range(2) for b in StepSampler(lengths, s, k, rank)]
    fillers = [b for b in batches if b[0] < 0]
    assert len(fillers) == 1 and fillers[0] == [~2]  # the shortest sample, every label masked by Fillable
    assert sorted(b[0] for b in batches if b[0] >= 0) == [0, 1, 2]


def test_steps_are_seeded_and_reshuffled_per_epoch():
    s = shape()
    assert [x.tolist() for x in epoch_steps(LENGTHS, s, 0)] == [x.tolist() for x in epoch_steps(LENGTHS, s, 0)]
    assert [x.tolist() for x in epoch_steps(LENGTHS, s, 0)] != [x.tolist() for x in epoch_steps(LENGTHS, s, 1)]


def test_steps_cut_by_tokens_hold_about_that_many_tokens():
    s = shape(per_step=0, tokens=600)
    steps = epoch_steps(LENGTHS, s, 0)
    assert len(steps) == round(LENGTHS.sum() / 600)
    assert all(abs(LENGTHS[st].sum() - 600) <= LENGTHS.max() for st in steps)
    assert len(epoch_steps(LENGTHS, s, 1)) == len(steps)  # the same number of steps every epoch
