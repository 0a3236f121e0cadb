"""Known third-party noise, silenced in one place: a user reads our output, not our dependencies' import chatter.

Every entry says what it hides and why that is safe to hide. Nothing here touches errors, or warnings about the
user's own data or settings. `CHATTUNE_VERBOSE=1` turns all of it off.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import io
import logging
import os
import sys
import warnings

# Loggers whose warnings are about optional accelerations that this machine lacks, not about the run:
LOGGERS = (
    "torchao",  # "Failed to load .../_C_mxfp8...so": CUDA kernels for FP8 formats we do not use
    "torch.utils._pytree",  # "register_constant() on Enum subclasses is deprecated": torchao's registration at import
    "bitsandbytes.backends.cpu.ops",  # "pip install kernels": an optional faster CPU 4-bit kernel
)

# (category, message regex) of warnings raised by libraries calling each other's deprecated names:
WARNINGS = (
    # peft reads PreTrainedModel.is_gradient_checkpointing, which transformers 5 renamed
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # DeepSpeed ZeRO calls torch.distributed's old collective names, hundreds of times per step
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"),
    (FutureWarning, r"`torch\.distributed\._(reduce_scatter|all_gather)_base` is a private function"),
)

# Log messages (logger, message prefix) that report what chattune already does and reports itself:
MESSAGES = (
    # Trainer aligns the config's eos/pad with the tokenizer's; we write the end-of-turn tokens into
    # generation_config.json ourselves and show them in the plan
    ("transformers.trainer_utils", "The tokenizer has new PAD/BOS/EOS tokens"),
    # Data preparation tokenizes whole conversations, then truncates them to --model_max_length and reports what was
    # cut; the tokenizer warns about the untruncated length (once per process, worded as if it were an input)
    ("transformers.tokenization_utils_base", "Token indices sequence length is longer than the specified maximum"),
)

# gptqmodel (imported by peft on every LoRA run to look for GPTQ layers) prints a banner and a "Python GIL is
# enabled" warning at import, and sets these variables process-wide; we restore them so that importing it for
# peft's check changes nothing for the run or the processes it starts.
_GPTQMODEL_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "CUDA_DEVICE_ORDER")


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Imports `gptqmodel` with its import-time output swallowed and its environment changes undone."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module) -> None:
            saved = {key: os.environ.get(key) for key in _GPTQMODEL_ENV}
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    run(module)
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value

        spec.loader.exec_module = exec_module
        return spec


@functools.cache
def quiet_third_party() -> None:
    """Install the filters above (once per process: cached; call before the heavy imports)."""
    if os.environ.get("CHATTUNE_VERBOSE", "").lower() in ("1", "true", "yes"):
        return
    os.environ.setdefault("GPTQMODEL_DISABLE_GIL_WARNING", "1")
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, prefix in MESSAGES:
        by_logger[name] = (*by_logger.get(name, ()), prefix)
    for name, prefixes in by_logger.items():
        logging.getLogger(name).addFilter(_DropMessages(prefixes))
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if "gptqmodel" not in sys.modules:
        sys.meta_path.insert(0, _QuietImport("gptqmodel"))
