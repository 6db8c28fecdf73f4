"""Convergence on GPU: a small Llama (transformers, random init) trained in bf16 on a synthetic language by
torch AdamW (fused), livetrain APOLLO and livetrain APOLLO-Mini, same data, same steps, same learning rate,
in one run. Prints the final loss of each (mean of the last 20 steps), its ratio to AdamW's, and the time
per training step.

usage: python bench/convergence.py [--steps 400] [--lr 1e-3] [--json out.json]
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from result_json import write_result  # noqa: E402  (bench/result_json.py, beside this file)

from livetrain.optim import Apollo, ApolloMini, param_groups  # noqa: E402

VOCAB, SEQ, BATCH = 512, 256, 32


def batch(gen: torch.Generator) -> torch.Tensor:
    """Sequences that repeat a random motif of 3–12 tokens with 3% noise: learnable (copy the token one
    period back), not trivial."""
    out = torch.empty(BATCH, SEQ + 1, dtype=torch.long)
    for b in range(BATCH):
        k = int(torch.randint(3, 13, (1,), generator=gen))
        motif = torch.randint(0, VOCAB, (k,), generator=gen)
        out[b] = motif.repeat((SEQ + 1) // k + 1)[: SEQ + 1]
    noise = torch.rand(BATCH, SEQ + 1, generator=gen) < 0.03
    out[noise] = torch.randint(0, VOCAB, (int(noise.sum()),), generator=gen)
    return out.cuda()


def model():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
    )
    return transformers.LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)


def train(name: str, make_opt, steps: int) -> dict:
    m = model()
    opt = make_opt(m)
    gen = torch.Generator().manual_seed(1)
    losses = []
    torch.cuda.synchronize()
    t = time.time()
    for _ in range(steps):
        x = batch(gen)
        loss = m(input_ids=x[:, :-1], labels=x[:, 1:].contiguous()).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    torch.cuda.synchronize()
    per_step = (time.time() - t) / steps * 1e3
    losses = [float(x) for x in losses]
    final = sum(losses[-20:]) / 20
    print(f"  {name}: loss {losses[0]:.3f} -> {final:.4f}, {per_step:.1f} ms/step", flush=True)
    return {
        "method": name,
        "final_loss": final,
        "ms_per_step": per_step,
        "losses": losses[::10],
        "params": sum(p.numel() for p in m.parameters()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/convergence.py needs a CUDA GPU")
    lr = a.lr
    rows = [
        train(
            "torch AdamW (fused, bf16 params)", lambda m: torch.optim.AdamW(m.parameters(), lr=lr, fused=True), a.steps
        ),
        train(
            "livetrain APOLLO (rank 128, scale 4)",
            lambda m: Apollo(param_groups(m), lr=lr, rank=128, scale=4.0),
            a.steps,
        ),
        train("livetrain APOLLO-Mini", lambda m: ApolloMini(param_groups(m), lr=lr), a.steps),
    ]
    base = rows[0]["final_loss"]
    print(
        f"\n{torch.cuda.get_device_name()}: Llama {rows[0]['params'] / 1e6:.1f}M params, bf16, {a.steps} steps of "
        f"{BATCH}×{SEQ} tokens, lr {lr}"
    )
    print("| optimizer | final loss | × AdamW | ms/step |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['final_loss']:.4f} | {r['final_loss'] / base:.3f} | {r['ms_per_step']:.1f} |")
    write_result(a.json, {"steps": a.steps, "lr": lr, "rows": rows})


if __name__ == "__main__":
    main()
