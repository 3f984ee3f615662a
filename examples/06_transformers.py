"""attngen inside a Hugging Face transformers model: a small random Llama built with attn_implementation="attngen",
checked against the same model with SDPA (a left-padded forward pass, greedy generation with a KV cache, a training
step), then 2:4 attention put on two of its layers with `set_pattern`.

    python examples/06_transformers.py

`import attngen.integrations.transformers` registers "attngen" with transformers' attention and mask interfaces.
The model's own mask (causal, sliding window, padding, packed sequences, the cache's offsets) becomes an attngen
pattern per layer call; a pattern given to `set_pattern` is AND-ed with it, so it names the extra rule only
(`attngen.nm(2, 4)`, not `causal() & nm(2, 4)`). Exits 1 if attngen and SDPA disagree beyond bf16 rounding. Needs a
CUDA GPU and transformers >= 5.17; without a GPU it says so, shows the pattern every layer would run for a padded
batch, and exits 0."""

import sys

import torch

import attngen

try:
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.masking_utils import create_causal_mask

    import attngen.integrations.transformers as agt
except ImportError as e:
    print(f"06_transformers needs Hugging Face transformers >= 5.17 (pip install 'transformers>=5.17'): {e}")
    sys.exit(0)

LAYERS_2_4 = [1, 2]


def config() -> LlamaConfig:
    """A fresh config each time (from_config records the attention implementation in the config it is given)."""
    return LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: attngen takes it as is
        head_dim=64,
        max_position_embeddings=1024,
        initializer_range=0.05,
    )


def batch(device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 48 tokens, the second left-padded by 16 (as a tokenizer pads for generation)."""
    ids = torch.randint(1, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 48, dtype=torch.long)
    mask[1, :16] = 0
    return ids.to(device), mask.to(device)


def show_patterns(model, ids, mask) -> None:
    """The pattern each layer runs for this batch: the model's mask as transformers builds it for "attngen", AND the
    layer's own pattern. Runs anywhere (only the kernels need a GPU)."""
    embeds = model.get_input_embeddings()(ids)
    built = create_causal_mask(model.config, embeds, mask, None, torch.arange(ids.shape[1])[None])
    for layer in model.model.layers:
        run = agt.resolve(layer.self_attn, ids.shape[1], ids.shape[1], built)
        print(f"  layer {layer.self_attn.layer_idx}: {run.pattern!r}  (call-time inputs: {', '.join(run.inputs)})")


def main() -> int:
    print(f"transformers {transformers.__version__}, attngen {attngen.__version__}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(), attn_implementation="attngen")
    if not torch.cuda.is_available():
        print("06_transformers needs a CUDA GPU to run attngen's kernels; none found here.")
        ids, mask = batch("cpu")
        print("The patterns the layers would run for a left-padded batch:")
        show_patterns(model, ids, mask)
        agt.set_pattern(model, attngen.nm(2, 4), layers=LAYERS_2_4)
        print(f"With set_pattern(model, attngen.nm(2, 4), layers={LAYERS_2_4}):")
        show_patterns(model, ids, mask)
        return 0

    device = torch.device("cuda")
    model = model.to(device, torch.bfloat16).eval()
    sdpa = AutoModelForCausalLM.from_config(config(), attn_implementation="sdpa").to(device, torch.bfloat16).eval()
    sdpa.load_state_dict(model.state_dict())
    ids, mask = batch(device)
    real = mask.bool()
    failures = []

    # 1. forward: the logits of real tokens (padded rows get 0 from attngen; nothing attends to them)
    with torch.no_grad():
        ours, theirs = (m(ids, attention_mask=mask).logits.float() for m in (model, sdpa))
    diff = (ours[real] - theirs[real]).abs().max().item()
    scale = theirs[real].abs().max().item()
    print(f"forward, left-padded batch: max |attngen - sdpa| = {diff:.4f} (logits up to {scale:.2f})")
    if diff > 0.05 * scale:
        failures.append("forward logits")

    # 2. greedy generation with a KV cache: the queries sit at the end of the keys (bottom-right alignment)
    gen = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        tokens = [m.generate(ids, **gen)[:, 48:] for m in (model, sdpa)]
    agree = (tokens[0] == tokens[1]).float().mean().item()
    print(f"generate, 16 new tokens: attngen and sdpa pick the same token {agree:.0%} of the time")
    if not torch.equal(tokens[0][:, :1], tokens[1][:, :1]):
        failures.append("first generated token")

    # 3. a training step: gradients flow through attngen's backward kernels
    model.train()
    labels = ids.masked_fill(~real, -100)
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None)).item()
    print(f"training step: loss {loss.item():.3f}, gradient norm {norm:.3f}")
    if not (torch.isfinite(loss) and norm > 0 and torch.isfinite(torch.tensor(norm))):
        failures.append("training step")
    model.eval()

    # 4. 2:4 attention on two layers, on top of the model's mask
    agt.set_pattern(model, attngen.nm(2, 4), layers=LAYERS_2_4)
    print(f"set_pattern(model, attngen.nm(2, 4), layers={LAYERS_2_4}); the layers now run:")
    show_patterns(model, ids, mask)
    with torch.no_grad():
        sparse = model(ids, attention_mask=mask).logits.float()
    change = (sparse[real] - ours[real]).abs().max().item()
    print(f"2:4 attention moves the logits by up to {change:.4f}")
    if not (torch.isfinite(sparse[real]).all() and change > 0):
        failures.append("2:4 attention")
    agt.set_pattern(model, None)  # dense again

    if failures:
        print(f"FAIL: {', '.join(failures)}")
        return 1
    print("PASS: attngen runs the model as SDPA does, and 2:4 attention applies where it was set")
    return 0


if __name__ == "__main__":
    sys.exit(main())
