"""`PreferenceTrainer`: ChatTrainer with a preference loss (chattune.train.preference) over whole pairs.

Everything that makes supervised runs exact carries over: the planned steps (pairs instead of samples), packed or
padded micro-batches that change no number, the step's loss as a mean over the global batch (its real pairs,
counted by the trainer over the accumulation window and every rank), staged checkpoints, signals and resume.

The reference log-probs of a LoRA run come from the same model with the adapter disabled (no second copy of the
weights); a full fine-tuning run keeps a frozen copy of the base (`ref_model`); SimPO and ORPO need none. Rewards,
margins and reward accuracy are logged with the loss and reported for the held-out pairs.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from chattune.errors import ConfigError
from chattune.train.loss import _out_features, base_model
from chattune.train.preference import (
    PairResult,
    PrefLoss,
    logps_from_hidden,
    logps_from_logits,
    pair_count,
    pair_losses,
    sequence_index,
)
from chattune.train.trainer import ChatTrainer

# What the logs and the report hold per pair: summed over the logging window (and the ranks), then averaged.
STATS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
         "logps/rejected")


def pair_stats(result: PairResult) -> torch.Tensor:
    """[pairs, then the sum of every STATS entry] over a micro-batch's real pairs."""
    real, margin = result.real, result.chosen_reward - result.rejected_reward
    values = [result.chosen_reward, result.rejected_reward, margin, (margin > 0).to(margin.dtype),
              result.chosen_logps, result.rejected_logps]
    return torch.stack([real.sum(), *((v * real).sum() for v in values)]).detach().double()


def stats_means(totals: torch.Tensor, prefix: str = "") -> dict[str, float]:
    pairs = float(totals[0])
    return {f"{prefix}{name}": (float(v) / pairs if pairs else float("nan")) for name, v in zip(STATS, totals[1:])}


