"""Published memory and speed measurements of LoRA / Q-LoRA / full fine-tuning, with the setups they state, to check
the planner (chattune.train.memory) against numbers nobody here made.

Qwen (QwenLM/Qwen README, "Profiling of Memory and Speed"): one A100-SXM4-80G per node, CUDA 11.8, PyTorch 2.0,
flash-attention 2, batch size 1, gradient accumulation 8, gradient checkpointing, Qwen's finetune.py (LoRA r=64 on
c_attn/c_proj/w1/w2: every decoder linear layer; samples padded to the sequence length; "LoRA (emb)" also trains the
embedding and output layer through modules_to_save; Q-LoRA on the Int4 GPTQ models; the multi-GPU rows run
DeepSpeed, ZeRO-2 for LoRA and ZeRO-3 for full fine-tuning and the 72B LoRA). Memory is given in G for the whole
job: a row on several GPUs is their sum (7B full on 2 GPUs: 139.2G); we compare per GPU. One cell lacks its unit
("51.2 /"), read as 51.2G. Speed is seconds per iteration of 8 sequences.

The Qwen-1 shapes are written out literally (Qwen-1 is remote code, not buildable offline): hidden size d, layers,
the config's intermediate_size (twice the MLP width: w1 and w2 are both d x ff/2) and the vocabulary. Parameter
counts match the published sizes (1.84B, 7.72B, 14.17B, 72.29B).
"""

from __future__ import annotations

from dataclasses import dataclass

from chattune.train.memory import ModelShape


def qwen1_shape(d: int, layers: int, intermediate_size: int, vocab: int) -> ModelShape:
    f = intermediate_size // 2  # Qwen-1's MLP: w1, w2 (d -> f) and c_proj (f -> d)
    return ModelShape(
        linear_params=layers * (4 * d * d + 3 * d * f),  # c_attn (d -> 3d), attn.c_proj (d -> d), w1, w2, mlp.c_proj
        embedding_params=2 * vocab * d,  # wte and lm_head, not tied
        other_params=layers * (3 * d + 2 * d) + d,  # c_attn bias, two RMSNorms per layer, the final norm
        hidden_size=d, intermediate_size=f, num_layers=layers, vocab_size=vocab,
        lora_params_per_rank=layers * ((d + 3 * d) + (d + d) + 2 * (d + f) + (f + d)),
    )


QWEN1 = {
    "Qwen-1.8B": qwen1_shape(2048, 24, 11008, 151936),
    "Qwen-7B": qwen1_shape(4096, 32, 22016, 151936),
    "Qwen-14B": qwen1_shape(5120, 40, 27392, 152064),
    "Qwen-72B": qwen1_shape(8192, 80, 49152, 152064),
}
QWEN1_SIZES = {"Qwen-1.8B": 1.84, "Qwen-7B": 7.72, "Qwen-14B": 14.17, "Qwen-72B": 72.29}  # billions, as published


@dataclass(frozen=True)
class Row:
    model: str
    method: str  # lora | lora_emb | qlora | full
    nodes: int
    gpus_per_node: int
    zero_stage: int
    tokens: int  # sequence length (batch size 1, padded to it)
    memory_gb: float  # for the whole job (all GPUs)
    seconds_per_iteration: float  # 8 sequences (gradient accumulation 8) per iteration, per GPU

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
_TABLE = [  # model, method, nodes, GPUs per node, ZeRO stage, "memory / s/it" per length
    ("Qwen-1.8B", "lora", 1, 1, 0, "6.7 1.0 | 7.4 1.0 | 8.4 1.1 | 11.0 1.7 | 16.2 3.3 | 21.8 6.8"),
    ("Qwen-1.8B", "lora_emb", 1, 1, 0, "13.7 1.0 | 14.0 1.0 | 14.0 1.1 | 15.1 1.8 | 19.7 3.4 | 27.7 7.0"),
    ("Qwen-1.8B", "qlora", 1, 1, 0, "5.8 1.4 | 6.0 1.4 | 6.6 1.4 | 7.8 2.0 | 10.2 3.4 | 15.8 6.5"),
    ("Qwen-1.8B", "full", 1, 1, 0, "43.5 2.1 | 43.5 2.2 | 43.5 2.2 | 43.5 2.3 | 47.1 2.8 | 48.3 5.6"),
    ("Qwen-7B", "lora", 1, 1, 0, "20.1 1.2 | 20.4 1.5 | 21.5 2.8 | 23.8 5.2 | 29.7 10.1 | 36.6 21.3"),
    ("Qwen-7B", "lora_emb", 1, 1, 0, "33.7 1.4 | 34.1 1.6 | 35.2 2.9 | 35.1 5.3 | 39.2 10.3 | 48.5 21.7"),
    ("Qwen-7B", "qlora", 1, 1, 0, "11.5 3.0 | 11.5 3.0 | 12.3 3.5 | 13.9 7.0 | 16.9 11.6 | 23.5 22.3"),
    ("Qwen-7B", "full", 1, 2, 3, "139.2 4.0 | 148.0 4.0 | 162.0 4.5"),
    ("Qwen-7B", "lora", 2, 2, 2, "74.7 2.09 | 77.6 3.16 | 84.9 5.17 | 95.1 9.25 | 121.1 18.1 | 155.5 37.4"),
    ("Qwen-14B", "lora", 1, 1, 0, "34.6 1.6 | 35.1 2.4 | 35.3 4.4 | 37.4 8.4 | 42.5 17.0 | 55.2 36.0"),
    ("Qwen-14B", "lora_emb", 1, 1, 0, "51.2 1.7 | 51.1 2.6 | 51.5 4.6 | 54.1 8.6 | 56.8 17.2 | 67.7 36.3"),
    ("Qwen-14B", "qlora", 1, 1, 0, "18.7 5.3 | 18.4 6.3 | 18.9 8.2 | 19.9 11.8 | 23.0 20.1 | 27.9 38.3"),
    ("Qwen-72B", "lora", 1, 4, 3, "215.4 17.6 | 217.7 20.5 | 222.6 29.4 | 228.8 45.7 | 249.0 83.4 | 289.2 161.5"),
    ("Qwen-72B", "qlora", 1, 1, 0, "61.4 27.4 | 61.4 31.5 | 62.9 41.4 | 64.1 59.5 | 68.0 97.7 | 75.6 179.8"),
]
QWEN_PROFILE = [
    Row(model, method, nodes, per_node, zero, tokens, float(cell.split()[0]), float(cell.split()[1]))
    for model, method, nodes, per_node, zero, cells in _TABLE
    for tokens, cell in zip(LENGTHS, cells.split(" | "), strict=False)
]
QWEN_PROFILE_GPU = "A100"


def setup_of(row: Row):
    """The planner's Setup for a published row."""
    from chattune.train.memory import Setup

    return Setup(mode={"lora_emb": "lora"}.get(row.method, row.method), gpus=row.gpus, zero_stage=row.zero_stage,
                 micro_batch_tokens=row.tokens, gradient_checkpointing=True, fused_ce=False, lora_r=64,
                 train_embeddings=row.method == "lora_emb", bytes_per_weight=2)


def memory_error(row: Row) -> float:
    """(estimate - published) / published, per GPU."""
    from chattune.train.memory import GB, estimate

    estimated = estimate(QWEN1[row.model], setup_of(row))["total"] / GB
    published = row.memory_gb / row.gpus
    return (estimated - published) / published
