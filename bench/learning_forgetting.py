"""Which general answers a job loses, and where the loss lives (issue #14: "general kept" >= 95%).

On the default model, in process (bench/learning_sweep.py's InProcess), from the same starting weights:

1. Before any training, each general question of bench/learning_data.json: the model's greedy answer (as the
   sweep asks it), whether it is right, and its **margins** (log-prob of the greedy token minus the
   runner-up's, teacher-forced on the greedy answer): at the first answer token, at the first token of the
   keyword that makes it right, and the smallest margin from the answer's start to that keyword (a flip
   anywhere before the keyword can derail the answer); the keyword's token position; and its **overlap**
   with the taught facts' questions (the most IDF-weighted share of its tokens that one fact's question holds,
   IDF over the facts' and general questions; the chat template's tokens weigh nothing).
2. One job per ``--jobs`` entry (``plain``: no guard, lr 5e-5, ``--steps`` steps; ``defaults``: only
   ``examples``, guard on), the general questions asked after it, then asked again with one group of
   parameters put back to the starting weights (``--restore``: embeddings (tied with the output
   projection on the default model), attention, MLP, norms, the layers' thirds): a group whose restoring
   brings a lost answer back is where that loss lives. Also each group's relative update norm.

Prints markdown tables; ``--json`` writes everything.

usage: python bench/learning_forgetting.py [--facts 4] [--jobs plain,defaults] [--steps 29] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import learning_questions as lq  # noqa: E402
import learning_sweep as ls  # noqa: E402
import torch  # noqa: E402


def groups(names: list[str], layers: int) -> dict[str, list[str]]:
    """Parameter groups by name: what ``--restore`` can put back."""

    def layer(n: str) -> int | None:
        parts = n.split(".")
        for i, p in enumerate(parts[:-1]):
            if p == "layers" and parts[i + 1].isdigit():
                return int(parts[i + 1])
        return None

    out = {
        "embeddings": [n for n in names if "embed" in n or "lm_head" in n],
        "attention": [n for n in names if ".self_attn." in n],
        "mlp": [n for n in names if ".mlp." in n],
        "norms": [n for n in names if "norm" in n],
    }
    third = math.ceil(layers / 3)
    for k in range(3):
        lo, hi = k * third, min(layers, (k + 1) * third)
        out[f"layers {lo}-{hi - 1}"] = [n for n in names if (lambda x: x is not None and lo <= x < hi)(layer(n))]
    return out


def margins(ip: ls.InProcess, questions: list[str], answers: list[list[int]], general: list[dict]) -> list[dict]:
    """Per question: the margins of its starting greedy answer ``answers`` teacher-forced on the live weights
    (log-prob of that answer's token minus the best other token's: negative where the live model would say
    something else), and the keyword's token position."""
    from livetrain.trainer.examples import prompt_ids

    t = ip.trainer
    out = []
    was = t.model.training
    t.model.eval()
    with torch.no_grad():
        for q, a, g in zip(questions, answers, general):
            p = prompt_ids(t.tokenizer, [{"role": "user", "content": q}])
            ids = torch.tensor([p + a], device=t.device)
            lp = torch.log_softmax(t.model(input_ids=ids).logits[0, len(p) - 1 : len(p) + len(a) - 1].float(), -1)
            chosen = lp.gather(1, torch.tensor(a, device=t.device)[:, None])[:, 0]
            other = lp.scatter(1, torch.tensor(a, device=t.device)[:, None], float("-inf")).max(-1).values
            m = (chosen - other).tolist()
            # The keyword's first token: the first answer prefix whose text makes the answer right.
            kw = None
            for i in range(1, len(a) + 1):
                if lq.general_ok(t.tokenizer.decode(a[:i], skip_special_tokens=True), g):
                    kw = i - 1
                    break
            out.append(
                {
                    "first": round(m[0], 3) if m else None,
                    "at_keyword": round(m[kw], 3) if kw is not None else None,
                    "min_to_keyword": round(min(m[: kw + 1]), 3) if kw is not None else None,
                    "keyword_token": kw,
                }
            )
    t.model.train(was)
    return out


