"""Training: flags -> plan -> model -> loss -> trainer -> checkpoints -> result.

args + validate (the flags, checked before anything is read) -> plan (every decision of the run, made once) ->
attention, model, lora (the model as the plan says) -> batches, loss, trainer (the Trainer with our packing, loss
normalization and evaluation; hf holds every override of a private Trainer hook) -> checkpoints, callbacks
(atomic saves, preemption, the loss plot) -> run (the stages, top to bottom) -> report.
"""
