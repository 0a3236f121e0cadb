"""`ChatTrainer`: the stock Trainer with the run's planned steps, our own loss normalization and a token-weighted eval.

The loss of an optimizer step is the mean cross-entropy over the trained tokens of the whole global batch (every
micro-batch of the accumulation window, on every rank). The trainer counts those tokens itself (`labels[..., 1:] !=
-100`, summed over the window and all ranks), whatever transformers believes about the model's loss kwargs, so the
result is the same packed or padded, for any accumulation and any number of ranks, and for remote-code models and
classes with `accepts_loss_kwargs = False` too.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import torch

from chattune.cli import log
from chattune.errors import ConfigError, UserError
from chattune.train import checkpoints
from chattune.train.batches import (
    Fillable,
    PackingCollator,
    PaddingCollator,
    StepSampler,
    pack_bins,
    pair_lengths,
    pair_samples,
    sample_lengths,
)
from chattune.train.callbacks import DivergenceCallback
from chattune.train.hf import HfTrainer
from chattune.train.loss import (
    LogitTransform,
    base_model,
    fused_loss_sum,
    logits_loss_sum,
    trained_token_count,
)

PROBE_TOKENS = 128  # positions of the first micro-batch used to check the fused loss against the model's own


@dataclass
class LossSetup:
    kind: str  # liger | chunked | none
    requested: str  # what --fused_ce asked for (auto may fall back to none)
    transform: LogitTransform = LogitTransform()
    router_aux: float | None = None  # MoE: weight of the routers' load-balancing loss (0: off, loads still counted)


class LossMismatch(ConfigError):
    """The fused loss differs from the model's own loss on real inputs."""


class Diverged(UserError):
    """The training loss became nan or inf (DivergenceCallback stopped the run before saving that step)."""

    def __init__(self, step: int, output_dir: str) -> None:
        last = checkpoints.committed(output_dir)
        where = (f"the last checkpoint before it is {last[-1][1]} (step {last[-1][0]})" if last
                 else "no checkpoint was saved before it")
        super().__init__(
            f"the training loss became nan or inf at step {step}: that step's update left the weights not numbers, so "
            f"the run stopped there and saved nothing of it ({where}). Usual causes: a learning rate too high for this "
            "model (--learning_rate), fp16 overflow (--bf16 True on Ampere or newer), or a base model whose weights "
            "are already not finite (its own logits on any input show it)")


class SaveError(UserError):
    """A checkpoint or the result could not be written (full disk, no permission)."""




