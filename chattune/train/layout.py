"""A saved model in its base checkpoint's layout: every tensor of the base is there, the untrained ones byte-identical.

transformers loads Qwen3.5's checkpoints without their multi-token-prediction head (`mtp.*`, which speculative
decoding uses), so a model saved from memory (merged, fully fine-tuned, quantized) would silently lose it; and a
frozen part saved from fp32 master weights (the vision tower of a full fine-tune) would no longer be the base's bytes.
`complete_from_base` copies the base tensors the model class skips on load (its `_keys_to_ignore_on_load_unexpected`)
that the output lacks, and puts the base's exact tensors back where the output holds untrained ones. It also copies the
base's image/video processor configs, which `save_pretrained` of a model does not write and without which a serving
engine (vLLM) cannot start a vision-language checkpoint, nor GPTQModel load one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

INDEX = "model.safetensors.index.json"
EXTRA = "model-base-extra.safetensors"
# What a vision-language checkpoint's processor reads besides the tokenizer files (transformers' AutoProcessor).
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")


def _folder(path: str) -> Path:
    """A model directory, or a hub id's snapshot (from the local cache)."""
    if os.path.isdir(path):
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))


def weight_files(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file of a model (or adapter) directory, or hub id (from the local cache)."""
    folder = _folder(path)
    index = folder / INDEX
    if index.is_file():
        return {name: str(folder / file) for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = next((folder / name for name in ("model.safetensors", "adapter_model.safetensors")
                   if (folder / name).is_file()), None)
    if single is None:
        return {}
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), str(single))


_FINGERPRINT_SAMPLES, _FINGERPRINT_BYTES = 16, 16 << 10


def base_fingerprint(path: str) -> str | None:
    """An identity of a model's weights, cheap for any size: the sizes of its weight files and 16 spread samples of
    16 kB from each. Two checkpoints of the same architecture (a base and its instruct variant) share every shape
    and config field, not these bytes. None when the weights cannot be found (remote code with .bin files in a
    repository not cached)."""
    import hashlib

    try:
        folder = _folder(path)
        files = sorted(set(weight_files(path).values())) or sorted(
            str(p) for p in folder.glob("*.bin") if p.name.startswith("pytorch_model"))
    except Exception:  # an id that is not in the cache, a folder without weights: nothing to compare
        return None
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        size = os.path.getsize(file)
        digest.update(f"{os.path.basename(file)}:{size}".encode())
        with open(file, "rb") as f:
            for i in range(_FINGERPRINT_SAMPLES):
                f.seek(max(0, (size - _FINGERPRINT_BYTES) * i // max(1, _FINGERPRINT_SAMPLES - 1)))
                digest.update(f.read(_FINGERPRINT_BYTES))
    return digest.hexdigest()[:32]


def _replaced(name: str, output: set[str]) -> bool:
    """Whether the output holds the base tensor `name` in another form (a quantized layer's qweight, scales, ...)."""
    module = name.rsplit(".", 1)[0] + "."
    return any(other.startswith(module) for other in output)


def skipped_on_load(model: Any) -> tuple[str, ...]:
    """The patterns of checkpoint tensors the model's class does not load (Qwen3.5: `^mtp.*`)."""
    return tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())


def copy_processor_files(out_dir: str, source: str) -> list[str]:
    """The processor configs `source` (a model directory or hub id) has and `out_dir` lacks, copied over. Returns
    their names."""
    import shutil

    copied, folder = [], _folder(source)
    for name in PROCESSOR_FILES:
        src, dst = folder / name, os.path.join(out_dir, name)
        if src.is_file() and not os.path.exists(dst):
            shutil.copyfile(src, dst)
            copied.append(name)
    return copied


def complete_from_base(out_dir: str, base: str, carry: Sequence[str] = (), untrained: set[str] = frozenset()
                       ) -> list[str]:
    """Copy the base tensors matching `carry` (what the class skips on load) that `out_dir` lacks into it (a new
    shard, listed in the index), put back the base's bytes of the `untrained` tensors it holds, and copy the base's
    processor configs. Returns the tensor names copied."""
    copy_processor_files(out_dir, base)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base_files, out_files = weight_files(base), weight_files(out_dir)
    missing = [n for n in base_files if n not in out_files and any(re.search(p, n) for p in carry)]
    restore = sorted(n for n in untrained if n in out_files and n in base_files)

    def base_tensor(name: str):
        with safe_open(base_files[name], "pt") as f:
            return f.get_tensor(name)

    for file in sorted({out_files[n] for n in restore}):
        tensors = load_file(file)
        tensors.update({n: base_tensor(n) for n in restore if out_files[n] == file})
        tmp = f"{file}.tmp"
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, file)
    if not missing:
        return []
    extra = os.path.join(out_dir, EXTRA)
    save_file({n: base_tensor(n).contiguous() for n in missing}, extra, metadata={"format": "pt"})
    index_path = os.path.join(out_dir, INDEX)
    if os.path.isfile(index_path):
        index = json.loads(Path(index_path).read_text())
    else:
        index = {"metadata": {}, "weight_map": {n: os.path.basename(f) for n, f in out_files.items()}}
    index["weight_map"].update(dict.fromkeys(missing, EXTRA))
    Path(index_path).write_text(json.dumps(index, indent=2, sort_keys=True))
    return missing


def layout_problems(artifact: str, base: str) -> list[str]:
    """What the artifact lacks of the base's layout: its architectures and model type, and every base tensor (in
    some form: a quantized layer holds its weight as qweight and scales)."""
    from transformers import AutoConfig

    problems = []
    ours, theirs = AutoConfig.from_pretrained(artifact), AutoConfig.from_pretrained(base)
    for key in ("architectures", "model_type"):
        if getattr(ours, key, None) != getattr(theirs, key, None):
            problems.append(f"{key} is {getattr(ours, key, None)}, the base's is {getattr(theirs, key, None)}")
    if (getattr(theirs, "vision_config", None) is None) != (getattr(ours, "vision_config", None) is None):
        problems.append("the base's vision_config is missing")
    lacking = [name for name in PROCESSOR_FILES
               if (_folder(base) / name).is_file() and not os.path.isfile(os.path.join(artifact, name))]
    if lacking:
        problems.append(f"{', '.join(lacking)} of the base is missing (a server cannot build the image processor)")
    base_files, out_files = weight_files(base), weight_files(artifact)
    missing = sorted(n for n in base_files if n not in out_files and not _replaced(n, set(out_files)))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        problems.append(f"{len(missing)} of the base's {len(base_files)} tensors are missing: {shown}")
    return problems


def adapter_problems(adapter: str, base: str) -> list[str]:
    """The adapter's LoRA modules that match no module of the class the base loads as (built on the meta device)."""
    import torch
    from transformers import AutoConfig

    from chattune.train.architecture import load_class

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = load_class(config).from_config(config)
    modules = {name for name, _ in model.named_modules()}
    wanted = {re.sub(r"^base_model\.model\.", "", name.split(".lora_A")[0]).replace(".base_layer", "")
              for name in weight_files(adapter) if ".lora_A" in name}
    unmatched = sorted(name for name in wanted if name not in modules)
    if not unmatched:
        return []
    return [f"{len(unmatched)} of its {len(wanted)} LoRA modules match nothing in {type(model).__name__} (a server "
            f"would serve the base model for them): {', '.join(unmatched[:3])}"]
