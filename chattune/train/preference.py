"""Preference losses (DPO, IPO, SimPO, ORPO) from sequence log-probabilities, computed without whole-batch logits.

A micro-batch holds whole pairs, each as two sequences in a row: chosen, rejected (chattune.train.batches
`pair_samples`), padded (one sequence per row) or packed (sequences one after the other in one row, each starting at
position 0). A sequence's log-probability is the sum over its trained tokens, the final answer through its
end-of-turn token, exactly the tokens supervised training trains (chattune.data.encode); its token count goes along,
for the length-normalized losses. With `chunked` the output layer runs over chunks of trained positions, each chunk
recomputed in backward, so at most one chunk of logits is alive (as chattune.train.loss does for cross-entropy).

Per pair, with policy log-probs p_c, p_r, reference log-probs q_c, q_r, token counts n_c, n_r and mean token
log-probs a = p / n:

* `sigmoid` (DPO): -log sigmoid(beta ((p_c - q_c) - (p_r - q_r)))
* `ipo`: ((a_c - a'_c) - (a_r - a'_r) - 1 / (2 beta))^2, on mean token log-probs (a' of the reference), as TRL
  computes it on the IPO authors' advice
* `simpo` (reference-free): -log sigmoid(beta (a_c - a_r) - gamma)
* `orpo` (reference-free): -a_c + alpha (-log sigmoid(log odds(a_c) - log odds(a_r))), odds(a) = e^a / (1 - e^a)

plus `sft_weight x (-a_c)` where asked. A run's loss is the mean over the pairs of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from chattune.data.encode import IGNORE_INDEX
from chattune.train.loss import LogitTransform, chunk_tokens

PAIR_LOSSES = ("sigmoid", "ipo", "simpo", "orpo")
DEFAULT_BETA = {"sigmoid": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 1.0}  # orpo: rewards are the mean log-probs
_NAMES = {"sigmoid": "DPO (sigmoid)", "ipo": "IPO", "simpo": "SimPO", "orpo": "ORPO"}


@dataclass(frozen=True)
class PrefLoss:
    """The preference objective of a run (--pref_loss and its numbers)."""

    kind: str = "sigmoid"
    beta: float = 0.1
    gamma: float = 1.0  # SimPO's target margin
    alpha: float = 0.1  # ORPO's odds-ratio weight
    sft_weight: float = 0.0  # weight of the chosen answer's mean token NLL

    @classmethod
    def from_args(cls, training_args: Any) -> PrefLoss:
        kind = training_args.pref_loss
        beta = DEFAULT_BETA[kind] if training_args.pref_beta is None else float(training_args.pref_beta)
        return cls(kind, beta, float(training_args.simpo_gamma), float(training_args.orpo_alpha),
                   float(training_args.pref_sft_weight))

    @property
    def reference_free(self) -> bool:
        """SimPO and ORPO compare the policy's own log-probs: no reference model, no second forward."""
        return self.kind in ("simpo", "orpo")

    def describe(self) -> str:
        numbers = {"sigmoid": f"beta {self.beta:g}", "ipo": f"beta {self.beta:g}",
                   "simpo": f"beta {self.beta:g}, gamma {self.gamma:g}", "orpo": f"alpha {self.alpha:g}"}[self.kind]
        sft = f", + {self.sft_weight:g} x chosen NLL" if self.sft_weight else ""
        return f"{_NAMES[self.kind]}, {numbers}{sft}"


# --------------------------------------------------------------------------------------------------------------
# Sequence log-probabilities
# --------------------------------------------------------------------------------------------------------------