class ChatTrainer(HfTrainer):
    """`transformers.Trainer` with the run's optimizer steps (chattune.train.batches), a fused (or the model's own) loss
    normalized by our own count of the global batch's trained tokens, and an evaluation that is a token-weighted mean
    over the whole eval set.

    Everything else (optimizer, schedule, DeepSpeed, checkpoints, logging, callbacks) is the stock Trainer; the
    private hooks it overrides are in chattune.train.hf.
    """

    pairs = False  # the data is preference pairs (PreferenceTrainer): two samples in a row make one unit

    def __init__(self, *args, loss: LossSetup, steps: StepSampler | None = None, boundaries: bool = False,
                 stop_on_save_error: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_on_save_error = stop_on_save_error
        self.base_fingerprint: str | None = None  # the base's weight identity, recorded in chattune.json
        self.staging_dir: str | None = None
        self.loss = loss
        self.steps = steps
        self.boundaries = boundaries
        self.loss_checked = loss.kind == "none"
        self._hidden: list[torch.Tensor] = []
        self.expert_load: torch.Tensor | None = None  # MoE: tokens routed to each expert, per layer, on this rank
        self.nonfinite: torch.Tensor | None = None  # a nan/inf micro-batch loss in the current optimizer step
        self.divergence = DivergenceCallback(self)
        self.add_callback(self.divergence)

    # ---- data ------------------------------------------------------------------------------------------------

    def get_train_dataloader(self):
        """This rank's micro-batches of the planned steps. Not handed to accelerate: the sampler already gives each
        rank its own share of every step (accelerate would split it again); the Trainer moves batches to the device.
        Without planned steps (a trainer built for evaluation only), the stock loader."""
        if self.steps is None:
            return super().get_train_dataloader()
        collate = PackingCollator(self.boundaries) if self.steps.shape.packed else self.data_collator
        return torch.utils.data.DataLoader(
            Fillable(self.train_dataset), batch_sampler=self.steps, collate_fn=collate,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        )

    def count_trained_tokens(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Trained tokens of the global batch: this accumulation window's micro-batches, summed over all ranks."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        count = sum(trained_token_count(b["labels"]).to(device) for b in batch_samples)
        if self.args.world_size > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return count

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # kept on the device and read once per optimizer step (callbacks.DivergenceCallback): no sync per micro-batch
        bad = ~torch.isfinite(loss.detach())
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad
        return loss

    def take_nonfinite(self) -> torch.Tensor | None:
        """Whether a micro-batch's loss was nan or inf since the last call (a device tensor), and reset."""
        flag, self.nonfinite = self.nonfinite, None
        return flag

    # ---- loss ------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        if not self.loss_checked:
            self.check_loss(model, inputs)
        if num_items_in_batch is None:  # outside the training loop: this micro-batch's own mean
            return self.loss_sum(model, inputs, labels) / trained_token_count(labels).clamp(min=1)
        routers = self.loss.router_aux is not None
        total, outputs = self.loss_sum(model, inputs, labels, routers=routers, with_outputs=True)
        # DDP and DeepSpeed average gradients over ranks; this rank's share of the global sum is worth `ranks` times
        # its loss, so the average is the global token mean.
        ranks = self.accelerator.num_processes
        loss = total / num_items_in_batch.to(total.device).clamp(min=1) * ranks
        if routers:
            # a filler micro-batch (every label masked, run so that all ranks step alike) trains nothing, and routes
            # nothing: a tensor, not a branch, so no device sync
            real = (trained_token_count(labels) > 0).to(loss.dtype)
            self.count_expert_load(outputs.router_logits, inputs.get("attention_mask"), real)
            if self.loss.router_aux:  # the micro-batch's load-balancing loss; averaged over the window and the ranks
                window = self.args.gradient_accumulation_steps
                loss = loss + self.loss.router_aux * outputs.aux_loss.to(loss.dtype) * real / window
        return loss

    def loss_sum(self, model, inputs: dict[str, Any], labels: torch.Tensor, routers: bool = False,
                 with_outputs: bool = False) -> Any:
        """Summed cross-entropy over the trained tokens of one micro-batch, through the configured path (with
        `with_outputs`, also the model's outputs: with `routers`, its router logits and load-balancing loss)."""
        extra = {"output_router_logits": True} if routers else {}
        if self.loss.kind == "none":
            outputs = model(**inputs, **extra)
            total = logits_loss_sum(outputs.logits, labels)
        else:
            outputs, hidden = self._forward_hidden(model, inputs, logits_to_keep=1, **extra)
            with self.accelerator.autocast():  # the output layer's matmuls in the forward's precision (bf16, not fp32)
                total = fused_loss_sum(self.loss.kind, self._output_layer(), hidden, labels, self.loss.transform)
        return (total, outputs) if with_outputs else total

    def count_expert_load(self, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None,
                          real: torch.Tensor | float = 1.0) -> None:
        """Add the tokens each expert of each MoE layer was routed (its top-k, as the model routes; padding not
        counted) to `expert_load`."""
        config = base_model(self.accelerator.unwrap_model(self.model)).config.get_text_config()
        k = getattr(config, "num_experts_per_tok", 1)
        with torch.no_grad():
            # each token's k choices weighted by its mask: the same for every layer
            weight = None if attention_mask is None else attention_mask.reshape(-1, 1).expand(-1, k).reshape(-1).float()
            counts = [torch.bincount(logits.topk(k, dim=-1).indices.reshape(-1), weights=weight,
                                     minlength=logits.shape[-1]).float() for logits in router_logits]
            load = torch.stack(counts) * real
        self.expert_load = load if self.expert_load is None else self.expert_load + load

    def expert_load_report(self) -> dict[str, Any] | None:
        """Tokens routed per expert over this process's training, summed over ranks: per MoE layer, with the least and
        most loaded expert. Every rank must call it (a collective)."""
        if self.loss.router_aux is None or self.expert_load is None:
            return None
        load = self.expert_load
        if self.args.world_size > 1:
            load = self.accelerator.reduce(load, reduction="sum")
        rows = load.round().long().tolist()
        return {"tokens_per_expert": rows, "min": min(min(r) for r in rows), "max": max(max(r) for r in rows),
                "per_layer_min_max": [[min(r), max(r)] for r in rows]}

    def _output_layer(self) -> torch.nn.Module:
        return base_model(self.accelerator.unwrap_model(self.model)).get_output_embeddings()

    def _forward_hidden(self, model, inputs: dict[str, Any], **kwargs) -> tuple[Any, torch.Tensor]:
        """Run the wrapped model (DDP/DeepSpeed forward semantics intact): its outputs and the decoder's last hidden
        state."""
        decoder = base_model(self.accelerator.unwrap_model(self.model)).get_decoder()
        handle = decoder.register_forward_hook(self._keep_hidden)
        try:
            outputs = model(**inputs, **kwargs)
        finally:
            handle.remove()
        return outputs, self._hidden.pop()

    def _keep_hidden(self, module, args, output):
        self._hidden.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    def check_loss(self, model, inputs: dict[str, Any]) -> None:
        """On the first micro-batch: the fused loss must equal the model's own loss (its forward with labels) on the
        same positions of the same forward. A model family whose logit transform we do not apply fails here instead
        of training the wrong objective for the whole run."""
        self.loss_checked = True
        ids = inputs["input_ids"][:1, :PROBE_TOKENS]
        cuda = [ids.device] if ids.device.type == "cuda" else []
        # fork_rng: the check's dropout draws must not shift the run's random stream (a resumed run checks again)
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            outputs, hidden = self._forward_hidden(model, {"input_ids": ids}, labels=ids, logits_to_keep=0)
            own = outputs.loss.float()
            with self.accelerator.autocast():
                fused = fused_loss_sum(self.loss.kind, self._output_layer(), hidden, ids, self.loss.transform)
            fused = fused.float() / max(1, ids.shape[1] - 1)
        exact = hidden.dtype == torch.float32 and not torch.is_autocast_enabled(hidden.device.type)
        tolerance = 1e-4 if exact else 2e-2
        bad = torch.tensor(float(abs(fused - own) > tolerance * max(1.0, abs(own.item()))), device=hidden.device)
        if self.args.world_size > 1:  # every rank must take the same path
            bad = self.accelerator.reduce(bad, reduction="sum")
        if not bad.item():
            return
        message = (f"the fused loss ({self.loss.kind}, logit transform {self.loss.transform.describe()}) gives "
                   f"{fused.item():.5f} where the model's own loss is {own.item():.5f} on the first micro-batch: this "
                   "model's forward changes its logits in a way chattune does not reproduce")
        if self.loss.requested != "auto":
            raise LossMismatch(f"{message}. Use --fused_ce none (the model's own logits).")
        log(f"WARNING: {message}; using the model's own logits instead (--fused_ce none).")
        self.loss.kind = "none"

    # ---- evaluation ------------------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Mean cross-entropy over every trained token of the eval set (summed over batches and ranks, then divided
        once), through the training loss path, so it depends neither on the eval batch size nor on packing. What a
        batch adds (`eval_sums`) and the metrics of the sums (`eval_metrics`) belong to the loss (PreferenceTrainer:
        pairs)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ConfigError("evaluation needs --eval_data_path or --val_size")
        start = time.time()
        model = self.model_wrapped if self.is_deepspeed_enabled else self.model
        was_training = model.training
        model.eval()
        totals = None
        with torch.no_grad():
            for batch, real in self._eval_batches(dataset):
                batch = self.prepare_inputs(batch)
                labels = batch.pop("labels")
                with self.compute_loss_context_manager():
                    sums = self.eval_sums(model, batch, labels)
                sums = sums if real else torch.zeros_like(sums)
                totals = sums if totals is None else totals + sums
        model.train(was_training)
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        metrics = {**self.eval_metrics(totals, metric_key_prefix),
                   f"{metric_key_prefix}_runtime": round(time.time() - start, 4)}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def eval_sums(self, model, batch: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        """[summed cross-entropy, trained tokens] of one eval batch (float64: exact counts, no rounding of sums)."""
        loss_sum = self.loss_sum(model, batch, labels)
        return torch.stack([loss_sum.double(), trained_token_count(labels).double()])

    def eval_metrics(self, totals: torch.Tensor, prefix: str) -> dict[str, float]:
        tokens = int(totals[1].item())
        return {f"{prefix}_loss": totals[0].item() / tokens if tokens else float("nan"), f"{prefix}_tokens": tokens}

    def _eval_batches(self, dataset):
        """This rank's eval batches, each with whether it counts. Every rank runs the same number of forwards (ZeRO-3
        gathers weights collectively), so short ranks repeat a batch that is not counted. Of preference data
        (`pairs`) the batches hold whole pairs, each pair's two samples in a row."""
        lengths = sample_lengths(dataset)
        lengths = pair_lengths(lengths).tolist() if self.pairs else lengths
        if self.steps is not None and self.steps.shape.packed:  # packed rows of the training budget (a longer eval sample gets a row of its own)
            groups = pack_bins(lengths, max(self.steps.shape.budget, max(lengths, default=1)))
            collate = PackingCollator(self.boundaries)
        else:
            order = sorted(range(len(lengths)), key=lambda i: lengths[i])
            size = self.args.per_device_eval_batch_size
            groups = [order[i:i + size] for i in range(0, len(order), size)]
            collate = self.data_collator
        ranks, rank = self.args.world_size, self.args.process_index
        per_rank = math.ceil(len(groups) / ranks) if groups else 0
        mine = groups[rank::ranks]
        samples = pair_samples if self.pairs else list
        for group in mine:
            yield collate([dataset[i] for i in samples(group)]), True
        for _ in range(per_rank - len(mine)):
            yield collate([dataset[i] for i in samples(groups[0])]), False

    # ---- checkpoints: staged, then committed in one rename ------------------------------------------------------

    def save_checkpoint_atomically(self, save) -> None:
        """The stock checkpoint (`save`) (every rank's files), written under output_dir/.chattune-staging, then committed as
        checkpoint-N by one rename once every rank has finished; rotation only after that. A full disk (or a lost
        permission) removes the partial files, says so, and training goes on (the next save tries again), unless
        --stop_on_save_error."""
        output_dir = self.args.output_dir
        name = f"checkpoint-{self.state.global_step}"
        staging, final = os.path.join(output_dir, checkpoints.STAGING), os.path.join(output_dir, name)
        error: OSError | None = None
        self.staging_dir = staging
        try:
            save()
        except Exception as e:
            error = checkpoints.write_failure(e, staging)
            if error is None:
                raise
        finally:
            self.staging_dir = None
        if not self.on_every_rank(error is None):
            self._save_failed(error, staging, name)
            return
        self._commit(os.path.join(staging, name), final)
        if self.args.should_save:
            checkpoints.rotate(output_dir, self.args.save_total_limit, {final, self.state.best_model_checkpoint})

    def _commit(self, staged: str, final: str) -> None:
        staging = os.path.dirname(staged)
        best = self.state.best_model_checkpoint
        if best and os.path.dirname(best) == staging:  # the stock code named the best checkpoint in staging
            self.state.best_model_checkpoint = os.path.join(self.args.output_dir, os.path.basename(best))
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
        self.accelerator.wait_for_everyone()  # every rank's files are written
        if self.args.should_save:
            checkpoints.commit(staged, final)
        self.accelerator.wait_for_everyone()
        if self.is_local_process_zero():
            if os.path.isdir(staged):  # an output_dir local to each node
                checkpoints.commit(staged, final)
            try:
                os.rmdir(staging)
            except OSError:  # not empty, or removed by another node's process on a shared filesystem
                pass

    def on_every_rank(self, ok: bool) -> bool:
        """Whether `ok` holds on every rank (all ranks must call it together)."""
        if self.args.world_size <= 1:
            return ok
        flag = torch.tensor([1 if ok else 0], device=self.args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _save_failed(self, error: OSError | None, staging: str, name: str) -> None:
        output_dir = self.args.output_dir
        written = checkpoints.dir_bytes(staging)
        if self.is_local_process_zero():
            shutil.rmtree(staging, ignore_errors=True)
        previous = checkpoints.committed(output_dir)
        needed = (f"~{checkpoints.size_text(checkpoints.dir_bytes(previous[-1][1]))} needed" if previous
                  else f"more than the {checkpoints.size_text(written)} written before it failed")
        cause = f"{error.strerror or error}" if error is not None else "it failed on another process"
        message = (f"{name} could not be saved in {output_dir}: {cause} ({needed}, "
                   f"{checkpoints.size_text(checkpoints.free_bytes(output_dir))} free); the partial files were removed")
        if self.stop_on_save_error:
            raise SaveError(f"{message}. Free space or choose another --output_dir, then run the same command "
                            "again to resume from the last checkpoint.")
        if self.is_world_process_zero():
            log(f"error: {message}. Training goes on and the next save tries again (--stop_on_save_error true "
                "stops instead).")


def padding_collator(tokenizer: Any) -> PaddingCollator:
    return PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)
