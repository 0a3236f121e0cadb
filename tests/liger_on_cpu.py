"""Run by test_liger_cpu.py in a fresh process with TRITON_INTERPRET=1: Liger's fused linear+CE through ChatTrainer on
CPU against the chunked path and the model's own loss (its forward with labels), loss and every gradient.

    TRITON_INTERPRET=1 python tests/liger_on_cpu.py qwen2|gemma2

Prints one line `RESULT {json}`. A tiny vocabulary (4096) keeps the interpreted kernel to seconds.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import transformers as tf  # noqa: E402

FAMILY = sys.argv[1]
if FAMILY == "gemma2":
    import triton_interpreter_shim  # noqa: F401,E402  (soft-capping passes a float to the kernel)

from chattune.train.batches import PackingCollator
from chattune.train.loss import logit_transform, trained_token_count
from chattune.train.trainer import ChatTrainer, LossSetup

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=4096, initializer_range=0.2, use_cache=False)


def build_model():
    torch.manual_seed(0)
    if FAMILY == "gemma2":
        config = tf.Gemma2Config(**SMALL, head_dim=16, final_logit_softcapping=3.0, attn_implementation="eager")
        return tf.Gemma2ForCausalLM(config)
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL, attn_implementation="sdpa"))


def batch(seed=0, lengths=(30, 45, 21)):
    g = torch.Generator().manual_seed(seed)
    parts = []
    for n in lengths:
        ids = torch.randint(10, 4000, (n,), generator=g).tolist()
        parts.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return PackingCollator()(parts)


def trainer_for(model, kind, out):
    args = tf.TrainingArguments(output_dir=out, use_cpu=True, report_to="none", remove_unused_columns=False,
                                label_names=["labels"], per_device_train_batch_size=1, save_strategy="no",
                                logging_steps=1, learning_rate=1e-2, max_steps=2, lr_scheduler_type="constant",
                                disable_tqdm=True)
    return ChatTrainer(model=model, args=args, loss=LossSetup(kind, kind, logit_transform(model.config)))


def loss_and_grads(kind, inputs, out):
    model = build_model()
    trainer = trainer_for(model, kind, out)
    inputs = {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
    count = trained_token_count(inputs["labels"])
    if kind == "own":  # the model's own loss: its forward with labels (mean over the trained tokens)
        loss = model(**inputs).loss
    else:
        trainer.loss_checked = False  # run the first-micro-batch check against the model's own loss too
        loss = trainer.compute_loss(model, inputs, num_items_in_batch=count)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def max_relative(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).norm() / b[n].norm().clamp(min=1e-12)).item() for n in b)


def empty_micro_batch(out):
    """No trained token: a zero loss connected to the output layer, finite (zero) gradients, no division by zero."""
    model = build_model()
    trainer = trainer_for(model, "liger", out)
    inputs = batch(seed=1)
    inputs["labels"][:] = -100
    loss = trainer.compute_loss(model, inputs, num_items_in_batch=torch.tensor(5))
    loss.backward()
    head = model.get_output_embeddings().weight.grad
    return {"loss": loss.item(), "head_grad_zero": head is not None and bool((head == 0).all())}


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        inputs = batch()
        own, own_grads = loss_and_grads("own", inputs, out)
        results = {"own": own}
        for kind in ("chunked", "liger"):
            loss, grads = loss_and_grads(kind, inputs, out)
            results[kind] = loss
            results[f"{kind}_grad_error"] = max_relative(grads, own_grads)
        results["empty"] = empty_micro_batch(out)
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