def sequence_index(labels: torch.Tensor, position_ids: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """The sequence number of every position ([rows, length]) and the number of sequences: a padded micro-batch has
    one per row; a packed one (one row, no padding) starts a new one wherever position_ids restart at 0."""
    rows, length = labels.shape
    if rows == 1 and position_ids is not None:
        starts = (position_ids[0] == 0).long()
        index = starts.cumsum(0) - 1
        return index[None], int(starts.sum().item())
    return torch.arange(rows, device=labels.device)[:, None].expand(rows, length), rows


def _shifted(values: torch.Tensor, labels: torch.Tensor, index: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions that predict a trained token: their hidden states (or logits), the tokens, and their sequences
    (selected from the shifted views without copying them whole: loss.shifted_targets)."""
    y = labels[:, 1:]
    keep = y != IGNORE_INDEX
    return values[:, :-1][keep], y[keep], index[:, 1:][keep]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Logits in float32 at least (bf16 log-softmax loses the small differences preference losses are made of)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunk_logps(lm_head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, transform: LogitTransform
                 ) -> torch.Tensor:
    return -F.cross_entropy(transform.apply(_wide(lm_head(h))), y, reduction="none")


def token_logps_from_hidden(lm_head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, vocab_size: int,
                            transform: LogitTransform = LogitTransform()) -> torch.Tensor:
    """log p(y) at every trained position, the output layer run over chunks recomputed in backward."""
    step = chunk_tokens(vocab_size)
    parts = [checkpoint(_chunk_logps, lm_head, h[start:start + step], y[start:start + step], transform,
                        use_reentrant=False) for start in range(0, h.shape[0], step)]
    return torch.cat(parts) if parts else _wide(h.new_zeros(0))


def sequence_logps(per_token: torch.Tensor, sequence: torch.Tensor, sequences: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs, trained token count) of every sequence."""
    sums = torch.zeros(sequences, dtype=per_token.dtype, device=per_token.device).index_add(0, sequence, per_token)
    counts = torch.bincount(sequence, minlength=sequences)
    return sums, counts


def logps_from_hidden(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                      sequences: int, vocab_size: int, transform: LogitTransform = LogitTransform()
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    h, y, sequence = _shifted(hidden, labels, index)
    per_token = token_logps_from_hidden(lm_head, h, y, vocab_size, transform)
    if per_token.numel() == 0:  # a filler: still connected to the output layer, so every rank's backward matches
        per_token = _wide(lm_head(hidden.reshape(-1, hidden.shape[-1])[:1])).sum()[None] * 0
        sequence = torch.zeros(1, dtype=torch.long, device=hidden.device)
    return sequence_logps(per_token, sequence, sequences)


def logps_from_logits(logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, sequences: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    scores, y, sequence = _shifted(logits, labels, index)
    per_token = -F.cross_entropy(_wide(scores), y, reduction="none")
    if per_token.numel() == 0:
        per_token, sequence = _wide(logits).sum()[None] * 0, torch.zeros(1, dtype=torch.long, device=logits.device)
    return sequence_logps(per_token, sequence, sequences)


# --------------------------------------------------------------------------------------------------------------
# The losses
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PairResult:
    """Per pair of a micro-batch: its loss and what the logs report."""

    loss: torch.Tensor
    real: torch.Tensor  # 1 for a pair with trained tokens on both sides, 0 for a filler
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor
    chosen_logps: torch.Tensor  # mean token log-prob of the chosen answer
    rejected_logps: torch.Tensor


def _log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of a mean token probability p = e^a (a < 0 kept off 0, where the odds are infinite)."""
    a = mean_logp.clamp(max=-1e-6)
    return a - torch.log(-torch.expm1(a))


def pair_losses(objective: PrefLoss, policy: tuple[torch.Tensor, torch.Tensor],
                reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> PairResult:
    """The loss of every pair from (log-prob sums, token counts) of its sequences: chosen at even, rejected at odd
    positions. `reference`: the reference model's sums and counts (None for the reference-free losses)."""
    sums, counts = policy
    chosen, rejected = sums[0::2], sums[1::2]
    n_c, n_r = counts[0::2], counts[1::2]
    real = ((n_c > 0) & (n_r > 0)).to(sums.dtype)
    mean_c, mean_r = chosen / n_c.clamp(min=1), rejected / n_r.clamp(min=1)
    beta = objective.beta
    if objective.kind in ("sigmoid", "ipo"):
        if reference is None:
            raise ValueError(f"--pref_loss {objective.kind} needs the reference model's log-probs")
        ref = reference[0].detach()
        if objective.kind == "sigmoid":
            reward_c, reward_r = beta * (chosen - ref[0::2]), beta * (rejected - ref[1::2])
            loss = -F.logsigmoid(reward_c - reward_r)
        else:
            h_c, h_r = mean_c - ref[0::2] / n_c.clamp(min=1), mean_r - ref[1::2] / n_r.clamp(min=1)
            reward_c, reward_r = beta * h_c, beta * h_r
            loss = (h_c - h_r - 1 / (2 * beta)) ** 2
    elif objective.kind == "simpo":
        reward_c, reward_r = beta * mean_c, beta * mean_r
        loss = -F.logsigmoid(reward_c - reward_r - objective.gamma)
    elif objective.kind == "orpo":
        reward_c, reward_r = mean_c, mean_r
        loss = -mean_c - objective.alpha * F.logsigmoid(_log_odds(mean_c) - _log_odds(mean_r))
    else:
        raise ValueError(f"unknown preference loss {objective.kind!r}; choose one of {', '.join(PAIR_LOSSES)}")
    if objective.sft_weight:
        loss = loss - objective.sft_weight * mean_c
    return PairResult(loss * real, real, reward_c.detach(), reward_r.detach(), mean_c.detach(), mean_r.detach())


def pair_count(labels: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """Pairs of a micro-batch with trained tokens on both sides (the fillers' pairs have none): what the step's loss
    is the mean over."""
    index, sequences = sequence_index(labels, position_ids)
    trained = labels[:, 1:] != IGNORE_INDEX
    counts = torch.bincount(index[:, 1:][trained], minlength=sequences)
    return ((counts[0::2] > 0) & (counts[1::2] > 0)).sum()
