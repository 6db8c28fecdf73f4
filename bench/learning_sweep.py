"""The measurements behind livetrain's learning defaults (docs/learning.md): the trainer in process, no
HTTP, on the default model, teaching bench/learning_data.json's facts with one setting after another, each
from the same starting weights (one guarded job per row, without a store: the guard measures and decides,
nothing is rolled back), then asking the trained questions, a reworded question per fact (never trained on)
and the general questions (batched greedy generation). Prints one markdown row per setting: steps, trained
/ reworded recall, general answers kept (of those right before), the guard's two measures on its held-out
retention prompts (KL divergence from the starting model, answers kept) and its verdict, the job's training
and guard seconds; ``--json`` appends each row as a JSON line.

The rows are a named grid (``--grid sweep2``: the candidates of issue #14, docs/learning.md) or the product
of the knobs (--lr × --warmup × --replay × --anchor × --select × --reword × --restate × --retention × --until ×
--train).
``retention`` "core" keeps only the built-in prompts that alternate between replay and held out (the 80 of
before), "all" adds the built-in replay-only ones (guard.builtin_replay); the held-out half is the same.

usage: python bench/learning_sweep.py [--grid sweep2|...|sweep7|sweep7b|sweep8] [--facts 32] [--lr 1e-4,5e-5]
           [--warmup 0] [--replay 0,2] [--anchor 0,1] [--select cycle,similar] [--reword 0,1] [--restate 0,1]
           [--retention all,core] [--until 0.1] [--train all,mlp] [--max-steps 300] [--device cuda --dtype bf16] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import learning_questions as lq  # noqa: E402
import torch  # noqa: E402


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


class InProcess:
    """The reference engine's weights exported into shared memory and a Trainer attached to them, in this
    process; ``reset`` puts the starting weights back and forgets the optimizer state."""

    def __init__(self, dtype: str, device: str, batch_size: int):
        from livetrain import default_model
        from livetrain.engines.reference import Engine
        from livetrain.trainer import options
        from livetrain.trainer.service import Trainer

        self.dir = tempfile.mkdtemp(prefix="livetrain-sweep-")
        self.reference = None  # the guard's reference of the last job that had one (``job``), for ``mixed``
        model_dir = default_model.ensure(dtype=dtype)
        manifest = os.path.join(self.dir, "engine.manifest.json")
        self.child = None
        if device.startswith("cuda"):
            # CUDA IPC handles cannot be opened by the process that exported them: the engine's weights live
            # in a child process (loaded and exported only, no HTTP), as in `livetrain serve`.
            import subprocess

            cmd = [sys.executable, os.path.abspath(__file__), "--engine-child", model_dir, manifest, device, dtype]
            self.child = subprocess.Popen(cmd, stdin=subprocess.PIPE)
            deadline = time.monotonic() + 600
            while not os.path.exists(manifest):
                if self.child.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"learning_sweep: the engine child exited ({self.child.poll()}) or timed out")
                time.sleep(0.2)
        else:
            self.engine = Engine(model_dir, manifest, device, dtype, store=False)
        settings = options.parse(
            # --guard-prepare job: each job's guard measures everything on its own path (this process has no
            # idle training thread), so that every row reports its answers kept.
            ["--no-store", "--state-dir", os.path.join(self.dir, "state"), "--batch-size", str(batch_size)]
            + ["--guard-prepare", "job"]
        )
        self.trainer = Trainer(manifest, model_dir, settings)
        self.start = {n: w.detach().clone() for n, w in self.trainer.weights.items()}
        self.version0 = self.trainer.weight_version

    def retention(self, which: str) -> None:
        """The built-in retention prompts of the next rows: "all", or "core" (no replay-only ones); the
        answers and the guard's measures are made again when they change (as PUT /train/retention does)."""
        from livetrain.trainer import guard

        r = self.trainer.retention
        want = guard.builtin_replay() if which == "all" else []
        if len(r.builtin_replay) != len(want):
            r.builtin_replay, r.version, r.answers = want, None, []
            self.trainer.prepared = None
        self.refresh()

    def refresh(self) -> None:
        """The retention answers on the starting weights, in batches of 64 on a GPU (16 on a CPU)."""
        t = self.trainer
        t0 = time.perf_counter()
        batch = 64 if t.device.type == "cuda" else 16
        if t.retention.refresh(t.model, t.weight_version, t.pad, batch=batch):
            print(f"# retention answers: {len(t.retention.prompts)} in {time.perf_counter() - t0:.0f} s", flush=True)

    def reset(self) -> None:
        with torch.no_grad():
            for n, w in self.trainer.weights.items():
                w.copy_(self.start[n])
        self.trainer.opt.reset_state()
        self.trainer.weight_version = self.version0  # the retention answers made at it stay valid

    def job(self, body: dict) -> dict:
        """Runs one /train job to its end on this thread; its /train/status entry. The guard's reference
        distributions of the starting weights (its KL's) are kept in ``self.reference`` (None: unguarded)."""
        t = self.trainer
        end = t._guard_end
        self.reference = None

        def keep_reference(jid, info, watch, undo, state):
            self.reference = watch["reference"]
            return end(jid, info, watch, undo, state)

        t._guard_end = keep_reference
        try:
            return self._job(body)
        finally:
            t._guard_end = end

    def _job(self, body: dict) -> dict:
        reply = self.trainer.submit(body)
        assert reply.code == 202, reply.body
        jid, job = self.trainer.queue.get_nowait()
        self.trainer.run_job(jid, job)
        return self.trainer.jobs[jid]

    def taught(self, body: dict, asked: list, facts: list, general: list, max_tokens: int = 24) -> tuple:
        """From the starting weights, one job of ``body`` run to its end, then ``asked``
        (learning_questions.questions) asked and scored: (the job's entry, the scores, seconds in all)."""
        self.reset()
        t0 = time.perf_counter()
        info = self.job(body)
        got = lq.score(asked, self.ask([q for _, q, _ in asked], max_tokens), facts, general)
        return info, got, time.perf_counter() - t0

    def mix(self, trained: dict, alpha: float) -> None:
        """The live weights to start + ``alpha`` × (``trained`` − start) (WiSE-FT, Wortsman et al. 2022): 1 is
        the job's end, 0 its start."""
        with torch.no_grad():
            for n, w in self.trainer.weights.items():
                w.copy_(self.start[n].float().lerp(trained[n].float(), alpha))

    def mixed(self, trained: dict, alpha: float, examples, asked, base, facts, general, max_tokens, until) -> dict:
        """The one measurement of a job's weights mixed back toward its start (bench/learning_interp.py, and
        sweep8's rows here): the live weights set to start + ``alpha`` × (``trained`` − start) (``mix``),
        ``asked`` (learning_questions.questions) asked and scored against ``base`` (the scores before any job),
        each example's loss teacher-forced (``losses``: how many under ``until``), and the guard's KL from the
        starting weights when the job had one (``reference``, kept by ``job``)."""
        t0 = time.perf_counter()
        self.mix(trained, alpha)
        answers = self.ask([q for _, q, _ in asked], max_tokens)
        got = lq.score(asked, answers, facts, general)
        kept, right = lq.kept(base["general"], got["general"])
        losses = self.losses(examples)
        reference = self.reference
        return {
            "alpha": alpha,
            "trained": sum(got["trained"]),
            "trained_asked": len(got["trained"]),
            "reworded": sum(got["reworded"]),
            "facts": len(facts),
            "general_kept": kept,
            "general_right_before": right,
            "general_lost": lq.lost_answers(asked, answers, base, got),
            "reworded_right": [i for i, ok in enumerate(got["reworded"]) if ok],
            "kl": round(reference.kl(self.trainer.model), 5) if reference is not None else None,
            "loss_max": round(max(losses), 4),
            "loss_mean": round(sum(losses) / len(losses), 4),
            "below_until": sum(1 for x in losses if x < until),
            "examples": len(losses),
            "seconds": round(time.perf_counter() - t0, 1),
        }

    def losses(self, examples: list[dict]) -> list[float]:
        """Each example's sequences' mean cross-entropy over their trained tokens on the live weights (nats per
        token, one per sequence, as ``until_loss`` reads them: one for most examples, one per assistant turn
        of a chat its template renders turn by turn; one forward each, teacher-forced)."""
        from livetrain.trainer import guard
        from livetrain.trainer.examples import encode_example

        t = self.trainer
        out = []
        with torch.no_grad(), guard._eval(t.model):
            for i, ex in enumerate(examples):
                for ids, mask, _ in encode_example(t.tokenizer, ex, f"examples[{i}]"):
                    lp = torch.log_softmax(
                        t.model(input_ids=torch.tensor([ids], device=t.device)).logits[0, :-1].float(), -1
                    )
                    nll = -lp.gather(1, torch.tensor(ids[1:], device=t.device)[:, None])[:, 0]
                    out.append(float(nll[torch.tensor(mask[1:], device=t.device)].mean()))
        return out

    def ask(self, questions: list[str], max_tokens: int) -> list[str]:
        from livetrain.trainer import guard
        from livetrain.trainer.examples import prompt_ids

        t = self.trainer
        ids = [prompt_ids(t.tokenizer, [{"role": "user", "content": q}]) for q in questions]
        out = guard.greedy(t.model, ids, max_tokens, guard.stop_ids(t.tokenizer, t.model), t.pad, batch=32)
        return [t.tokenizer.decode(a, skip_special_tokens=True) for a in out]


