"""Tensor-parallel training against TP 1: N trainer rank processes over gloo, each on its own engine rank's
shards (vLLM's layout), train a tiny model on the same batch as one process trains the whole model; the
loss, every gradient and every weight after APOLLO-Mini steps agree within the stated bounds, parameters
that several ranks hold are bit-identical on each of them, and the optimizer's phases are checked against
its whole step on their own (CPU here; the CUDA phases against the CPU ones on a GPU).

Bounds. fp32 weights: the ranks sum partial products and norms in another order than one process does,
so gradients and updates agree to float rounding (relative error 1e-4 of their norm). bf16 weights: every
activation and gradient is rounded to bf16 (2^-8 relative), and the partial sums of the ranks are rounded
before they are summed, so the gradients themselves differ by about 1e-2 of their norm; the update's
stochastic rounding uses the same offsets at TP N as at TP 1 (keyed by the full tensor's element), so a
weight element moves to another bf16 value only where its fp32 value before rounding moved across a rounding
step (one ulp); Adam's first steps are nearly sign(g)·lr, so a gradient element near zero whose sign the
bf16 noise flips moves its weight by up to 2 lr per step the other way. The bf16 test states its bounds.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from livetrain import _core
from livetrain import safetensors as lst
from livetrain.trainer.client import free_port

import tiny_model
import tp_ranks
from servers import ENV

HERE = Path(__file__).resolve().parent
CUDA = torch.cuda.is_available()
VOCAB = 160  # padded to 192: at TP 4, rank 3 holds 16 rows (uneven shards, padding on the last rank)


def make_model(d: Path, kind: str, dtype: torch.dtype) -> dict:
    """A random tiny model of ``kind`` (llama with biases everywhere, qwen3 with q/k norms) in ``d/model``,
    and a batch of two sequences with masked labels and example weights."""
    torch.manual_seed(0)
    common = tiny_model.tiny_sizes(VOCAB, pad_token_id=3)
    if kind == "qwen3":
        config = transformers.Qwen3Config(head_dim=16, **common)
    else:
        config = transformers.LlamaConfig(attention_bias=True, mlp_bias=True, **common)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)  # not zeros and ones: their gradients and updates count
    model.save_pretrained(d / "model")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 11), generator=g)  # 22 tokens: at TP 4, 6 rows a rank, 2 padding
    ids[1, 9:] = 3  # padding
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 9:] = -100
    (d / "batch.json").write_text(json.dumps({"ids": ids.tolist(), "labels": labels.tolist(), "weights": [1.0, 0.5]}))
    return json.loads((d / "model" / "config.json").read_text())


def run_ranks(d: Path, size: int, timeout: float = 600) -> None:
    """The SIZE ranks of tp_ranks.py (forked by one process that imports torch once)."""
    env = dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, str(HERE / "tp_ranks.py"), str(d), str(size)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
    )
    assert p.returncode == 0, f"{p.returncode} of {size} ranks failed:\n{p.stdout.decode(errors='replace')[-6000:]}"


def assemble(d: Path, size: int, prefix: str) -> dict[str, torch.Tensor]:
    """The full tensors from every rank's parts; a block several ranks hold must be the same on each."""
    full: dict[str, torch.Tensor] = {}
    filled: dict[str, torch.Tensor] = {}
    for r in range(size):
        tensors = lst.load_file(d / f"rank-{r}.safetensors")
        shards = json.loads((d / f"rank-{r}.json").read_text())["shards"]
        for name, (shape, dim, segments, _) in shards.items():
            x = tensors[f"{prefix}.{name}"]
            if name not in full:
                full[name] = torch.zeros(shape, dtype=x.dtype)
                filled[name] = torch.zeros(shape, dtype=torch.bool)
            parts = [(slice(None), x)] if dim < 0 else []
            offset = 0
            for start, length in segments if dim >= 0 else []:
                parts.append(((dim, start, length), x.narrow(dim, offset, length)))
                offset += length
            for where, part in parts:
                dst = full[name] if where == slice(None) else full[name].narrow(*where)
                seen = filled[name] if where == slice(None) else filled[name].narrow(*where)
                if seen.any():
                    assert torch.equal(dst, part), f"{prefix} {name}: rank {r}'s copy differs from another rank's"
                dst.copy_(part)
                seen.fill_(True)
    for name, seen in filled.items():
        assert seen.all(), f"{prefix} {name}: no rank holds some of its elements"
    return full


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def _setup(tmp_path: Path, kind: str, dtype, steps: int, **job) -> tuple[Path, dict]:
    d = tmp_path / kind
    d.mkdir()
    config = make_model(d, kind, dtype)
    (d / "job.json").write_text(json.dumps({"lr": 1e-3, "steps": steps, **job}))
    tp_ranks.run_tp1(d)
    return d, config


