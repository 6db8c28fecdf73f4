"""The trainer's loss on a Qwen3-8B-shaped output layer (GPU), in one run: time, peak memory and error of

  full logits      Hugging Face's path: bf16 logits, fp32 cross-entropy, autograd (the reference cost)
  chunked          livetrain.loss.LinearCrossEntropy, the projection's gradient made in backward
  chunked+later    the same, the projection's gradient made after backward by OutputGradient (what the
                   trainer does: it then never coexists with the layers' activations)

Both chunked methods run their row-wise work as the core's fused passes (include/livetrain/loss.hpp).
One sequence of --tokens hidden states (bf16) and the vocabulary x hidden projection (bf16), random, with
an fp32 reference of every gradient. Memory = the allocator's peak during the call beyond what was
allocated before it; every method ends holding both gradients (the projection's is 1.16 GiB at 8B), so the
differences are the methods' own working memory. Error = |g - g_fp32| / |g_fp32| (Frobenius).
"one product" is the time of one bf16 hidden x projection^T product: chunked does 4 of them, chunked+later 6.

usage: python bench/loss.py [--tokens 2048] [--hidden 4096] [--vocab 151936] [--reps 10] [--json out.json]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from optim import time_steps  # noqa: E402  (bench/optim.py, beside this file: the GPU timing of a step)
from result_json import write_result  # noqa: E402  (bench/result_json.py, beside this file)

from livetrain import loss  # noqa: E402

GiB = 1 << 30


def timed(fn, reps: int) -> float:
    """Median GPU seconds of fn() over reps runs, after warm-up (bench/optim.py's timing)."""
    return time_steps(fn, reps) / 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", help="also write the numbers here")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/loss.py needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = (torch.randn(a.tokens, a.hidden, device=dev, generator=g) * 2).to(torch.bfloat16)
    weight = (torch.randn(a.vocab, a.hidden, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    target = torch.randint(0, a.vocab, (a.tokens,), device=dev, generator=g)
    target[: a.tokens // 4] = -100  # prompt tokens: not trained
    token_weight = torch.full((a.tokens,), 1.0 / int((target != -100).sum()), device=dev)

    # fp32 reference of the loss and both gradients
    h32, w32 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h32 @ w32.t(), target, ignore_index=-100, reduction="sum") * token_weight[0]
    ref.backward()
    ref_h, ref_w = h32.grad, w32.grad
    del h32, w32
    torch.cuda.empty_cache()

    def full():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        logits = (h @ w.t()).float()
        value = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum") * token_weight[0]
        value.backward()
        return value, h.grad, w.grad

    def chunked(later: bool):
        def run():
            h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            out = loss.OutputGradient() if later else None
            if out is not None:
                out.weight = w
            chunk = max(1, loss.CHUNK_BYTES // (4 * a.vocab))
            value = loss.LinearCrossEntropy.apply(h, w, target, token_weight, chunk, out)
            value.backward()
            return value, h.grad, (out.gradient() if out is not None else w.grad)

        return run

    methods = [("full logits", full), ("chunked", chunked(False)), ("chunked+later", chunked(True))]
    rows = []
    product = timed(lambda: hidden @ weight.t(), a.reps)
    for name, fn in methods:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        value, gh, gw = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(dev) - before
        err_h = float((gh.float() - ref_h).norm() / ref_h.norm())
        err_w = float((gw.float() - ref_w).norm() / ref_w.norm())
        loss_err = abs(float(value.detach()) - float(ref)) / abs(float(ref))
        del value, gh, gw
        seconds = timed(fn, a.reps)
        rows.append(
            {
                "method": name,
                "seconds": seconds,
                "peak_bytes": peak,
                "err_hidden_grad": err_h,
                "err_weight_grad": err_w,
                "err_loss": loss_err,
            }
        )

    grads = (a.tokens * a.hidden + a.vocab * a.hidden) * 2
    print(
        f"{torch.cuda.get_device_name(dev)}; torch {torch.__version__}; {a.tokens} tokens, hidden {a.hidden}, "
        f"vocabulary {a.vocab}, bf16; one product {product * 1e3:.2f} ms; the two gradients {grads / GiB:.2f} GiB\n"
    )
    print(
        "| method | ms | products' floor ms | peak beyond inputs GiB | of which working GiB | loss rel. err. "
        "| grad hidden rel. err. | grad projection rel. err. |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r, n in zip(rows, (3, 4, 6)):
        print(
            f"| {r['method']} | {r['seconds'] * 1e3:.2f} | {n * product * 1e3:.2f} | {r['peak_bytes'] / GiB:.2f} | "
            f"{(r['peak_bytes'] - grads) / GiB:.2f} | {r['err_loss']:.1e} | {r['err_hidden_grad']:.1e} | "
            f"{r['err_weight_grad']:.1e} |"
        )
    base = {r["method"]: r for r in rows}
    print(
        f"\nchunked+later takes {base['chunked+later']['seconds'] / base['chunked']['seconds']:.2f}x the time of "
        f"chunked and {base['chunked+later']['seconds'] / base['full logits']['seconds']:.2f}x that of full logits."
    )
    write_result(
        a.json,
        {
            "torch": torch.__version__,
            "tokens": a.tokens,
            "hidden": a.hidden,
            "vocab": a.vocab,
            "product_seconds": product,
            "rows": rows,
        },
        dev,
        indent=1,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