def cpu_probe(a) -> tuple[InProcess, list, list, list]:
    """What the CPU probes (learning_first_steps.py, learning_restate.py) start from: torch on ``a.threads``
    threads, the first ``a.facts`` facts, their examples and the trainer in process (fp32, batches of 64)."""
    torch.set_num_threads(a.threads)
    facts, general = lq.load(facts=a.facts)
    return InProcess("fp32", "cpu", 64), facts, general, lq.examples(facts)


def engine_child(model_dir: str, manifest: str, device: str, dtype: str) -> int:
    """The engine's weights on the GPU, exported for the trainer in the parent; lives until stdin closes."""
    from livetrain.engines.reference import Engine

    engine = Engine(model_dir, manifest, device, dtype, store=False)
    sys.stdin.read()
    engine.exported.close()
    return 0


# The candidates of issue #14 (docs/learning.md "How the defaults were chosen"), each one job from the start.
# The first H200 run (docs/learning.md) measured one-hot replay, the KL anchor at 1 (the default since) and
# the embeddings frozen; what it did not reach comes first here: the anchor's weight and sequences per step
# (the facts share templates with general questions, "the capital of X is ..."), the model rewording the
# questions, lr 1e-4, and a destructive job the guard must refuse. Keys left out take ROW's values. "sweep2"
# is what one GPU call of <= 8 min holds; "sweep2b" the rest.
ROW = {
    "lr": 5e-5,
    "warmup": 0,
    "replay": 2,
    "anchor": 0.0,
    "select": "cycle",
    "reword": False,
    "restate": False,
    "retention": "all",
    "until": 0.1,
    "max_steps": 300,
    "train": "all",
    "batch": None,  # the job's batch_size (None: the trainer's --batch-size, 8)
}
# Rows of sweep4 that its call's timeout cut, run again in sweep5.
_ANCHOR16 = {"name": "anchor16 r8 similar", "anchor": 16.0, "replay": 8, "select": "similar"}
_REWORD = {
    "name": "anchor4 r8 similar reword",
    "anchor": 4.0,
    "replay": 8,
    "select": "similar",
    "reword": True,
    "max_steps": 400,
}
_CORE = {"name": "anchor4 r8 similar core", "anchor": 4.0, "replay": 8, "select": "similar", "retention": "core"}