class PreferenceTrainer(ChatTrainer):
    pairs = True

    def __init__(self, *args, objective: PrefLoss, ref_model: Any = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.ref_model = ref_model
        self.window_stats: torch.Tensor | None = None

    # ---- the pairs a step's loss is the mean over --------------------------------------------------------------

    def count_trained_tokens(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Real pairs of the global batch (this accumulation window's micro-batches, summed over all ranks)."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        count = sum(pair_count(b["labels"], b.get("position_ids")).to(device) for b in batch_samples)
        if self.args.world_size > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return count

    # ---- loss ------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        if not self.loss_checked:
            self.check_loss(model, inputs)
        result = self.pair_result(model, inputs, labels)
        total = result.loss.sum()
        if num_items_in_batch is None:  # outside the training loop: this micro-batch's own mean
            loss = total / result.real.sum().clamp(min=1)
        else:
            stats = pair_stats(result)
            self.window_stats = stats if self.window_stats is None else self.window_stats + stats
            # DDP and DeepSpeed average gradients over ranks: this rank's share of the global sum is worth `ranks`
            loss = total / num_items_in_batch.to(total.device).clamp(min=1) * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def pair_result(self, model, inputs: dict[str, Any], labels: torch.Tensor) -> PairResult:
        index, sequences = sequence_index(labels, inputs.get("position_ids"))
        policy = self.sequence_logps(model, inputs, labels, index, sequences)
        reference = None
        if not self.objective.reference_free:
            with torch.no_grad(), self.reference_context():
                frozen = self.reference_model()
                reference = self.sequence_logps(frozen or model, inputs, labels, index, sequences,
                                                owner=getattr(frozen, "module", frozen))
        return pair_losses(self.objective, policy, reference)

    def reference_model(self) -> Any:
        """The frozen reference copy, ready to run: under ZeRO-3 wrapped (once, on first use, when every rank gets
        here together) in an inference-only DeepSpeed engine, which gathers its partitioned weights layer by layer
        as the policy's engine does; elsewhere the plain module, on this rank's device."""
        if self.ref_model is None or not self.is_deepspeed_enabled or hasattr(self.ref_model, "module"):
            return self.ref_model
        if not any(hasattr(p, "ds_id") for p in self.ref_model.parameters()):
            return self.ref_model  # ZeRO-2: a whole copy
        import copy

        import deepspeed

        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        hidden = base_model(self.ref_model).config.get_text_config().hidden_size
        zero = config.setdefault("zero_optimization", {})
        # what the Trainer fills in for the policy's engine ("auto"), sized as it does from the hidden size
        for key, value in (("reduce_bucket_size", hidden * hidden), ("stage3_prefetch_bucket_size", 0.9 * hidden * hidden),
                           ("stage3_param_persistence_threshold", 10 * hidden)):
            if zero.get(key) == "auto":
                zero[key] = int(value)
        config = {k: v for k, v in config.items() if v != "auto"}
        self.ref_model, *_ = deepspeed.initialize(model=self.ref_model, config=config)
        self.ref_model.eval()
        return self.ref_model

    def reference_context(self):
        """The reference model: the frozen copy where there is one, else the policy with its adapter disabled."""
        if self.ref_model is not None:
            return contextlib.nullcontext()
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not hasattr(unwrapped, "disable_adapter"):
            raise ConfigError("--stage dpo without an adapter needs a reference model (full fine-tuning keeps one)")
        return unwrapped.disable_adapter()

    def sequence_logps(self, model, inputs: dict[str, Any], labels: torch.Tensor, index: torch.Tensor,
                       sequences: int, owner: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-prob sum, token count) of every sequence, through the run's loss path (chunked output layer from the
        hidden states, or the model's own logits). `owner`: the module whose decoder and output layer run (the
        reference copy), else the trained model's."""
        if self.loss.kind == "none":
            return logps_from_logits(model(**inputs).logits, labels, index, sequences)
        module = base_model(owner if owner is not None else self.accelerator.unwrap_model(self.model))
        hidden: list[torch.Tensor] = []
        handle = module.get_decoder().register_forward_hook(
            lambda _m, _a, out: hidden.append(out[0] if isinstance(out, tuple) else out.last_hidden_state))
        try:
            model(**inputs, logits_to_keep=1)
        finally:
            handle.remove()
        head = module.get_output_embeddings()
        # (a frozen ZeRO-3 reference: calling its output layer gathers it; no backward recomputes the chunks)
        with self.accelerator.autocast():
            return logps_from_hidden(head, hidden[-1], labels, index, sequences, _out_features(head),
                                     self.loss.transform)

    # ---- logs ------------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs carry the window's mean rewards, margins and accuracy (every rank calls log together)."""
        if "loss" in logs and not any(k.startswith("eval_") for k in logs) and self.window_stats is not None:
            totals = self.window_stats
            if self.args.world_size > 1:
                totals = self.accelerator.reduce(totals.to(self.args.device), reduction="sum")
            logs = {**logs, **{k: round(v, 6) for k, v in stats_means(totals).items()}}
            self.window_stats = None
        super().log(logs, start_time)

    # ---- evaluation (ChatTrainer.evaluate over whole pairs) ----------------------------------------------------

    def eval_sums(self, model, batch: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        """[summed pair loss, real pairs, then the sum of every STATS entry] of one eval batch."""
        result = self.pair_result(model, batch, labels)
        return torch.cat([result.loss.sum().double()[None], pair_stats(result).to(result.loss.device)])

    def eval_metrics(self, totals: torch.Tensor, prefix: str) -> dict[str, float]:
        """The mean pair loss, rewards, margins and reward accuracy over every held-out pair."""
        pairs = int(totals[1].item())
        return {f"{prefix}_loss": totals[0].item() / pairs if pairs else float("nan"), f"{prefix}_pairs": pairs,
                **stats_means(totals[1:], f"{prefix}_")}


def turn_off_dropout(model: torch.nn.Module) -> int:
    """Set every dropout module's rate to 0: the chosen and rejected log-probs (and the policy's against the
    reference's) must come from the same function, or identical answers would score differently. Returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p:
            module.p = 0.0
            count += 1
    return count
