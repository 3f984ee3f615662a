"""Train the tiny character-level GPT of 04_train_tiny_lm.py with DFSS 2:4 attention, `causal() & nm(2, 4)` (in
every group of 4 consecutive keys only the 2 highest scores are kept), beside dense `causal()`, and print the two
loss curves side by side; then fine-tune the dense model with 2:4 attention and print that curve too.

    python examples/05_train_nm_attention.py                         # 300 steps, then 100 of fine-tuning
    python examples/05_train_nm_attention.py --steps 60 --finetune 20

The model, text, starting weights, batches and bf16 autocast are those of 04 (whose code this imports): both runs
start from the same weights and see the same batches in the same order. DFSS (Chen et al., PPoPP 2023) reports
that a model with dense attention recovers its accuracy under 2:4 attention after a short fine-tune; the second
part shows it on this model: a fixed set of evaluation batches (windows of the same text drawn with another seed)
is scored by the dense model with dense attention, then with 2:4 attention swapped in as it is, then after
--finetune steps of training with 2:4 attention, beside the dense model trained for those steps with dense
attention. The script exits 1 if a loss is not finite, or if 2:4 attention ends more than --tolerance above dense
attention, trained from the start or fine-tuned. Needs a CUDA GPU; without one it says so and exits 0."""

import argparse
import copy
import importlib.util
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import attngen

# 04's model, data and training loop (its file name is not an importable module name: loaded from its path)
_spec = importlib.util.spec_from_file_location("tiny_lm", Path(__file__).with_name("04_train_tiny_lm.py"))
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

DENSE = attngen.causal()
SPARSE = attngen.causal() & attngen.nm(2, 4)


@torch.no_grad()
def evaluate(model, attend, batches, device: torch.device) -> float:
    """Mean cross-entropy over `batches`, under the same autocast as training."""
    losses = []
    for x, y in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(x.to(device), attend)
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()).item())
    return sum(losses) / len(losses)


def table(title: str, curves: dict[str, list[float]], every: int, gap: tuple[str, str]) -> None:
    names = list(curves)
    steps = len(curves[names[0]])
    print(f"\n{title}\n{'step':>12}" + "".join(f"{n:>26}" for n in names) + "       gap")
    for s in range(steps):
        if s % every == 0 or s == steps - 1:
            row = "".join(f"{curves[n][s]:26.4f}" for n in names)
            print(f"{s:12d}{row}{curves[gap[1]][s] - curves[gap[0]][s]:10.4f}")
    tail = max(1, steps // 10)
    print(f"{'mean last ' + str(tail):>12}" + "".join(f"{sum(curves[n][-tail:]) / tail:26.4f}" for n in names))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--finetune", type=int, default=100, help="steps of 2:4 fine-tuning of the dense model")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=0, help="print every N steps (default: about 15 rows)")
    parser.add_argument("--tolerance", type=float, default=0.15, help="largest allowed 2:4 - dense loss gap")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("05_train_nm_attention needs a CUDA GPU to train (attngen kernels run on CUDA); none found here.")
        return 0
    device = torch.device("cuda")

    text = tiny.load_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    cfg = tiny.Config(vocab=len(chars))
    torch.manual_seed(args.seed)
    start = tiny.GPT(cfg)
    print(f"{len(text):,} characters, vocabulary {cfg.vocab}; {cfg}, batch {args.batch}, bf16 autocast")
    print(f"attention: {DENSE!r} and {SPARSE!r} on {torch.cuda.get_device_name()}")

    runs = {"dense causal()": DENSE, "causal() & nm(2, 4)": SPARSE}
    curves, models, step_s = {}, {}, {}
    for name, pat in runs.items():
        batches = tiny.make_batches(data, args.steps, args.batch, cfg.context, args.seed)
        models[name] = copy.deepcopy(start).to(device)
        curves[name], step_s[name] = tiny.train(models[name], tiny.attngen_attend(pat), batches, args.lr, 30, device)
    every = args.every or max(1, args.steps // 15)
    table(f"training from the same start, {args.steps} steps", curves, every, gap=tuple(runs))
    print(f"{'ms/step':>12}" + "".join(f"{1e3 * step_s[n]:26.2f}" for n in runs))

    # Fine-tuning the dense model with 2:4 attention, beside the dense model trained on with dense attention.
    dense_model = models["dense causal()"]
    eval_batches = list(tiny.make_batches(data, 8, args.batch, cfg.context, args.seed + 1))
    dense_eval = evaluate(dense_model, tiny.attngen_attend(DENSE), eval_batches, device)
    swapped_eval = evaluate(dense_model, tiny.attngen_attend(SPARSE), eval_batches, device)
    print(f"\nloss on {len(eval_batches)} evaluation batches: the dense model with dense attention {dense_eval:.4f}, "
          f"with 2:4 attention swapped in {swapped_eval:.4f}")  # fmt: skip
    tuned = {"dense attention": (DENSE, copy.deepcopy(dense_model)), "2:4 attention": (SPARSE, dense_model)}
    tune_curves, after = {}, {}
    for name, (pat, model) in tuned.items() if args.finetune > 0 else ():
        batches = tiny.make_batches(data, args.finetune, args.batch, cfg.context, args.seed + 2)
        tune_curves[name], _ = tiny.train(model, tiny.attngen_attend(pat), batches, args.lr / 3, 10, device)
        after[name] = evaluate(model, tiny.attngen_attend(pat), eval_batches, device)
    if after:
        table(f"fine-tuning the dense model, {args.finetune} steps", tune_curves, max(1, args.finetune // 10),
              gap=tuple(tuned))  # fmt: skip
        print(f"\nloss on the evaluation batches after {args.finetune} more steps: with 2:4 attention "
              f"{after['2:4 attention']:.4f}, with dense attention {after['dense attention']:.4f}")  # fmt: skip

    tail = max(1, args.steps // 10)
    final = {n: sum(c[-tail:]) / tail for n, c in curves.items()}
    scratch_gap = final["causal() & nm(2, 4)"] - final["dense causal()"]
    tuned_gap = after["2:4 attention"] - after["dense attention"] if after else 0.0
    every_loss = [x for c in (*curves.values(), *tune_curves.values()) for x in c]
    every_loss += [dense_eval, swapped_eval, *after.values()]
    ok = all(map(math.isfinite, every_loss)) and scratch_gap <= args.tolerance and tuned_gap <= args.tolerance
    print(f"\n2:4 - dense, trained from the start (mean of the last {tail} steps): {scratch_gap:+.4f}; fine-tuned "
          f"(evaluation batches): {tuned_gap:+.4f} (tolerance {args.tolerance})")  # fmt: skip
    print("PASS: 2:4 attention trains to within the tolerance of dense" if ok else "FAIL: 2:4 attention lags dense")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