def _tp1(d: Path):
    return lst.load_file(d / "rank-tp1.safetensors"), json.loads((d / "rank-tp1.json").read_text())


@pytest.mark.parametrize("size, sequence_parallel", [(2, True), (4, True), (2, False)])
def test_fp32_loss_gradients_and_weights_equal_tp1(tmp_path, size, sequence_parallel):
    """Llama with every bias (q/k/v sharded, o_proj and down_proj replicated after the sum), fp32: the loss,
    all gradients and the weights after 3 APOLLO-Mini steps (embeddings on APOLLO) equal TP 1's to float
    rounding (1e-4 of their norm; updates 1e-3), with the residual stream split by tokens (sequence
    parallelism: the trainer's; at TP 4 the batch's 22 tokens are 6 rows a rank, the last 2 padding) and
    without (replicated: the plain Megatron pattern)."""
    d, _ = _setup(tmp_path, "llama", torch.float32, steps=3, sequence_parallel=sequence_parallel)
    tp1, info1 = _tp1(d)
    before = lst.load_file(d / "model" / "model.safetensors")
    run_ranks(d, size)
    infos = [json.loads((d / f"rank-{r}.json").read_text()) for r in range(size)]
    hidden = tp1["weight.model.embed_tokens.weight"].shape[1]
    for info in infos:  # what each decoder layer receives (and keeps for recomputation)
        assert info["stream"][0] == ([1, -(-22 // size), hidden] if sequence_parallel else [2, 11, hidden])
    for info in infos:
        assert info["skipped"] == []
        for a, b in zip(info["losses"], info1["losses"]):
            assert a == pytest.approx(b, rel=1e-5)
    assert infos[0]["losses"][-1] < infos[0]["losses"][0]  # it trained
    grads, weights = assemble(d, size, "grad"), assemble(d, size, "weight")
    for name, g in grads.items():
        assert rel_err(g, tp1[f"grad.{name}"]) < 1e-4, name
    for name, w in weights.items():
        change = tp1[f"weight.{name}"].double() - before[name].double()
        assert float(change.norm()) > 0, f"{name} did not change at TP 1"
        if name.endswith("k_proj.bias"):
            # No gradient in exact arithmetic (a constant added to every key shifts all of a query's scores
            # alike, which softmax ignores): its gradient is rounding noise (~1e-9), which AdamW's first
            # steps (nearly sign(g)·lr) turn into updates that any other rounding changes.
            continue
        assert rel_err(w.double() - before[name].double(), change) < 1e-3, name
    check_state_reshards(d, size)


def _local_shape(sh) -> list[int]:
    shape = list(sh.full_shape)
    if sh.dim >= 0:
        shape[sh.dim] = sum(length for _, length in sh.segments)
    return shape


def _state_of(opt, names) -> dict[str, dict[str, torch.Tensor]]:
    return {names[p]: {f: st[f].clone() for f in ("m", "v", "step")} for p, st in opt.state.items() if "m" in st}


def check_state_reshards(d: Path, size: int) -> None:
    """The ranks' optimizer states loaded at TP 1 equal TP 1's own state (moments within 1e-4 of their
    norm, the step counts equal); TP 1's loaded into each rank's parts equal that rank's own."""
    from livetrain.optim import ApolloMini, ParamShard

    full = lst.load_file(d / "model" / "model.safetensors")
    params = {n: torch.nn.Parameter(t.clone()) for n, t in full.items()}
    names = {p: n for n, p in params.items()}

    def optimizer(ps: dict, shards: dict | None = None):
        groups = [{"params": [p for n, p in ps.items() if p.dim() == 2], "algo": "apollo"},
                  {"params": [p for n, p in ps.items() if p.dim() != 2], "algo": "adamw"}]  # fmt: skip
        opt = ApolloMini(groups)
        if shards is not None:
            opt.tensor_parallel(object(), shards)  # the group is not used by load_state
        return opt

    own = optimizer(params)
    own.load_state(d / "rank-tp1.optim.safetensors", names)
    resharded = optimizer(params)
    resharded.load_state([d / f"rank-{r}.optim.safetensors" for r in range(size)], names)
    a, b = _state_of(own, names), _state_of(resharded, names)
    assert a.keys() == b.keys() and a
    for n in a:
        assert torch.equal(a[n]["step"], b[n]["step"]), n
        for f in ("m", "v"):
            assert rel_err(b[n][f], a[n][f]) < 1e-4, f"{n}.{f}"
    for r in range(size):
        info = json.loads((d / f"rank-{r}.json").read_text())["shards"]
        by_name = {n: ParamShard(tuple(s[0]), s[1], tuple(map(tuple, s[2])), s[3]) for n, s in info.items()}
        parts = {n: torch.nn.Parameter(torch.zeros(_local_shape(sh))) for n, sh in by_name.items()}
        pnames = {p: n for n, p in parts.items()}
        shards = {p: by_name[n] for n, p in parts.items()}
        mine, from_tp1 = optimizer(parts, shards), optimizer(parts, shards)
        mine.load_state(d / f"rank-{r}.optim.safetensors", pnames)
        from_tp1.load_state(d / "rank-tp1.optim.safetensors", pnames)
        a, b = _state_of(mine, pnames), _state_of(from_tp1, pnames)
        for n in a:
            for f in ("m", "v"):
                assert rel_err(b[n][f], a[n][f]) < 1e-4, f"rank {r} {n}.{f}"


def test_bf16_qwen3_replicated_kv_heads_with_gradient_checkpointing(tmp_path):
    """Qwen3 (q_norm, k_norm), bf16, TP 4 over 2 KV heads (each KV head held by two ranks, their gradients
    summed between them), gradient checkpointing on, embeddings on AdamW, 3 steps at lr 1e-3. Bounds (the
    module's docstring says why): the losses within 2e-3 relative; each gradient within 3e-2 of TP 1's norm
    (bf16 activations and gradients rounded at 2^-8 each, summed over ranks in another order; seen: 1-2e-2);
    every weight element within one bf16 ulp of TP 1's plus 2 lr per step (Adam turns a gradient element
    near zero whose sign differs into an update of opposite sign; seen: 2.2 lr after 3 steps); the
    APOLLO-Mini matrices within 0.1 of TP 1's change in norm (seen: 2-4e-2)."""
    steps, lr = 3, 1e-3
    d, _ = _setup(tmp_path, "qwen3", torch.bfloat16, steps=steps, lr=lr, grad_checkpointing=True, embeddings="adamw")
    tp1, info1 = _tp1(d)
    before = lst.load_file(d / "model" / "model.safetensors")
    run_ranks(d, 4)
    info = json.loads((d / "rank-0.json").read_text())
    assert info["skipped"] == []
    for a, b in zip(info["losses"], info1["losses"]):
        assert a == pytest.approx(b, rel=2e-3)
    # Ranks 1 and 3 hold a KV head that ranks 0 and 2 hold too: not the primary holders.
    secondary = json.loads((d / "rank-1.json").read_text())["shards"]
    assert not secondary["model.layers.0.self_attn.k_proj.weight"][3]
    assert secondary["model.layers.0.self_attn.q_proj.weight"][3]
    for name, g in assemble(d, 4, "grad").items():
        assert rel_err(g, tp1[f"grad.{name}"]) < 3e-2, name
    for name, w in assemble(d, 4, "weight").items():
        ref, w0, w = tp1[f"weight.{name}"].double(), before[name].double(), w.double()
        ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)
        excess = float(((w - ref).abs() - ulp).max())
        assert excess <= 2 * lr * steps, f"{name}: {excess / lr:.2f} lr beyond one ulp of TP 1's"
        if w.dim() == 2 and "embed" not in name and "lm_head" not in name:  # APOLLO-Mini's
            assert rel_err(w - w0, ref - w0) < 0.1, name


# ---- the optimizer's phases on their own (no processes): each rank's part, sums by hand ----


def _shards_of(full: int, size: int, pieces: int = 1):
    blocks = size * pieces
    return [
        [(full * b // blocks, full * (b + 1) // blocks - full * b // blocks) for b in range(r, blocks, size)]
        for r in range(size)
    ]


def _part(x: torch.Tensor, dim: int, segments) -> torch.Tensor:
    return torch.cat([x.narrow(dim, s, n) for s, n in segments], dim)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("device", ["cpu", "cuda"] if CUDA else ["cpu"])
def test_adamw_shards_equal_the_whole_step(device, dim):
    """AdamW on parts of a 3-d tensor (conv1d's shape) with clipping: ‖G‖² summed over ranks, rounding
    offsets keyed by the full tensor's elements: the parts' bf16 weights are the whole step's, bit for bit."""
    from livetrain.optim import Apollo, ParamShard

    torch.manual_seed(0)
    full_w = (torch.randn(24, 12, 5) * 0.1).to(torch.bfloat16).to(device)
    size = 3
    segs = _shards_of(full_w.shape[dim], size, pieces=2)
    whole = torch.nn.Parameter(full_w.clone())
    parts = [torch.nn.Parameter(_part(full_w, dim, s).clone()) for s in segs]
    opt1 = Apollo([whole], lr=1e-2, algo="adamw", max_grad_norm=1.0)
    opts = [Apollo([p], lr=1e-2, algo="adamw", max_grad_norm=1.0) for p in parts]
    sums = []
    for r, (o, p) in enumerate(zip(opts, parts)):
        o._shards[id(p)] = ParamShard(tuple(full_w.shape), dim, tuple(segs[r]))
        o._all_reduce = sums.append  # the ranks' ‖G‖², summed below before any rank's update
    for _ in range(3):
        g = torch.randn(full_w.shape, device=device)
        opt1.step_param(whole, g)
        # Each rank's ‖G‖² first, then the steps with the sum: run rank by rank with the sum known in advance.
        total = float((g.double() ** 2).sum())
        for r, (o, p) in enumerate(zip(opts, parts)):
            o._all_reduce = lambda t: t.fill_(total)
            o.step_param(p, _part(g, dim, segs[r]).contiguous())
    for r, p in enumerate(parts):
        assert torch.equal(p.detach(), _part(whole.detach(), dim, segs[r])), f"rank {r}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_rms_norm_equals_transformers_and_keeps_less(dtype):
    """The trainer's RMSNorm (tensor_parallel._RMSNorm): the same forward as transformers' Qwen3RMSNorm bit
    for bit, gradients within rounding (fp32: 1e-5 of their norm; bf16: 1e-2, one rounding of 2^-8 in
    other places), and at most a third (bf16; fp32: half) of the bytes kept for backward (its input, not an
    fp32 copy and the normalized rows)."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from livetrain import tensor_parallel

    torch.manual_seed(0)
    x0 = torch.randn(3, 7, 40).to(dtype)
    grad = torch.randn(3, 7, 40).to(dtype)
    w0 = 1 + 0.1 * torch.randn(40)
    results = []
    for lean in (False, True):
        norm = Qwen3RMSNorm(40, eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(w0)
        if lean:
            tensor_parallel._lean_norms(norm)
        x = x0.clone().requires_grad_(True)
        kept = {}

        def pack(t):
            kept[t.data_ptr()] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = norm(x)
        y.backward(grad)
        results.append((y.detach(), x.grad, norm.weight.grad, sum(kept.values())))
    (y1, gx1, gw1, kept1), (y2, gx2, gw2, kept2) = results
    assert torch.equal(y1, y2)
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(gx2, gx1) < bound and rel_err(gw2, gw1) < bound
    # transformers keeps the input in fp32 and the normalized rows (bf16: 6 bytes an element, fp32: 8), this
    # the input (2 or 4); both the per-row floats and the weight besides.
    extra = 3 * 7 * 4 + 40 * norm.weight.element_size()
    assert kept2 <= kept1 / (3 if dtype == torch.bfloat16 else 2) + extra, (kept2, kept1)


def test_a_summed_whole_parameter_steps_without_a_collective():
    """A parameter every rank holds whole whose gradient the model already summed over the ranks
    (ParamShard.summed: the layer norms under sequence parallelism) steps as at TP 1, bit for bit, with no
    collective of its own; one whose gradient was not summed still passes one (its ‖G‖²'s maximum) first."""
    from livetrain.optim import Apollo, ParamShard

    torch.manual_seed(0)
    w = (torch.randn(40) * 0.1).to(torch.bfloat16)
    g = torch.randn(40)
    whole, summed, gated = (torch.nn.Parameter(w.clone()) for _ in range(3))
    alone = Apollo([whole], lr=1e-2, algo="adamw")
    alone.step_param(whole, g)
    calls = []
    for p, shard in ((summed, ParamShard((40,), summed=True)), (gated, ParamShard((40,)))):
        opt = Apollo([p], lr=1e-2, algo="adamw")
        opt.tensor_parallel(object(), {p: shard})
        opt._all_reduce = lambda t, max=False, p=p: calls.append(p)  # one rank: the sum is its own value
        opt.step_param(p, g)
    assert torch.equal(summed.detach(), whole.detach())
    assert torch.equal(gated.detach(), whole.detach())
    assert [c is gated for c in calls] == [True]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "rows,cols,dim,rank",
    [(96, 40, 0, 1), (96, 40, 1, 1), (40, 96, 0, 1), (40, 100, 1, 1), (96, 40, 1, 4), (40, 96, 0, 4)],
)
def test_cuda_phases_equal_cpu_phases(rows, cols, dim, rank):
    """Each phase of a shard's step on CUDA against the CPU's, shard by shard, sums by hand in between: fp32
    weights within 1e-5, moments within 1e-5 relative."""
    torch.manual_seed(0)
    size = 2
    segs = _shards_of(rows if dim == 0 else cols, size, pieces=2)
    full_shape = (rows, cols)
    h = _core.ApolloHyper()
    h.rank, h.lr, h.scaling = rank, 1e-3, _core.Scaling.tensor if rank == 1 else _core.Scaling.channel
    W = torch.randn(rows, cols) * 0.02
    results = {}
    for device in ("cpu", "cuda"):
        ranks = []
        for r in range(size):
            w = _part(W, dim, segs[r]).contiguous().to(device)
            lr_, lc = w.shape
            shard = (dim, full_shape[dim], [tuple(s) for s in segs[r]], True)
            nbytes, first, nfirst, second, nsecond = _core.apollo_phase_layout(lr_, lc, rank, shard)
            channels = lr_ if rows >= cols else lc
            st = dict(
                w=w, m=torch.zeros(channels * rank, device=device), v=torch.zeros(channels * rank, device=device),
                prev=torch.full((1,), -1.0, device=device), status=torch.zeros(1, dtype=torch.int32, device=device),
                step=torch.zeros(1, dtype=torch.int64, device=device), ws=torch.zeros(nbytes, dtype=torch.uint8, device=device),
                shard=shard, regions=((first, nfirst), (second, nsecond)),
            )  # fmt: skip
            ranks.append(st)
        g_all = torch.Generator().manual_seed(5)
        for _ in range(3):
            G = torch.randn(rows, cols, generator=g_all)
            grads = [_part(G, dim, segs[r]).contiguous().to(device) for r in range(size)]
            for phase, k in (
                (_core.ApolloPhase.project, 0),
                (_core.ApolloPhase.moments, 1),
                (_core.ApolloPhase.update, None),
            ):
                for st, g in zip(ranks, grads):
                    stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else 0
                    w = st["w"]
                    _core.apollo_phase(
                        phase, w.data_ptr(), "F32", w.stride(0), g.data_ptr(), "F32", w.shape[0], w.shape[1],
                        st["m"].data_ptr(), st["v"].data_ptr(), st["prev"].data_ptr(), st["status"].data_ptr(),
                        st["step"].data_ptr(), 7, st["ws"].data_ptr(), h, st["shard"], device == "cuda", stream,
                    )  # fmt: skip
                if k is not None:
                    off, n = ranks[0]["regions"][k]
                    if n:
                        total = sum(st["ws"].view(torch.float32)[off : off + n] for st in ranks)
                        for st in ranks:
                            st["ws"].view(torch.float32)[off : off + n] = total
        results[device] = [(st["w"].cpu(), st["m"].cpu()) for st in ranks]
    for (wc, mc), (wg, mg) in zip(results["cpu"], results["cuda"]):
        assert torch.allclose(wg, wc, rtol=1e-5, atol=1e-7)
        assert rel_err(mg, mc) < 1e-5


def test_bad_shards_are_refused_naming_the_field():
    """A shard that does not fit its part is refused before any memory is touched (the addresses here are
    never read), and a parameter the optimizer is told is a shard must have the part's shape."""
    from livetrain.optim import ApolloMini, ParamShard

    h = _core.ApolloHyper()
    bad = (0, 6, [(4, 4)], True)  # rows 4..8 of a dim of 6
    with pytest.raises(_core.InvalidArgumentError, match="not inside the full size 6"):
        _core.apollo_phase(
            _core.ApolloPhase.project, 1, "F32", 8, 1, "F32", 4, 8, 1, 1, 1, 1, 1, 0, 1, h, bad, False, 0
        )
    with pytest.raises(_core.InvalidArgumentError, match="hold 2 indices of dim 0, the part has 4"):
        _core.apollo_phase(
            _core.ApolloPhase.project,
            1,
            "F32",
            8,
            1,
            "F32",
            4,
            8,
            1,
            1,
            1,
            1,
            1,
            0,
            1,
            h,
            (0, 6, [(0, 2)], True),
            False,
            0,
        )
    p = torch.nn.Parameter(torch.zeros(4, 8))
    opt = ApolloMini([p])
    with pytest.raises(ValueError, match="not the part"):
        opt.tensor_parallel(None, {p: ParamShard((6, 8), 0, ((0, 3),))})
