"""The memory planner and the time estimate against Qwen's published profile (tests/published_profiles.py).

    python bench/memory_vs_published.py          # prints a Markdown table and the error bands

No GPU needed: the estimates come from the literal Qwen-1 shapes; the measurements are Qwen's (A100-80G).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from published_profiles import (  # noqa: E402
    QWEN1,
    QWEN_PROFILE,
    QWEN_PROFILE_GPU,
    memory_error,
    setup_of,
)

from chattune.train.memory import GB, estimate
from chattune.train.timing import estimate_seconds


def main() -> None:
    print("| model | method | GPUs | tokens | published GB/GPU | estimate GB/GPU | error | published s/it | "
          "estimate s/it | error |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    mem, time = [], []
    for row in QWEN_PROFILE:
        shape, setup = QWEN1[row.model], setup_of(row)
        gb = estimate(shape, setup)["total"] / GB
        seconds = estimate_seconds(shape, setup, tokens=8 * row.tokens, gpu=QWEN_PROFILE_GPU)
        m = memory_error(row)
        t = (seconds - row.seconds_per_iteration) / row.seconds_per_iteration
        mem.append(m)
        time.append(t)
        print(f"| {row.model} | {row.method} | {row.gpus} | {row.tokens} | {row.memory_gb / row.gpus:.1f} | {gb:.1f} | "
              f"{m:+.0%} | {row.seconds_per_iteration:g} | {seconds:.1f} | {t:+.0%} |")
    print("\nPer configuration, memory then time error at 256 / 512 / 1024 / 2048 / 4096 / 8192 tokens:\n")
    print("| model | method | GPUs | memory error | time error |")
    print("|---|---|---:|---|---|")
    groups: dict = {}
    for row, m, t in zip(QWEN_PROFILE, mem, time, strict=True):
        groups.setdefault((row.model, row.method, row.gpus), []).append((m, t))
    for (model, method, gpus), errors in groups.items():
        print(f"| {model} | {method} | {gpus} | {' '.join(f'{m:+.0%}' for m, _ in errors)} | "
              f"{' '.join(f'{t:+.0%}' for _, t in errors)} |")
    n = len(mem)
    print(f"\nmemory: {n} rows; {sum(-0.05 <= e <= 0.15 for e in mem)} within -5%..+15%, "
          f"{sum(abs(e) <= 0.15 for e in mem)} within 15%; lowest {min(mem):+.1%}, highest {max(mem):+.1%}")
    print(f"time:   {n} rows; {sum(abs(e) <= 0.25 for e in time)} within 25%, {sum(abs(e) <= 0.5 for e in time)} "
          f"within 50%; lowest {min(time):+.1%}, highest {max(time):+.1%}")


if __name__ == "__main__":
    main()
