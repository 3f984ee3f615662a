"""What the single-GPU benchmark scripts share: median CUDA-event timing, and rows of results (time, TFLOP/s of the
work the pattern needs, ratios other / attngen) printed as they come and kept in a JSON file."""

import json
import statistics

import torch


def timed(fn, reps: int) -> float:
    """Median milliseconds of `reps` calls after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class Results:
    """Rows written to `out` (JSON, rewritten after every row, so a cut-short run still leaves its numbers)."""

    def __init__(self, out: str):
        self.out, self.rows = out, []

    def add(self, case: str, ms: float, pairs: int, D: int, backward: bool, others: dict) -> None:
        """A row for `case` taking `ms`: 4·D flops per kept pair forward, 3.5 times that forward+backward; `others`
        maps a baseline's name to its milliseconds (its ratio is others / ms)."""
        flops = 4 * D * pairs * (3.5 if backward else 1)
        row = dict(case=case, ms=ms, tflops=flops / ms / 1e9, others_ms=others)
        row["ratios"] = {k: v / ms for k, v in others.items()}
        self.rows.append(row)
        with open(self.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=self.rows), f, indent=1)
        rs = "  ".join(f"{k} {v:.2f}x" for k, v in row["ratios"].items())
        print(f"{case:46s} {ms:9.3f} ms {row['tflops']:6.0f} TF   {rs}", flush=True)
