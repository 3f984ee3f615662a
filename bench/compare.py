"""Compare two benchmark runs (JSON from bench_attention.py) case by case: attngen's time in each, their ratio,
and each run's ratios against the baselines. Prints a table; used by run_device.sh --baseline. With --markdown,
one run as the table of docs/performance.md.

python bench/compare.py before.json after.json
python bench/compare.py --markdown run.json"""

import json
import sys


def load(path: str) -> dict:
    with open(path) as f:
        return {row["case"]: row for row in json.load(f)["rows"]}


def main(before_path: str, after_path: str) -> None:
    before, after = load(before_path), load(after_path)
    print(f"{'case':44s} {'before ms':>10s} {'after ms':>10s} {'after/before':>12s}   ratios before -> after")
    for case, new in after.items():
        old = before.get(case)
        if old is None:
            print(f"{case:44s} {'-':>10s} {new['attngen_ms']:10.3f}")
            continue
        change = new["attngen_ms"] / old["attngen_ms"]
        ratios = "  ".join(
            f"{k} {old['ratios'].get(k, float('nan')):.2f}->{v:.2f}" for k, v in sorted(new["ratios"].items())
        )
        print(f"{case:44s} {old['attngen_ms']:10.3f} {new['attngen_ms']:10.3f} {change:12.3f}   {ratios}")


NAMES = {"sdpa_flash": "FA2", "sdpa_cudnn": "cuDNN", "flex": "Flex"}


def markdown(path: str) -> None:
    print("| case | attngen | others (ms) | ratio |\n|---|---|---|---|")
    for case, row in load(path).items():
        others = ", ".join(f"{NAMES.get(k, k)} {v:.3g}" for k, v in row["others_ms"].items() if v is not None)
        ratios = ", ".join(f"{NAMES.get(k, k)} {v:.2f}×" for k, v in row["ratios"].items())
        print(f"| {case} | {row['attngen_ms']:.3g} ms ({row['attngen_tflops']:.0f} TF) | {others} | {ratios} |")


if __name__ == "__main__":
    if sys.argv[1] == "--markdown":
        markdown(sys.argv[2])
    else:
        main(*sys.argv[1:3])
