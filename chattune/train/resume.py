"""Where a run starts: what --output_dir holds before it (`OutputDir`), and the plan's resume decision from that
(`plan_resume`: the checkpoint to resume, what to set aside, what to remove), read by `chattune.train.plan`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from chattune.errors import ConfigError
from chattune.train import checkpoints


@dataclass(frozen=True)
class OutputDir:
    """What --output_dir holds before the run: its checkpoints (each with what is wrong with it, or None), an
    unfinished save, and the free space of its filesystem."""

    path: str
    checkpoints: tuple[tuple[int, str, str | None], ...] = ()
    staging: bool = False
    free_bytes: int = 1 << 62

    @classmethod
    def read(cls, path: str) -> OutputDir:
        found = tuple((step, p, checkpoints.problem(p)) for step, p in checkpoints.committed(path))
        return cls(path, found, os.path.isdir(os.path.join(path, checkpoints.STAGING)), checkpoints.free_bytes(path))


@dataclass(frozen=True)
class Resume:
    source: str | None  # the checkpoint training resumes from
    why: str
    set_aside: tuple[tuple[str, str], ...] = ()  # (incomplete checkpoint, what is wrong): renamed broken_..., kept
    remove: tuple[str, ...] = ()  # an unfinished save; with --overwrite_output_dir the old run's checkpoints


def plan_resume(training_args: Any, output: OutputDir) -> Resume:
    """--resume_from_checkpoint, or the newest complete checkpoint when the same command runs again; nothing with
    --overwrite_output_dir, which removes the old run's checkpoints. Incomplete checkpoints newer than the one
    resumed are set aside (renamed, never deleted); an unfinished save is removed."""
    given = training_args.resume_from_checkpoint
    staging = (os.path.join(output.path, checkpoints.STAGING),) if output.staging else ()
    if given and given.lower() not in ("true", "latest", "last"):
        if not os.path.isdir(given):
            raise ConfigError(f"--resume_from_checkpoint {given}: no such checkpoint directory")
        why = next((p for _, path, p in output.checkpoints if os.path.abspath(path) == os.path.abspath(given)),
                   None) or checkpoints.problem(given)
        if why:
            raise ConfigError(f"--resume_from_checkpoint {given}: the checkpoint is incomplete ({why}); pass an "
                              "earlier checkpoint, or leave the flag out to resume from the newest complete one")
        return Resume(given, "--resume_from_checkpoint", remove=staging)
    if training_args.overwrite_output_dir:
        old = tuple(path for _, path, _ in output.checkpoints)
        why = "--overwrite_output_dir" + (f": the old run's {len(old)} checkpoint(s) are removed" if old else "")
        return Resume(None, why, remove=staging + old)
    broken = []
    for step, path, problem in reversed(output.checkpoints):
        if problem is None:
            return Resume(path, f"the newest complete checkpoint of {output.path} (the same command again)",
                          set_aside=tuple(broken), remove=staging)
        broken.append((path, problem))
    if given:
        raise ConfigError(f"--resume_from_checkpoint {given}: no complete checkpoint-* in {output.path}")
    return Resume(None, "no checkpoint in the output directory" + (
        f" ({len(broken)} incomplete, set aside)" if broken else ""), set_aside=tuple(broken), remove=staging)