def overlap(ip: ls.InProcess, general: list[dict], facts: list[dict]) -> list[tuple[float, str]]:
    """Per general question: (the largest IDF-weighted share of its tokens held by one fact's question, that
    question)."""
    from livetrain.trainer.examples import prompt_ids

    tok = ip.trainer.tokenizer
    fq = [q for f in facts for q, _ in f["train"]]
    docs = [set(prompt_ids(tok, [{"role": "user", "content": q}])) for q in fq + [g["q"] for g in general]]
    n = len(docs)
    df: dict[int, int] = {}
    for d in docs:
        for x in d:
            df[x] = df.get(x, 0) + 1
    idf = {x: math.log(n / c) for x, c in df.items()}
    out = []
    for g in general:
        gs = set(prompt_ids(tok, [{"role": "user", "content": g["q"]}]))
        total = sum(idf[x] for x in gs) or 1.0
        best = max(((sum(idf[x] for x in gs & docs[i]) / total, fq[i]) for i in range(len(fq))), default=(0.0, ""))
        out.append((round(best[0], 3), best[1]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--facts", type=int, default=4)
    p.add_argument("--jobs", default="plain,defaults", help="plain, defaults (comma-separated; empty: none)")
    p.add_argument("--steps", type=int, default=29, help="steps of the plain job (the CPU defaults' 4-fact count)")
    p.add_argument("--job", action="append", default=[], help="NAME=JSON: another job (its options over examples)")
    p.add_argument(
        "--restore",
        default="embeddings,attention,mlp,norms,layers",
        help="groups to put back one at a time after each job (layers: each third)",
    )
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", help="write everything here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    facts, general = lq.load(facts=a.facts)
    all_facts, _ = lq.load()
    examples = lq.examples(facts)
    t0 = time.perf_counter()
    ip = ls.InProcess(a.dtype, a.device, 8)
    t = ip.trainer
    print(f"# loaded in {time.perf_counter() - t0:.0f} s; {len(examples)} examples", flush=True)
    qs = [g["q"] for g in general]

    def ask() -> tuple[list[str], list[bool]]:
        ans = ip.ask(qs, a.max_tokens)
        return ans, [lq.general_ok(x, g) for x, g in zip(ans, general)]

    # 1. Before: answers, margins, overlap.
    from livetrain.trainer import guard
    from livetrain.trainer.examples import prompt_ids

    ids = [prompt_ids(t.tokenizer, [{"role": "user", "content": q}]) for q in qs]
    raw = guard.greedy(t.model, ids, a.max_tokens, guard.stop_ids(t.tokenizer, t.model), t.pad, batch=32)
    before = [t.tokenizer.decode(x, skip_special_tokens=True) for x in raw]
    right = [lq.general_ok(x, g) for x, g in zip(before, general)]
    mg = margins(ip, qs, [list(x) for x in raw], general)
    ov_sub = overlap(ip, general, facts)
    ov_all = overlap(ip, general, all_facts)
    result = {"facts": a.facts, "before": before, "right": right, "margins": mg, "overlap": ov_sub, "jobs": {}}
    print(f"# before: {sum(right)}/{len(general)} right", flush=True)

    # 2. Jobs, and the groups put back.
    start = ip.start  # the weights before any job (InProcess keeps them; nothing has moved them yet)
    layers = int(t.attached.config.get("num_hidden_layers") or 0)
    grp = groups(list(t.weights), layers)
    want = []
    for r in a.restore.split(","):
        want += [k for k in grp if k.startswith("layers ")] if r == "layers" else [r] if r else []
    jobs = {}
    for name in [j for j in a.jobs.split(",") if j]:
        if name == "plain":
            jobs[name] = {"examples": examples, "lr": 5e-5, "steps": a.steps, "guard": False}
        elif name == "defaults":
            jobs[name] = {"examples": examples}
        else:
            raise SystemExit(f"unknown job {name!r}")
    for spec in a.job:
        name, body = spec.split("=", 1)
        jobs[name] = {"examples": examples, **json.loads(body)}
    for name, body in jobs.items():
        ip.reset()
        if body.get("guard", True):
            ip.refresh()  # the retention answers of the starting weights, once (an unguarded job needs none)
        t0 = time.perf_counter()
        info = ip.job(body)
        job_s = time.perf_counter() - t0
        after, ok = ask()
        # The facts: each trained phrasing and the reworded question.
        fq = [(q, f) for f in facts for q, _ in f["train"]] + [(f["reworded"], f) for f in facts]
        fa = ip.ask([q for q, _ in fq], a.max_tokens)
        fok = [lq.fact_ok(x, f) for x, (_, f) in zip(fa, fq)]
        n_tr = 2 * len(facts)
        trained = {n: w.detach().clone() for n, w in t.weights.items()}
        norms = {}
        for k, names in grp.items():
            d2 = sum(float((trained[n].float() - start[n].float()).pow(2).sum()) for n in names)
            w2 = sum(float(start[n].float().pow(2).sum()) for n in names)
            norms[k] = round(math.sqrt(d2 / w2), 6) if w2 else None
        # Teacher-forced on the starting answers (cheap: a forward per question, no generation): an answer
        # right before stays right when every token up to its keyword stays the likeliest (margin > 0).
        answers = [list(x) for x in raw]
        held = [i for i in range(len(general)) if right[i]]

        def held_margins() -> dict[int, float]:
            m = margins(ip, [qs[i] for i in held], [answers[i] for i in held], [general[i] for i in held])
            return {i: x["min_to_keyword"] for i, x in zip(held, m)}

        after_m = held_margins()
        restored = {}
        for k in want:
            with torch.no_grad():
                for n in grp[k]:
                    t.weights[n].copy_(start[n])
            restored[k] = held_margins()
            with torch.no_grad():
                for n in grp[k]:
                    t.weights[n].copy_(trained[n])
        g = info.get("guard") or {}
        result["jobs"][name] = {
            "body": {k: v for k, v in body.items() if k != "examples"},
            "steps": info["step"],
            "stop_reason": info["stop_reason"],
            "kl": g.get("kl"),
            "job_s": round(job_s, 1),
            "trains": info.get("trains"),
            "facts_trained": sum(fok[:n_tr]),
            "facts_reworded": sum(fok[n_tr:]),
            "fact_answers": fa,
            "after": after,
            "right": ok,
            "margins_after": after_m,
            "update_norm": norms,
            "restored": restored,
        }
        lost = lq.lost(right, ok)
        flipped = [i for i in held if after_m[i] <= 0]
        print(
            f"# {name}: {info['step']} steps ({info['stop_reason']}), {job_s:.0f} s, KL {g.get('kl')}; trained "
            f"{sum(fok[:n_tr])}/{n_tr}, reworded {sum(fok[n_tr:])}/{len(facts)}; examples' loss "
            f"{info['loss_before']} -> {info['loss_after']}; "
            f"kept {len(held) - len(lost)}/{len(held)}; lost {lost}; starting answer no longer greedy up to its "
            f"keyword: {len(flipped)} {flipped}",
            flush=True,
        )
        print(
            "| group put back | relative update | starting answers greedy to the keyword | of the flipped, "
            "back | sum of min margins over the flipped |",
            flush=True,
        )
        print("|---|---|---|---|---|", flush=True)
        print(
            f"| none | - | {len(held) - len(flipped)}/{len(held)} | - | {sum(after_m[i] for i in flipped):.2f} |",
            flush=True,
        )
        for k in want:
            r = restored[k]
            back = [i for i in flipped if r[i] > 0]
            print(
                f"| {k} | {norms[k]} | {sum(1 for i in held if r[i] > 0)}/{len(held)} | {back} | "
                f"{sum(r[i] for i in flipped):.2f} |",
                flush=True,
            )

    # The per-question table.
    names = list(result["jobs"])
    print(
        "\n| # | question | right before | margin first / at keyword / min to it (before) | keyword token | overlap "
        f"(these facts / all 32) | {' | '.join(names)} |"
    )
    print("|---" * (7 + len(names)) + "|")
    for i, g in enumerate(general):
        m = mg[i]
        cells = []
        for n in names:
            ok = result["jobs"][n]["right"][i]
            m_after = result["jobs"][n]["margins_after"].get(i)
            cell = ("kept" if ok else "**lost**") if right[i] else ("gained" if ok else "-")
            cells.append(cell + (f" ({m_after:.2f})" if m_after is not None else ""))
        print(
            f"| {i} | {g['q']} | {'yes' if right[i] else 'no'} | {m['first']} / {m['at_keyword']} / "
            f"{m['min_to_keyword']} | {m['keyword_token']} | {ov_sub[i][0]} / {ov_all[i][0]} ({ov_all[i][1]}) "
            f"| {' | '.join(cells)} |",
            flush=True,
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
