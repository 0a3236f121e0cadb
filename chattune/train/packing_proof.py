"""Which model classes keep the samples of a packed row apart: proven, not assumed from a class flag.

For every causal-LM class of transformers (and the vision-language classes whose text path we train), a 2-layer
random model of the class runs a packed row (samples concatenated, `position_ids` restarting, no attention mask,
`use_cache=False`, and the sample boundaries as training passes them) and each sample on its own; the class packs
when the logits agree within `TOLERANCE`. A class whose tiny model cannot be built, or that would leave out a kind of
layer its modeling code defines (a recurrent or convolutional mixer the tiny config does not reach), stays unproven
and is padded.

`python -m chattune.train.packing_proof` writes the result for the installed transformers into packing_proof.json
beside this file (one entry per tested version); tests/test_packing_proof.py recomputes it in CI and compares. At
run time a class found in the file for this transformers version is decided by it; any other class (or version)
is probed on the spot (a second or two).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

PROOF_FILE = Path(__file__).with_name("packing_proof.json")
TOLERANCE = 1e-5  # on logits computed in float64, where an isolated class agrees to ~1e-12
LENGTHS = (7, 70, 5)  # 70 spans two 64-token chunks of the linear-attention kernels

# Shapes every tiny model gets where its config has the attribute (and the default is of the same type).
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=512,
             moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_local_experts=4,
             n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
             linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
             sliding_window=8, initializer_range=0.2, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
# Families whose shapes are tied in ways the generic shrink misses, or whose default config leaves out a layer kind.
FAMILY = {
    "deepseek_v2": dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, v_head_dim=16, head_dim=8, n_group=1, topk_group=1, num_experts_per_tok=2),
    "deepseek_v3": dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, v_head_dim=16, head_dim=8, n_group=1, topk_group=1),
    "lfm2": dict(full_attn_idxs=[1], layer_types=["conv", "full_attention"]),
}
# Module classes that mix tokens (what could carry one sample into the next), by name; the vision and audio towers'
# and encoder-decoder cross attention are not on the text decoder's path.
MIXERS = ("Attention", "Conv", "Mamba", "Mixer", "Recurrent", "Rnn", "RNN", "Lightning", "DeltaNet", "Ssm", "SSM", "Rwkv",
          "Retention", "Indexer", "Scan")
NOT_DECODER = ("Vision", "Visual", "Patch", "Image", "Audio", "Video", "Cross", "Encoder", "Projector")


@dataclasses.dataclass(frozen=True)
class Verdict:
    packs: bool
    error: float | None  # largest |packed - per-sample| of the logits; None when the class could not be tried
    why: str


def token_mixers(model_cls: type) -> set[str]:
    """The token-mixing module classes the class's modeling file defines for its decoder (each must run in a
    proof: a layer kind the tiny config does not reach proves nothing about it)."""
    module = sys.modules[model_cls.__module__]
    return {name for name, obj in vars(module).items()
            if inspect.isclass(obj) and issubclass(obj, torch.nn.Module) and obj.__module__ == module.__name__
            and any(part in name for part in MIXERS) and not any(part in name for part in NOT_DECODER)}


def _shrink(config: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """The SMALL shapes (and the family's overrides) for the attributes this config has, keeping their types."""
    out = {}
    for name, value in {**SMALL, **overrides}.items():
        if name in overrides or (hasattr(config, name) and isinstance(getattr(config, name), type(value))):
            out[name] = value
    types = getattr(config, "layer_types", None)
    if "layer_types" not in overrides and isinstance(types, list) and types:
        kinds = list(dict.fromkeys(types))
        out["layer_types"] = (kinds * 2)[:max(2, len(kinds))]
        out["num_hidden_layers"] = len(out["layer_types"])
    return out


def tiny_config(model_cls: type) -> Any:
    """A small config of the class's own config class (text and vision parts of a composite config shrunk)."""
    config_cls = model_cls.config_class
    default = config_cls()
    model_type = getattr(default, "model_type", "")
    overrides = FAMILY.get(model_type.removesuffix("_text"), {})
    subs = {}
    for name in ("text_config", "vision_config"):
        sub = getattr(default, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            small = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64) \
                if name == "vision_config" else _shrink(sub, overrides)
            subs[name] = {**sub.to_dict(), **{k: v for k, v in small.items() if k in sub.to_dict() or k in overrides}}
    config = config_cls(**subs, **({} if subs else _shrink(default, overrides)))
    config.use_cache = False
    return config


def packed_row(lengths: tuple[int, ...], vocab: int, boundaries: bool) -> tuple[list, dict[str, torch.Tensor]]:
    """Random samples and their packed row as training feeds it (chattune.train.batches.PackingCollator)."""
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(3, vocab, (1, n), generator=g) for n in lengths]
    row = {"input_ids": torch.cat(samples, 1), "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    if boundaries:
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        row.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    return samples, row


def isolation_error(model_cls: type, config: Any, boundaries: bool) -> float:
    """Largest difference between the logits of a packed row and of its samples run on their own."""
    torch.manual_seed(0)
    config._attn_implementation = "sdpa" if getattr(model_cls, "_supports_sdpa", False) else "eager"
    if hasattr(config, "_experts_implementation"):
        config._experts_implementation = "eager"  # grouped_mm has no float64 kernel; the loop computes the same
    model = model_cls(config).to(torch.float64).eval()  # float64: a leak stands out of rounding by ten orders
    vocab = config.get_text_config().vocab_size
    samples, row = packed_row(LENGTHS, min(vocab, 500), boundaries)
    with torch.no_grad():
        packed = model(**row, use_cache=False).logits
        error, at = 0.0, 0
        for sample in samples:
            alone = model(input_ids=sample, use_cache=False).logits
            error = max(error, (packed[:, at:at + sample.shape[1]] - alone).abs().max().item())
            at += sample.shape[1]
    return error


def prove(model_cls: type) -> Verdict:
    """Whether `model_cls` keeps packed samples apart (see the module docstring)."""
    from chattune.train.hf import install_packed_linear_attention

    config_type = getattr(model_cls.config_class, "model_type", "")
    boundaries = install_packed_linear_attention(config_type)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            config = tiny_config(model_cls)
            with torch.device("meta"):
                meta = model_cls(config)
            if sum(p.numel() for p in meta.parameters()) > 20_000_000:
                return Verdict(False, None, "no small model of this class could be built")
            missing = token_mixers(model_cls) - {type(m).__name__ for m in meta.modules()}
            if missing:
                return Verdict(False, None, f"not proven: a small model leaves out {', '.join(sorted(missing))}")
            error = isolation_error(model_cls, config, boundaries)
        except Exception as e:  # noqa: BLE001 - any failure to build or run leaves the class unproven (padded)
            return Verdict(False, None, f"not proven: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    if error <= TOLERANCE:
        return Verdict(True, error, f"packed == per-sample within {error:.1e}")
    return Verdict(False, error, f"samples of a packed row see each other (logits differ by {error:.2g})")


def classes() -> dict[str, type]:
    """Every causal-LM class of the installed transformers, and the vision-language classes of the families whose
    text path chattune trains."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) | {
        "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"}
    out = {}
    for name in sorted(names):
        with contextlib.suppress(Exception):
            out[name] = getattr(transformers, name)
    return out


def shipped() -> dict[str, Any]:
    try:
        return json.loads(PROOF_FILE.read_text())
    except (OSError, ValueError):
        return {"tolerance": TOLERANCE, "proofs": {}}


def proof_for_this_transformers() -> dict[str, Any] | None:
    """The shipped proof made with the installed transformers, if there is one."""
    import transformers

    return shipped()["proofs"].get(transformers.__version__)


def verdict(model_cls: type) -> Verdict:
    """The class's verdict: from the shipped proof, else probed now."""
    proof = proof_for_this_transformers()
    entry = (proof or {}).get("classes", {}).get(model_cls.__name__)
    if entry is not None:
        return Verdict(entry["packs"], entry["error"], entry["why"])
    return prove(model_cls)


def main() -> None:
    import transformers

    results = {name: dataclasses.asdict(prove(cls)) for name, cls in classes().items()}
    proofs = shipped()
    proofs["tolerance"] = TOLERANCE
    proofs["proofs"][transformers.__version__] = {"torch": torch.__version__, "classes": results}
    PROOF_FILE.write_text(json.dumps(proofs, indent=1, sort_keys=True) + "\n")
    packs = sorted(name for name, r in results.items() if r["packs"])
    print(f"{len(packs)} of {len(results)} classes keep packed samples apart; written to {PROOF_FILE}")


if __name__ == "__main__":
    main()