GRIDS = {
    "sweep2": [
        {"name": "anchor1", "anchor": 1.0},
        {"name": "destructive", "lr": 1e-3, "replay": 0, "steps": 30},
        {"name": "anchor1 reword", "anchor": 1.0, "reword": True},
        {"name": "anchor4 r4", "anchor": 4.0, "replay": 4},
        {"name": "anchor16 r8", "anchor": 16.0, "replay": 8},
        {"name": "lr1e-4 anchor1", "lr": 1e-4, "anchor": 1.0},
        {"name": "replay", "anchor": 0.0},
    ],
    "sweep2b": [
        {"name": "plain", "replay": 0},
        {"name": "replay8", "replay": 8},
        {"name": "lr1e-4 anchor4 r4", "lr": 1e-4, "anchor": 4.0, "replay": 4},
        {"name": "anchor1 u0.3", "anchor": 1.0, "until": 0.3},
        {"name": "replay reword", "reword": True},
    ],
    # After the anchor joined the batch's forward (its rows nearly free): more anchor rows per step, picked by
    # similarity to each step's prompts (replay_select "similar", trainer.schedule.Replayed: the template
    # interference the lead's probe saw), a stronger anchor over them (sweep2's anchor 4 and 16 were never
    # reached), the default again (its time with the shared forward), and rewording. Ordered by what is most
    # likely to raise "general kept" first: the call's timeout (450 s) may cut the last rows.
    "sweep3": [
        {"name": "anchor4 r8 similar", "anchor": 4.0, "replay": 8, "select": "similar"},
        {"name": "anchor16 r8 similar", "anchor": 16.0, "replay": 8, "select": "similar"},
        {"name": "anchor1 r8 similar", "anchor": 1.0, "replay": 8, "select": "similar"},
        {"name": "anchor1", "anchor": 1.0},
        {"name": "anchor1 r8", "anchor": 1.0, "replay": 8},
        {"name": "anchor4 r8 similar reword", "anchor": 4.0, "replay": 8, "select": "similar", "reword": True},
    ],
    # sweep3 never ran. With the built-in replay-only prompts (many question forms, guard.builtin_replay) and
    # "similar" as a greedy cover of the step's forms: the anchor at 4 over 8 rows per step, half of them of the
    # step's own forms (template interference: docs/learning.md); the same with a warm-up of 30 steps (on the
    # CPU one step at lr 5e-5 without replay already lost 7 of 26 general answers, and the anchor's gradient is
    # zero at the first step: the warm-up makes the first steps small), then with each answer also trained as
    # plain text (restate: the reworded recall); the anchor at 16; the model's rewordings; the 80 prompts of
    # before (whether the new ones are what helps). Rows 1-2 and 2-3 differ in one setting each. Most
    # informative first: the call's timeout cuts the last rows. The rows with more examples get a larger budget.
    "sweep4": [
        {"name": "anchor4 r8 similar", "anchor": 4.0, "replay": 8, "select": "similar"},
        {"name": "anchor4 r8 similar warmup30", "anchor": 4.0, "replay": 8, "select": "similar", "warmup": 30},
        {
            "name": "anchor4 r8 similar warmup30 restate",
            "anchor": 4.0,
            "replay": 8,
            "select": "similar",
            "warmup": 30,
            "restate": True,
            "max_steps": 400,
        },
        _ANCHOR16,
        _REWORD,
        _CORE,
    ],
    # sweep4's rows that never ran (its call's timeout cut the fourth at step 139), and lr 1e-4: each differs
    # from the defaults (sweep4's first row: 300 steps, the budget; 32/32 trained, 17/32 reworded, 23/27
    # general kept) in one setting, in this order: a stronger anchor (general kept); lr 1e-4 (every default
    # job ran out of its 300 steps with the worst example's loss at 0.17: a larger step reaches until_loss,
    # and a fact learned more firmly may be recalled under other words too); the model's own rewordings of
    # the questions trained too (reworded recall; budget 400: twice the examples); the 80 prompts of before
    # (whether the 313 replay-only ones are what kept 23 rather than 19). About 80-120 s a row on the H200.
    "sweep5": [
        _ANCHOR16,
        {"name": "lr1e-4 anchor4 r8 similar", "lr": 1e-4, "anchor": 4.0, "replay": 8, "select": "similar"},
        _REWORD,
        _CORE,
    ],
    # Rewording as an augmentation (issue #14): sweep5's rewording row got no rewordings (the model answered the
    # instruction's question); with the example rewordings before it (trainer.augment.EXAMPLES, bench/reword.py)
    # it gets some. The shipped defaults without and with it, both with the 400-step budget. ~100 s a row.
    "sweep6": [
        {**_REWORD, "name": "anchor4 r8 similar (defaults)", "reword": False},
        {**_REWORD, "name": "anchor4 r8 similar reword (examples)"},
    ],
    # Every example in every step (issue #14, bench/learning_forgetting.py, docs/learning.md "What a job loses"):
    # on the CPU a job whose steps each held a quarter of its examples (batches of 2 of 8) lost 16 of 26 general
    # answers where one batch of all 8 lost 8, for about the same update size (with 8 facts, halves against the
    # whole batch: 6 against 8 lost, no gain); the defaults' job on the H200 gives each step an eighth of its 64
    # examples and takes 367 steps (sweep6). Against the defaults in the same run: batches of 64, the same with
    # rewording (sweep6: 16 -> 23 of 32 reworded, but out of its 400-step budget), and training the MLPs alone
    # (the CPU's anchored default job: its attention put back brought 7 of its 10 flipped general answers back,
    # its MLPs 4, the embeddings none; plain jobs of the MLPs alone kept no more). The jsonl names each row's general
    # answers lost. On the H200 (17:07, at 19ee000) its 300 s held rows 1-2 (batch 64: 239 steps, 61 s of
    # training against the defaults' 367 and 96 s) and cut row 3 at step 230; sweep7b is rows 3-4.
    "sweep7": [
        {**_REWORD, "name": "anchor4 r8 similar (defaults)", "reword": False},
        {**_REWORD, "name": "batch 64", "reword": False, "batch": 64},
        {**_REWORD, "name": "batch 64 reword", "batch": 64},
        {**_REWORD, "name": "batch 64 train mlp", "reword": False, "batch": 64, "train": "mlp"},
    ],
}
# sweep7's rows that the 300 s of its H200 call did not hold (~4 minutes).
GRIDS["sweep7b"] = GRIDS["sweep7"][2:]
# Weight-space interpolation after the job (WiSE-FT, Wortsman et al. 2022; task vectors, Ilharco et al. 2023):
# each row's job once, then its weights mixed back toward the start, start + a × (end − start), at each a of
# "alphas", everything asked again at each (bench/learning_interp.py on the CPU). Every example in every step
# (sweep7: 24 against 22 of 27 kept), then the defaults. The in-process GPU job is deterministic: each row's own
# line repeated sweep7's. On the H200 (lead, 19:13, 290 s held both rows): no gain: a = 0.8 kept one general answer
# more and lost 5-6 reworded and a trained one; below it the facts go; at a = 0.5 (nothing learned) 3-5 of 27
# general answers were still lost (docs/learning.md "Mixing back").
ALPHAS = [0.8, 0.7, 0.6, 0.5]
GRIDS["sweep8"] = [
    {**_REWORD, "name": "batch 64", "reword": False, "batch": 64, "alphas": ALPHAS},
    {**_REWORD, "name": "defaults", "reword": False, "alphas": ALPHAS},
]
# sweep9 (learn28 at f94bf15, H200, the lead's run at 22:43; withdrawn since): the anchor's margin term, beta x the
# mean of max(0, m - the starting greedy token's logit lead) at each replayed answer's first token (job option
# "margin"), m = 1 on the defaults and on batch 64 + rewording: 400 steps (the budget) with 27/32 trained, 14/32
# reworded, 22/27 kept; and 32/32, 23/32, 20/27: no gain (docs/learning.md "The margin").


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--engine-child"]:
        return engine_child(*argv[1:5])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", choices=sorted(GRIDS), help="a named grid of rows instead of the knobs' product")
    p.add_argument("--facts", type=int, default=32, help="the first N facts of bench/learning_data.json")
    p.add_argument("--lr", type=floats, default=[5e-5])
    p.add_argument("--warmup", type=ints, default=[0])
    p.add_argument("--replay", type=ints, default=[2])
    p.add_argument("--anchor", type=floats, default=[0.0], help="KL anchor weights (0: one-hot replay)")
    p.add_argument(
        "--select",
        type=lambda s: s.split(","),
        default=["cycle"],
        help="replay_select of each job: cycle, similar (trainer.schedule.Replayed)",
    )
    p.add_argument("--reword", type=lambda s: [x == "1" for x in s.split(",")], default=[False], help="0,1")
    p.add_argument(
        "--restate", type=lambda s: [x == "1" for x in s.split(",")], default=[False], help="0,1 (trainer.augment)"
    )
    p.add_argument(
        "--retention",
        type=lambda s: s.split(","),
        default=["all"],
        help="built-in retention prompts: all, core (without the replay-only ones)",
    )
    p.add_argument("--until", type=floats, default=[0.1], help="until_loss of each job")
    p.add_argument(
        "--train",
        type=lambda s: s.split(","),
        default=["all"],
        help="which parameters each job trains: all, layers, mlp",
    )
    p.add_argument("--max-steps", type=int, default=300, help="budget of each job")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=24, help="tokens of each answer asked")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="append each row as a JSON line to this file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.grid:
        rows = [{**ROW, **r} for r in GRIDS[a.grid]]
    else:
        rows = [
            {
                **ROW,
                "name": "",
                "lr": lr,
                "warmup": w,
                "replay": r,
                "anchor": b,
                "select": c,
                "reword": x,
                "restate": y,
                "retention": z,
                "until": u,
                "train": tr,
            }
            for lr in a.lr
            for w in a.warmup
            for r in a.replay
            for b in a.anchor
            for c in a.select
            for x in a.reword
            for y in a.restate
            for z in a.retention
            for u in a.until
            for tr in a.train
        ]
        for r in rows:
            r["max_steps"] = a.max_steps

    facts, general = lq.load(facts=a.facts)
    examples = lq.examples(facts)
    asked = lq.questions(facts, general, both_phrasings=False)
    t0 = time.perf_counter()
    ip = InProcess(a.dtype, a.device, a.batch_size)
    print(f"# loaded in {time.perf_counter() - t0:.0f} s; {len(examples)} examples", flush=True)
    ip.retention(rows[0]["retention"] if rows else "all")
    t0 = time.perf_counter()
    base = lq.score(asked, ip.ask([q for _, q, _ in asked], a.max_tokens), facts, general)
    print(
        f"# before: trained {sum(base['trained'])}/{len(facts)}, reworded {sum(base['reworded'])}/{len(facts)}, "
        f"general {sum(base['general'])}/{len(general)} right; asked in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    header = (
        "| row | lr | batch | replay | anchor | select | retention | train | reword | restate | until | steps | trained | reworded "
        "| general kept | KL "
        "| answers kept "
        "| guard | train s | guard s | ask s |"
    )
    print(header + "\n" + "|---" * (header.count("|") - 1) + "|", flush=True)
    for r in rows:
        # The starting weights first: their weight version is the one the retention answers were made at, so
        # that they stay valid (made again on the trained weights of the row before, they were thrown away at
        # the job's start and made there once more, in the trainer's smaller batches: sweep4's rows 2-3 had
        # 35-38 s of guard time against row 1's 6.3 s).
        ip.reset()
        ip.retention(r["retention"])
        job = {
            "examples": examples,
            "lr": r["lr"],
            "warmup": r["warmup"],
            "replay": r["replay"],
            "anchor": r["anchor"],
            "replay_select": r["select"],
            "reword": r["reword"],
            "restate": r["restate"],
            "train": r["train"],
            "guard": True,
        }
        if r.get("batch"):
            job["batch_size"] = r["batch"]
        if "steps" in r:
            job["steps"] = r["steps"]
        else:
            job.update(until_loss=r["until"], max_steps=r["max_steps"])
        info = ip.job(job)
        g = info["guard"] or {}
        t0 = time.perf_counter()
        answers = ip.ask([q for _, q, _ in asked], a.max_tokens)
        got = lq.score(asked, answers, facts, general)
        ask_s = time.perf_counter() - t0
        kept, right = lq.kept(base["general"], got["general"])
        guard_s = g.get("seconds") or 0.0
        row = {
            **r,
            "reason": info["stop_reason"],
            "batch_size": info.get("batch_size"),
            "steps": info["step"],
            "trained": sum(got["trained"]),
            "reworded": sum(got["reworded"]),
            "facts": len(facts),
            "general_kept": kept,
            "general_right_before": right,
            "kl": g.get("kl"),
            "answers_kept": g.get("answers_kept"),
            "answers_compared": g.get("answers_compared"),
            "answers_kept_at": g.get("answers_kept_at"),
            "guard_passed": g.get("passed"),
            "reworded_examples": (info["reworded"] or {}).get("examples"),
            "reworded_questions": (info["reworded"] or {}).get("questions"),
            "loss_max": (info["losses"] or {}).get("max_after"),
            "train_s": round(info["seconds"] - guard_s, 1),
            "guard_s": round(guard_s, 2),
            "ask_s": round(ask_s, 1),
            # Per question, which general answers right before are lost and which were gained, with the
            # answers (bench/learning_forgetting.py's analysis across runs).
            "general_lost": lq.lost_answers(asked, answers, base, got),
            "general_right_before_idx": [i for i, ok in enumerate(base["general"]) if ok],
            "general_gained": [i for i, (b, g) in enumerate(zip(base["general"], got["general"])) if g and not b],
            "reworded_right": [i for i, ok in enumerate(got["reworded"]) if ok],
        }
        stop = "" if row["reason"] in ("until_loss", "steps") else f" ({row['reason']})"
        verdict = {True: "keep", False: "roll back", None: "-"}[row["guard_passed"]]
        until = f"{r['until']:g}" if "steps" not in r else f"{r['steps']} steps"
        print(
            f"| {r['name']} | {r['lr']:g} | {info.get('batch_size', '-')} | {r['replay']} | {r['anchor']:g} | {r['select']} | {r['retention']} "
            f"| {r['train']} "
            f"| {(info['reworded'] or {}).get('examples', '-')} | {info['restated'] if info['restated'] is not None else '-'} "
            f"| {until} "
            f"| {row['steps']}{stop} | {row['trained']}/{len(facts)} | {row['reworded']}/{len(facts)} "
            f"| {kept}/{right} | {row['kl']} | {row['answers_kept']}/{row['answers_compared']} | {verdict} "
            f"| {row['train_s']} | {row['guard_s']} | {row['ask_s']} |",
            flush=True,
        )
        if info["error"]:
            row["error"] = info["error"]
            print(f"#   {r['name']}: {info['state']}: {info['error']}", flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        if r.get("alphas"):
            mixed(ip, r, row, examples, asked, base, facts, general, a)
    return 0


def mixed(ip: InProcess, r: dict, row: dict, examples, asked, base, facts, general, a) -> None:
    """After a row's job: the weights mixed back toward the start, start + alpha × (end − start), for each alpha
    of ``r["alphas"]``, each asked everything again (a row of its own, "a=ALPHA": ``InProcess.mixed``), with the
    guard's KL from the starting weights and the examples' largest loss."""
    trained = {n: w.detach().clone() for n, w in ip.trainer.weights.items()}
    for alpha in r["alphas"]:
        m = ip.mixed(trained, alpha, examples, asked, base, facts, general, a.max_tokens, r["until"])
        sub = {"name": f"{r['name']} a={alpha:g}", "of": r["name"], "steps": row["steps"], **m}
        print(
            f"| {sub['name']} | | | | | | | | | | | {row['steps']} | {m['trained']}/{len(facts)} "
            f"| {m['reworded']}/{len(facts)} | {m['general_kept']}/{m['general_right_before']} | {m['kl']} "
            f"| (examples below {r['until']:g}: {m['below_until']}/{m['examples']}, worst {m['loss_max']}) "
            f"| | | | {m['seconds']} |",
            flush=True,
        )
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(sub) + "\n")


if __name__ == "__main__":
    sys.exit(main())
