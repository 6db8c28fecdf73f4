"""APOLLO / APOLLO-Mini / AdamW in the livetrain core: the CPU step against a float64 reference written from
the paper's pseudo-code, the non-finite guard, stochastic rounding, reproducibility, hooks, state save and
restore, convergence on a tiny language model, and (on a GPU) the CUDA step against the CPU step."""

import math

import numpy as np
import pytest
import torch

import livetrain
from livetrain import _core
from livetrain.optim import Apollo, ApolloMini, param_groups

CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------
# float64 reference, written from docs/optim.md (the paper's Algorithm 1 as the official code runs it)
# ---------------------------------------------------------------------------------------------------
class Reference:
    def __init__(
        self,
        shape,
        rank,
        lr,
        betas=(0.9, 0.999),
        eps=1e-6,
        wd=0.0,
        gap=200,
        scale=1.0,
        scaling="channel",
        limiter=True,
        max_grad_norm=0.0,
        seed=1,
    ):
        self.m_, self.n_ = shape
        self.r, self.lr, self.b1, self.b2, self.eps, self.wd = rank, lr, betas[0], betas[1], eps, wd
        self.gap, self.scale, self.scaling, self.limiter, self.clip = gap, scale, scaling, limiter, max_grad_norm
        self.seed, self.t, self.prev = seed, 0, None
        K = max(shape)
        self.M = np.zeros((K, rank))
        self.V = np.zeros((K, rank))

    def projection(self):
        rows, cols = self.m_, self.n_
        k = cols if rows >= cols else rows
        p = torch.empty(k * self.r, dtype=torch.float32)
        _core.apollo_projection(p.data_ptr(), rows, cols, self.r, self.seed, self.t, self.gap)
        p = p.double().numpy()
        return p.reshape(self.r, cols) if rows >= cols else p.reshape(rows, self.r)

    def step(self, W, G):
        G = G.astype(np.float64)
        total = float((G * G).sum())
        c = 1.0
        if self.clip > 0 and math.sqrt(total) > self.clip:
            c = self.clip / math.sqrt(total)
        P = self.projection()
        tall = self.m_ >= self.n_
        R = (G @ P.T) if tall else (P.T @ G).T  # [K, r], channel-major
        R = R * c
        self.t += 1
        self.M = self.b1 * self.M + (1 - self.b1) * R
        self.V = self.b2 * self.V + (1 - self.b2) * R * R
        Rt = self.M / (np.sqrt(self.V) + self.eps)
        step = self.lr * math.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        if self.scaling == "channel":
            s = np.linalg.norm(Rt, axis=1) / (np.linalg.norm(R, axis=1) + 1e-8)
            U = (G * c) * (s[:, None] if tall else s[None, :])
        else:
            s = np.linalg.norm(Rt) / (np.linalg.norm(R) + 1e-8)
            U = G * c * s
        if self.limiter:
            nu = np.linalg.norm(U)
            if self.prev is not None:
                lim = max(nu / (self.prev + 1e-8), 1.01) / 1.01
                U = U / lim
                self.prev = nu / lim
            else:
                self.prev = nu
        U = U * math.sqrt(self.scale)
        W = W - step * U
        if self.wd:
            W = W - self.lr * self.wd * W
        return W


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 values around x (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.abs())) - 7)


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


SHAPES = [(769, 5125, 4), (1, 300, 1), (300, 1, 1), (301, 37, 8), (37, 301, 8), (64, 64, 64)]


@pytest.mark.parametrize("rows,cols,rank", SHAPES)
@pytest.mark.parametrize("variant", ["apollo", "mini"])
def test_cpu_step_matches_float64_reference_over_50_steps(rows, cols, rank, variant):
    if variant == "mini":
        rank = 1
    gen = torch.Generator().manual_seed(rows * 7 + cols)
    W0 = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 0.5
    w = torch.nn.Parameter(W0.float().clone())
    kw = dict(lr=2e-2, weight_decay=0.01, update_proj_gap=20, max_grad_norm=50.0)
    if variant == "mini":
        opt = ApolloMini([w], seed=3, **kw)
        ref = Reference(
            (rows, cols),
            1,
            scale=128.0,
            scaling="tensor",
            seed=opt._state(w, opt.param_groups[0])["seed"],
            gap=20,
            lr=2e-2,
            wd=0.01,
            max_grad_norm=50.0,
        )
    else:
        opt = Apollo([w], rank=rank, seed=3, **kw)
        ref = Reference(
            (rows, cols),
            rank,
            seed=opt._state(w, opt.param_groups[0])["seed"],
            gap=20,
            lr=2e-2,
            wd=0.01,
            max_grad_norm=50.0,
        )
    W = W0.numpy().copy()
    for t in range(50):
        # Gradients that grow and shrink, so the limiter and the clipping both act.
        G = torch.randn(rows, cols, generator=gen) * (1.0 + 0.5 * math.sin(t))
        w.grad = G.clone()
        opt.step()
        W = ref.step(W, G.numpy())
    state = opt.state[w]
    assert opt.report()["ok"] == 1 and int(state["step"]) == 50
    assert rel(w.detach().numpy(), W) < 1e-6
    assert rel((w.detach().double().numpy() - W0.numpy()), W - W0.numpy()) < 1e-4  # the change itself
    K = max(rows, cols)
    assert rel(state["m"].numpy().reshape(K, rank), ref.M) < 1e-5
    assert rel(state["v"].numpy().reshape(K, rank), ref.V) < 1e-5
    assert abs(float(state["prev_norm"]) - ref.prev) / ref.prev < 1e-5


def test_projection_is_gaussian_and_refreshes_every_gap():
    def proj(step, seed=5, rows=4096, cols=64, rank=8):
        p = torch.empty(cols * rank)
        _core.apollo_projection(p.data_ptr(), rows, cols, rank, seed, step, 10)
        return p

    a, b, c = proj(0), proj(9), proj(10)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(proj(0, seed=6), a)
    big = torch.cat([proj(s * 10) for s in range(50)]).double()
    # N(0, 1/rank): mean 0, variance 1/8, kurtosis 3 (25,600 samples)
    assert abs(big.mean()) < 4 * math.sqrt(1 / 8 / big.numel())
    assert abs(big.var() - 1 / 8) < 0.01
    assert abs(((big - big.mean()) ** 4).mean() / big.var() ** 2 - 3) < 0.15


def test_nonfinite_gradient_writes_nothing():
    for opt_cls, shape in ((ApolloMini, (33, 65)), (Apollo, (65, 33)), (Apollo, (7,))):
        w = torch.nn.Parameter(torch.randn(*shape).to(torch.bfloat16))
        kw = {"rank": 4} if opt_cls is Apollo else {}
        opt = opt_cls([w], lr=1e-2, **kw)
        w.grad = torch.randn_like(w)
        opt.step()
        before = {k: v.clone() for k, v in opt.state[w].items() if isinstance(v, torch.Tensor)}
        wb = w.detach().clone()
        for bad in (float("nan"), float("inf")):
            g = torch.randn_like(w)
            g.view(-1)[g.numel() // 2] = bad
            w.grad = g
            opt.step()
            assert torch.equal(w.detach().view(torch.int16), wb.view(torch.int16)), "weights changed"
            for k, v in before.items():
                if k != "status":
                    assert torch.equal(opt.state[w][k], v), k
            assert len(opt.report()["skipped_nonfinite_grad"]) == 1


def test_stochastic_rounding_is_unbiased_and_nearest_is_exact():
    torch.manual_seed(0)
    n, draws = 64, 600
    w0 = torch.randn(n, 1).to(torch.bfloat16)
    g = torch.randn(n, 1)
    results = []
    for seed in range(draws):
        w = torch.nn.Parameter(w0.clone())
        opt = Apollo([{"params": [w], "algo": "adamw"}], lr=1e-3, seed=seed)
        w.grad = g.to(torch.bfloat16)
        opt.step()
        results.append(w.detach().float())
    # The exact fp32 result of one AdamW step (step 1: m̂ = g, v̂ = g², so Δ = lr·g/(|g|+eps)), with the
    # gradient the step saw (bf16).
    gb = g.to(torch.bfloat16).float()
    exact = w0.float() - 1e-3 * gb / (gb.abs() + 1e-8)
    mean = torch.stack(results).mean(0)
    sigma = bf16_ulp(exact) / 2 / math.sqrt(draws)  # bound on the std of a mean of {lo, hi} draws
    z = (mean - exact).abs() / sigma
    assert float(z.max()) < 4.5, float(z.max())  # 64 elements: max |z| of unbiased draws stays well below
    assert float(z.mean()) < 1.2
    # Round to nearest gives exactly the nearest bf16.
    w = torch.nn.Parameter(w0.clone())
    opt = Apollo([{"params": [w], "algo": "adamw"}], lr=1e-3, rounding="nearest")
    w.grad = g.to(torch.bfloat16)
    opt.step()
    assert torch.equal(w.detach(), exact.to(torch.bfloat16))


def test_steps_are_reproducible_and_seeded():
    def run(seed):
        torch.manual_seed(1)
        w = torch.nn.Parameter(torch.randn(40, 90).to(torch.bfloat16))
        opt = ApolloMini([w], lr=1e-2, seed=seed)
        for _ in range(3):
            w.grad = torch.randn(40, 90).to(torch.bfloat16)
            opt.step()
        return w.detach().view(torch.int16).clone()

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_hooks_free_gradients_and_match_step():
    def model_and_opt():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8))
        return m, Apollo(param_groups(m), lr=1e-2, rank=4, seed=9)

    x = torch.randn(16, 24)
    m1, o1 = model_and_opt()
    m2, o2 = model_and_opt()
    o2.attach_hooks()
    for _ in range(3):
        m1(x).square().mean().backward()
        o1.step()
        o1.zero_grad()
        m2(x).square().mean().backward()
        assert all(p.grad is None for p in m2.parameters())
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    # Batched hooks (the bias vectors' AdamW steps here; rank 4 steps alone): the same bits, every gradient freed.
    m3, o3 = model_and_opt()
    o3.attach_hooks(batch_bytes=1 << 20)
    for _ in range(3):
        m3(x).square().mean().backward()
        assert all(p.grad is None for p in m3.parameters())
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="batch_bytes must be >= 0"):
        o3.attach_hooks(batch_bytes=-1)


def mini_model_and_opt(device="cpu", dtype=torch.float32, lr=1e-2):
    """Matrices (APOLLO-Mini, tall and wide), biases and a LayerNorm (AdamW, two groups: decay on the
    matrices only), in model order."""
    torch.manual_seed(0)
    layers = [
        torch.nn.Linear(96, 257),
        torch.nn.GELU(),
        torch.nn.LayerNorm(257),
        torch.nn.Linear(257, 64),
        torch.nn.GELU(),
        torch.nn.Linear(64, 10),
    ]
    m = torch.nn.Sequential(*layers).to(device=device, dtype=dtype)
    return m, ApolloMini(param_groups(m, weight_decay=0.1), lr=lr, seed=4)


def same_weights_and_state(o1, m1, o2, m2):
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), name
        for k in ("m", "v", "step", "status", "prev_norm"):
            if k in o1.state[a]:
                assert torch.equal(o1.state[a][k], o2.state[b][k]), (name, k)


@pytest.mark.parametrize("batch_bytes", [1, 40_000, 1 << 30])
def test_batched_hooks_equal_one_at_a_time_on_the_cpu(batch_bytes):
    """attach_hooks(batch_bytes) on the CPU: the same queueing, batches and core batch objects as on CUDA (the
    core then steps each alone, the CPU reference), so the same bits as per-parameter hooks, across changes
    of the learning rate (the batches' cached arguments take each step's), every gradient freed."""
    x = torch.randn(32, 96)
    m1, o1 = mini_model_and_opt()
    m2, o2 = mini_model_and_opt()
    o1.attach_hooks()
    o2.attach_hooks(batch_bytes=batch_bytes)
    for step in range(3):
        for o in (o1, o2):
            o.param_groups[0]["lr"] = 1e-2 / (step + 1)
        for m in (m1, m2):
            m(x).square().mean().backward()
            assert all(p.grad is None for p in m.parameters())
    same_weights_and_state(o1, m1, o2, m2)
    assert not o2._ready and o2._batches, "the batched path ran"
    assert {kind for kind, _, _ in o2._batches} == {"apollo", "adamw"}


def test_batched_hooks_let_small_adamw_gradients_wait_for_the_end():
    """The flush rule of step_ready: once the waiting gradients hold batch_bytes, the matrices step; the AdamW
    tensors' small gradients wait (for the end of the pass, flush_ready) unless they hold half of it."""
    m, o = mini_model_and_opt()
    w0, b0, ln_w = m[0].weight, m[0].bias, m[2].weight
    limit = w0.numel() * 4 + b0.numel() * 4  # the first matrix and its bias
    o.attach_hooks(params=[], batch_bytes=limit)
    for p in (b0, ln_w):
        p.grad = torch.randn_like(p)
        o.step_ready(p)
    assert b0.grad is not None and ln_w.grad is not None  # waiting
    w0.grad = torch.randn_like(w0)
    o.step_ready(w0)  # over the limit: the matrix steps, the small AdamW gradients still wait
    assert w0.grad is None and b0.grad is not None and ln_w.grad is not None
    o.flush_ready()
    assert b0.grad is None and ln_w.grad is None and not o._ready
    # AdamW gradients holding half the limit or more step at once too (embeddings on AdamW).
    o.attach_hooks(params=[], batch_bytes=b0.numel() * 4)
    b0.grad = torch.randn_like(b0)
    o.step_ready(b0)
    assert b0.grad is None
    o.flush_ready()
    assert not o._ready


def test_a_failed_backward_leaves_no_waiting_step_behind():
    """A backward pass that fails midway never reaches its end, where the waiting steps would run: drop_ready
    forgets them and frees their gradients, so the next pass steps each parameter once, with its own gradient
    (not added to the failed pass's): the bits of one good pass with per-parameter hooks."""
    x = torch.randn(8, 96)
    m1, o1 = mini_model_and_opt()
    m2, o2 = mini_model_and_opt()
    o1.attach_hooks()
    o2.attach_hooks(batch_bytes=1 << 30)

    def fail(_grad):
        raise RuntimeError("backward failed")

    h = m2[3](m2[2](m2[1](m2[0](x))))
    h.register_hook(fail)  # after the last layers' gradients, before the first's
    with pytest.raises(RuntimeError, match="backward failed"):
        m2[5](m2[4](h)).square().mean().backward()
    assert o2._ready and m2[5].weight.grad is not None  # waiting when the pass failed
    o2.drop_ready()
    assert not o2._ready and all(p.grad is None for p in m2.parameters())
    for m in (m1, m2):
        m(x).square().mean().backward()
    same_weights_and_state(o1, m1, o2, m2)
    assert int(o2.state[m2[5].weight]["step"]) == 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA"))])
def test_step_now_and_step_are_step_params_bits(device):
    """step_now (the trainer's step of its deferred output projection: a batch of one) and step() (batched by
    kind, with lr and weight decay per group taken at each step) give step_param's bits."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(16, 96, device=device, dtype=dtype)
    m1, o1 = mini_model_and_opt(device, dtype)
    m2, o2 = mini_model_and_opt(device, dtype)
    m3, o3 = mini_model_and_opt(device, dtype)
    o3.attach_hooks(params=[], batch_bytes=1 << 30)
    for step in range(3):
        for o in (o1, o2, o3):
            o.param_groups[1]["lr"] = 3e-3 * (step + 1)
        for m in (m1, m2, m3):
            m(x).float().square().mean().backward()
        for p in m1.parameters():
            o1.step_param(p)
            p.grad = None
        g = m2[0].weight.grad
        m2[0].weight.grad = g.t().contiguous().t()  # the same values in other strides: stepped from a copy
        assert not m2[0].weight.grad.is_contiguous()
        o2.step()
        o2.zero_grad()
        for p in m3.parameters():
            o3.step_now(p, p.grad)
            assert p.grad is None
    if device == "cuda":
        torch.cuda.synchronize()
    same_weights_and_state(o1, m1, o2, m2)
    same_weights_and_state(o1, m1, o3, m3)
    assert o2._batches and o3._batches and not o3._ready
    # A parameter given other memory (p.data = ..., as engines do when they load) is stepped there, not where
    # the batch's cached arguments pointed.
    for m, o in ((m1, o1), (m2, o2)):
        m[0].weight.data = m[0].weight.data.clone()
        m[0].bias.data = m[0].bias.data.clone()
        m(x).float().square().mean().backward()
    for p in m1.parameters():
        o1.step_param(p)
    o2.step()
    if device == "cuda":
        torch.cuda.synchronize()
    same_weights_and_state(o1, m1, o2, m2)


def test_step_batches_check_their_arguments():
    h = _core.AdamWHyper()
    item = (0, "BF16", "BF16", 8, 0, 0, 0, 0, 0, h)
    with pytest.raises(livetrain.InvalidArgumentError, match="one group per item"):
        _core.AdamWBatch([item], [])
    with pytest.raises(livetrain.InvalidArgumentError, match="no hyperparameters"):
        _core.AdamWBatch([(*item[:-1], None)], [0])
    with pytest.raises(livetrain.InvalidArgumentError, match="unknown dtype|dtype"):
        _core.AdamWBatch([(0, "F16X", "BF16", 8, 0, 0, 0, 0, 0, h)], [0])
    batch = _core.AdamWBatch([item], [1])
    assert len(batch) == 1
    with pytest.raises(livetrain.InvalidArgumentError, match="1 steps, got 0 gradients"):
        batch.run([], [1e-3], [0.0], 0, 0, False, 0)
    with pytest.raises(livetrain.InvalidArgumentError, match="step 0 is in group 1, got 1 groups"):
        batch.run([0], [1e-3], [0.0], 0, 0, False, 0)
    with pytest.raises(livetrain.InvalidArgumentError, match="one learning rate and one weight decay per group"):
        batch.run([0], [1e-3, 1e-3], [0.0], 0, 0, False, 0)
    a = _core.ApolloHyper()
    apollo = _core.ApolloBatch([(0, "BF16", 8, "BF16", 8, 8, 0, 0, 0, 0, 0, 0, a)], [0])
    with pytest.raises(livetrain.InvalidArgumentError, match="a required pointer is null"):
        apollo.run([0], [1e-3], [0.0], 0, 0, False, 0)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("batch_bytes", [1, 40_000, 1 << 30])
def test_cuda_batched_hooks_equal_one_at_a_time(batch_bytes):
    """attach_hooks(batch_bytes): the APOLLO-Mini steps of parameters whose gradients are ready wait and step
    in batches (a batch per parameter, several, or all at the end of backward); the weights and the state
    are the bits of stepping each one as its gradient arrives, and every gradient is freed by the end."""

    def model_and_opt():
        torch.manual_seed(0)
        layers = [
            torch.nn.Linear(96, 257),
            torch.nn.GELU(),
            torch.nn.Linear(257, 64),
            torch.nn.GELU(),
            torch.nn.Linear(64, 10),
        ]
        m = torch.nn.Sequential(*layers).cuda().to(torch.bfloat16)
        return m, ApolloMini(param_groups(m), lr=1e-2, seed=4)

    x = torch.randn(32, 96, device="cuda", dtype=torch.bfloat16)
    m1, o1 = model_and_opt()
    m2, o2 = model_and_opt()
    o1.attach_hooks()
    o2.attach_hooks(batch_bytes=batch_bytes)
    for _ in range(3):
        for m in (m1, m2):
            m(x).float().square().mean().backward()
            assert all(p.grad is None for p in m.parameters())
    torch.cuda.synchronize()
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), name
        for k in ("m", "v", "step"):
            assert torch.equal(o1.state[a][k], o2.state[b][k]), (name, k)
    assert not o2._ready


def test_state_save_restore_continues_identically(tmp_path):
    def setup():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(50, 30))
        b = torch.nn.Parameter(torch.randn(30))
        return w, b, ApolloMini([w, b], lr=1e-2, seed=4)

    grads = [(torch.randn(50, 30), torch.randn(30)) for _ in range(6)]
    w, b, opt = setup()
    for gw, gb in grads:
        w.grad, b.grad = gw, gb
        opt.step()
    w2, b2, opt2 = setup()
    for gw, gb in grads[:3]:
        w2.grad, b2.grad = gw, gb
        opt2.step()
    opt2.save_state(tmp_path / "opt.safetensors")
    w3, b3, opt3 = w2.detach().clone().requires_grad_(), b2.detach().clone().requires_grad_(), None
    opt3 = ApolloMini([w3, b3], lr=1e-2, seed=4)
    opt3.load_state(tmp_path / "opt.safetensors")
    for gw, gb in grads[3:]:
        w3.grad, b3.grad = gw, gb
        opt3.step()
    assert torch.equal(w3, w) and torch.equal(b3, b)
    with pytest.raises(livetrain.Error, match="not a livetrain optimizer state"):
        from livetrain import safetensors as lst

        lst.save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
        opt3.load_state(tmp_path / "other.safetensors")


def test_a_state_that_does_not_fit_the_optimizer_is_refused_by_check_state_as_by_load_state(tmp_path):
    # check_state read the files' headers alone: a state stepped with another algorithm, at another APOLLO
    # rank, or for another tensor-parallel part passed it, then failed load_state (a TP rollback wrote the
    # weights first). Both now raise the same error, and a load_state that fails changes no state (it loaded
    # the parameters before the misfit one).
    from livetrain.optim import ParamShard

    torch.manual_seed(0)
    b, w = torch.nn.Parameter(torch.randn(30)), torch.nn.Parameter(torch.randn(50, 30))
    saved = ApolloMini([b, w], lr=1e-2)  # b on AdamW, w on APOLLO (rank 1, a channel per row)
    for _ in range(2):
        b.grad, w.grad = torch.randn(30), torch.randn(50, 30)
        saved.step()
    path = tmp_path / "opt.safetensors"
    saved.save_state(path)
    ApolloMini([b, w]).check_state(path)
    ApolloMini([b, w]).check_state([path])  # as one TP-1 file among a list (resharded)
    part = torch.nn.Parameter(torch.zeros(25, 30))  # rows 25..49 of w: a TP-2 rank's part
    half = ApolloMini([torch.nn.Parameter(torch.zeros(30)), part])
    half.tensor_parallel(object(), {part: ParamShard((50, 30), 0, ((25, 25),))})
    half.check_state(path)
    half.load_state(path)
    assert torch.equal(half.state[part]["m"], saved.state[w]["m"][25:])

    def adamw():
        return Apollo([{"params": [b], "algo": "adamw"}, {"params": [w], "algo": "adamw"}])

    def rank2(params, shards=None):
        opt = Apollo(params, rank=2)
        if shards:
            opt.tensor_parallel(object(), shards)
        return opt

    part2 = torch.nn.Parameter(torch.zeros(25, 30))
    for make, error, message in (
        (adamw, livetrain.InvalidArgumentError, "param2 was stepped with apollo, now configured for adamw"),
        (lambda: rank2([b, w]), livetrain.FormatError, r"param2.m has shape \(50,\), expected \(100,\)"),
        (
            lambda: rank2([b, part2], {part2: ParamShard((50, 30), 0, ((0, 25),))}),
            livetrain.FormatError,
            r"param2's moments \(\[50, 1\], of which this part is \[25, 1\]\) do not fit .* \(50 values\)",
        ),
    ):
        with pytest.raises(error, match=message):
            make().check_state(path)
        opt = make()
        with pytest.raises(error, match=message):
            opt.load_state(path)
        assert not opt.state, "a load_state that failed changed the state"


def test_state_files_that_leave_part_of_a_tensor_out_are_refused(tmp_path):
    # A TP-2 rank's file alone (or given twice) holds half of a parameter's moments: loaded into a TP-1
    # optimizer, the other half was zeros without an error. Both ranks' files together load as the whole.
    from livetrain.optim import ParamShard

    torch.manual_seed(0)
    b, w = torch.nn.Parameter(torch.randn(30)), torch.nn.Parameter(torch.randn(50, 30))
    whole = ApolloMini([b, w], lr=1e-2)
    for _ in range(2):
        b.grad, w.grad = torch.randn(30), torch.randn(50, 30)
        whole.step()
    path = tmp_path / "tp1.safetensors"
    whole.save_state(path)
    files = []
    for r, rows in enumerate(((0, 25), (25, 25))):
        part = torch.nn.Parameter(torch.zeros(25, 30))
        rank = ApolloMini([torch.nn.Parameter(torch.zeros(30)), part])
        rank.tensor_parallel(object(), {part: ParamShard((50, 30), 0, (rows,))})
        rank.load_state(path)
        files.append(tmp_path / f"rank{r}.safetensors")
        rank.save_state(files[-1])
    together = ApolloMini([b, w])
    together.load_state(files)
    assert torch.equal(together.state[w]["m"], whole.state[w]["m"])
    for given, first_missing in (([files[1]], 0), ([files[0]], 25), ([files[0], files[0]], 25)):
        opt = ApolloMini([b, w])
        message = rf"param2's parts do not cover its moments \[50, 1\]: no file holds index {first_missing}"
        with pytest.raises(livetrain.FormatError, match=message):
            opt.check_state(given)
        with pytest.raises(livetrain.FormatError, match=message):
            opt.load_state(given)
        assert not opt.state


def test_state_is_tiny_next_to_adamw():
    m = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.Linear(4096, 1024))
    opt = ApolloMini(param_groups(m), lr=1e-3)
    report = opt.state_bytes()
    assert report["total"] <= 0.01 * report["adamw_equivalent"] + 8 * (4096 + 1024) * 2


def test_bad_arguments_are_clear_errors():
    w = torch.nn.Parameter(torch.randn(3, 5))
    with pytest.raises(ValueError, match="smaller side is >= rank 4"):
        opt = Apollo([{"params": [w], "algo": "apollo"}], rank=4)
        w.grad = torch.randn(3, 5)
        opt.step()
    with pytest.raises(TypeError, match="bf16 or fp32"):
        h = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
        h.grad = torch.randn(4, 4, dtype=torch.float64)
        ApolloMini([h]).step()
    with pytest.raises(ValueError, match="betas"):
        Apollo([w], betas=(1.0, 0.9))


# ---------------------------------------------------------------------------------------------------
# Convergence: a tiny causal transformer LM on a synthetic language, same steps for each optimizer.
# ---------------------------------------------------------------------------------------------------
class TinyLM(torch.nn.Module):
    def __init__(self, vocab=48, d=64, layers=2, seq=32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(seq))

    def forward(self, x):
        h = self.embed(x) + self.pos[: x.shape[1]]
        h = self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        return self.head(self.norm(h))

    def get_output_embeddings(self):
        return self.head


def synthetic_batch(gen, batch=32, seq=33, vocab=48):
    # Each sequence repeats a random motif of length 3–6 with noise: learnable, not trivial.
    out = torch.empty(batch, seq, dtype=torch.long)
    for b in range(batch):
        k = int(torch.randint(3, 7, (1,), generator=gen))
        motif = torch.randint(0, vocab, (k,), generator=gen)
        out[b] = motif.repeat(seq // k + 1)[:seq]
    noise = torch.rand(batch, seq, generator=gen) < 0.05
    out[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=gen)
    return out


def train(make_opt, steps=200):
    torch.manual_seed(0)
    model = TinyLM()
    opt = make_opt(model)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        batch = synthetic_batch(gen)
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return sum(losses[-10:]) / 10


def test_apollo_and_mini_converge_within_5_percent_of_adamw():
    # One learning rate for all three (1e-2 is AdamW's best of {3e-3, 1e-2} here); APOLLO at rank n/4
    # with scale n/r, APOLLO-Mini with the paper's settings.
    adamw = train(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2))
    apollo = train(lambda m: Apollo(param_groups(m), lr=1e-2, rank=16, scale=4.0, update_proj_gap=50))
    mini = train(lambda m: ApolloMini(param_groups(m), lr=1e-2, update_proj_gap=50))
    print(f"final loss: AdamW {adamw:.4f}, APOLLO {apollo:.4f}, APOLLO-Mini {mini:.4f}")
    assert adamw < 2.0, "the task did not train at all"
    assert apollo <= adamw * 1.05
    assert mini <= adamw * 1.05


# ---------------------------------------------------------------------------------------------------
# CUDA against CPU (runs on the GPU machine; skipped elsewhere)
# ---------------------------------------------------------------------------------------------------
GPU_SHAPES = [
    (769, 5125, 1),
    (5125, 769, 1),
    (1, 4099, 1),
    (4099, 1, 1),
    (257, 1031, 8),
    (1031, 257, 8),
    (512, 2048, 64),
    (2048, 512, 96),
]


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("rows,cols,rank", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_step_matches_cpu_step(rows, cols, rank, dtype):
    gen = torch.Generator().manual_seed(rows + cols)
    W0 = (torch.randn(rows, cols, generator=gen) * 0.1).to(dtype)
    grads = [torch.randn(rows, cols, generator=gen).to(dtype) for _ in range(4)]
    grads[2] = grads[2] * 5  # the limiter acts
    results = {}
    for dev in ("cpu", "cuda"):
        w = torch.nn.Parameter(W0.clone().to(dev))
        scaling = "tensor" if rank == 1 else "channel"
        opt = Apollo(
            [w],
            lr=1e-2,
            rank=rank,
            scaling=scaling,
            scale=128.0 if rank == 1 else 1.0,
            weight_decay=0.01,
            seed=11,
            rounding="nearest",
        )
        for g in grads:
            w.grad = g.to(dev)
            opt.step()
        st = opt.state[w]
        results[dev] = (w.detach().float().cpu(), st["m"].cpu(), st["v"].cpu(), float(st["prev_norm"]), opt.report())
    c, g = results["cpu"], results["cuda"]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel((g[0] - W0.float()).numpy(), (c[0] - W0.float()).numpy()) < max(tol, 1e-4)
    assert rel(g[1].numpy(), c[1].numpy()) < 1e-4 and rel(g[2].numpy(), c[2].numpy()) < 1e-4
    assert abs(g[3] - c[3]) / c[3] < 1e-4
    assert g[4]["ok"] == 1 and g[4]["steps"] == c[4]["steps"]


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_strided_weight_and_guard_and_rounding():
    # A weight that is a row-slice view of a wider engine tensor (ld > cols), as a TP shard is.
    big = (torch.randn(300, 1000) * 0.1).to(torch.bfloat16).cuda()
    view = big[:, 100:611]
    w = torch.nn.Parameter(view)
    outside = big.clone()
    opt = ApolloMini([w], lr=1e-2)
    w.grad = torch.randn(300, 511, device="cuda").to(torch.bfloat16)
    opt.step()
    torch.cuda.synchronize()
    assert torch.equal(big[:, :100], outside[:, :100]) and torch.equal(big[:, 611:], outside[:, 611:])
    assert not torch.equal(big[:, 100:611], outside[:, 100:611])
    before = big.clone()
    g = torch.randn(300, 511, device="cuda").to(torch.bfloat16)
    g[17, 5] = float("nan")
    w.grad = g
    opt.step()
    assert torch.equal(big.view(torch.int16), before.view(torch.int16))
    assert opt.report()["skipped_nonfinite_grad"]
    # Stochastic rounding on the GPU: unbiased over seeds.
    n, draws = 256, 400
    w0 = torch.randn(n, 1).to(torch.bfloat16).cuda()
    gb = torch.randn(n, 1, device="cuda").to(torch.bfloat16)
    outs = []
    for seed in range(draws):
        p = torch.nn.Parameter(w0.clone())
        o = Apollo([{"params": [p], "algo": "adamw"}], lr=1e-3, seed=seed)
        p.grad = gb
        o.step()
        outs.append(p.detach().float())
    mean = torch.stack(outs).mean(0)
    exact = w0.float() - 1e-3 * gb.float() / (gb.float().abs() + 1e-8)
    z = (mean - exact).abs() / (bf16_ulp(exact) / 2 / math.sqrt(draws))
    assert float(z.max()) < 5.0 and float(z.mean()) < 1.2


BATCH_SHAPES = [(257, 129), (129, 257), (1, 1000), (1000, 1), (64, 64), (4096, 96), (96, 4096), (300, 1031)]


def batched_and_one_by_one(on_step=None):
    """The batched CUDA step against stepping each parameter alone: 70 matrices (more than one batch of 64),
    tall, wide, odd, strided, bf16 and fp32 mixed, plus a vector (AdamW) and a rank-4 group (not batched),
    three steps with a NaN gradient in one matrix at the second. ``oa`` steps all at once (step()), ``ob``
    one at a time (step_param); ``on_step(step, pa, pb)`` after each step. Returns (oa, ob, pa, pb). Also
    run by scripts/optim_batch_diag.py under several launch shapes, to say where a mismatch comes from."""
    gen = torch.Generator().manual_seed(5)

    def make():
        torch.manual_seed(0)
        ps = []
        for i in range(70):
            r, c = BATCH_SHAPES[i % len(BATCH_SHAPES)]
            dt = torch.bfloat16 if i % 3 else torch.float32
            if i % 5 == 0 and c > 8:
                base = torch.randn(r, c + 8, generator=gen).to(dt).cuda()
                ps.append(torch.nn.Parameter(base[:, 3 : 3 + c]))  # ld > cols, misaligned start
            else:
                ps.append(torch.nn.Parameter(torch.randn(r, c, generator=gen).to(dt).cuda()))
        return ps

    a, b = make(), make()
    vec_a, vec_b = torch.nn.Parameter(torch.randn(33).cuda()), torch.nn.Parameter(torch.randn(33).cuda())
    r4_a, r4_b = torch.nn.Parameter(torch.randn(80, 40).cuda()), torch.nn.Parameter(torch.randn(80, 40).cuda())
    r4_b.data.copy_(r4_a.data)
    vec_b.data.copy_(vec_a.data)
    for x, y in zip(a, b):
        y.data.copy_(x.data)
    oa = ApolloMini(
        [{"params": a}, {"params": [vec_a]}, {"params": [r4_a], "rank": 4, "scaling": "channel"}], lr=1e-2, seed=2
    )
    ob = ApolloMini(
        [{"params": b}, {"params": [vec_b]}, {"params": [r4_b], "rank": 4, "scaling": "channel"}], lr=1e-2, seed=2
    )
    pa, pb = a + [vec_a, r4_a], b + [vec_b, r4_b]
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen).to(p.dtype).cuda() for p in pa]
        for p, g in zip(pa, grads):
            p.grad = g
        for p, g in zip(pb, grads):
            p.grad = g.clone()
        if step == 1:
            a[7].grad[0, 0] = float("nan")
            b[7].grad[0, 0] = float("nan")
        oa.step()
        for p in pb:
            ob.step_param(p)
        if on_step is not None:
            torch.cuda.synchronize()
            on_step(step, pa, pb)
    torch.cuda.synchronize()
    return oa, ob, pa, pb


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_batched_step_equals_one_by_one():
    # step() must equal stepping each parameter alone: weights and every state, bit for bit.
    oa, ob, pa, pb = batched_and_one_by_one()
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert torch.equal(x.detach(), y.detach()), i
        for k in ("m", "v", "step", "prev_norm"):
            if k in oa.state[x]:
                assert torch.equal(oa.state[x][k], ob.state[y][k]), (i, k)
    assert oa.report()["skipped_nonfinite_grad"] == ob.report()["skipped_nonfinite_grad"] == []
    assert int(oa.state[pa[7]]["step"]) == 2 and int(oa.state[pa[0]]["step"]) == 3


ADAMW_SHAPES = [(1,), (7,), (8,), (33,), (48,), (128,), (257,), (5120,), (70001,), (10, 1, 4)]


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_batched_adamw_equals_one_by_one():
    # step() launches the AdamW steps together (adamw_step_many: norms, biases, conv weights): the same weights,
    # moments, step counts and statuses as stepping each tensor alone, bit for bit. 150 tensors of odd sizes
    # (more than two batches of 64), bf16 and fp32 interleaved (as A_log between norms), with decay and
    # clipping; a NaN gradient at the last step skips its own tensor only.
    gen = torch.Generator().manual_seed(11)
    a = [
        torch.nn.Parameter(
            torch.randn(ADAMW_SHAPES[i % len(ADAMW_SHAPES)], generator=gen)
            .to(torch.float32 if i % 7 == 3 else torch.bfloat16)
            .cuda()
        )
        for i in range(150)
    ]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    kw = dict(lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, seed=3)
    oa, ob = Apollo(a, **kw), Apollo(b, **kw)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen).to(p.dtype).cuda() for p in a]
        if step == 2:
            grads[5].view(-1)[0] = float("nan")
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g, g.clone()
        oa.step()
        for q in b:
            ob.step_param(q)
    torch.cuda.synchronize()
    assert oa._adamw_workspaces, "step() took the batched AdamW path"
    for i, (x, y) in enumerate(zip(a, b)):
        assert oa.state[x]["algo"] == "adamw"
        assert torch.equal(x.detach(), y.detach()), i
        for k in ("m", "v", "step", "status"):
            assert torch.equal(oa.state[x][k], ob.state[y][k]), (i, k)
    assert oa.report() == ob.report()
    assert oa.report()["skipped_nonfinite_grad"] == ["param6"]
    assert int(oa.state[a[5]]["step"]) == 2 and int(oa.state[a[0]]["step"]) == 3


def test_adamw_many_workspace_bytes_are_each_steps_slice():
    sizes = [1, 33, 70001]
    assert _core.adamw_many_workspace_bytes(sizes) == sum(_core.adamw_workspace_bytes(n) for n in sizes)
    assert _core.adamw_many_workspace_bytes([]) == 0


def test_adamw_step_many_checks_its_arguments_before_any_launch():
    h = _core.AdamWHyper()
    item = (0, "BF16", "BF16", 8, 0, 0, 0, 0, 0, h)
    with pytest.raises(livetrain.InvalidArgumentError, match="one gradient per item"):
        _core.adamw_step_many([item], [], 0, 0, 0)
    if not _core.cuda_compiled():
        pytest.skip("a build without CUDA refuses every batched step alike")
    nbytes = _core.adamw_many_workspace_bytes([8])
    with pytest.raises(livetrain.InvalidArgumentError, match=f"needs a workspace of {nbytes} bytes"):
        _core.adamw_step_many([item], [0], 0, nbytes - 1, 0)
    with pytest.raises(livetrain.InvalidArgumentError, match="a required pointer is null"):
        _core.adamw_step_many([item], [0], 0, nbytes, 0)


def _phase(phase, st, grad, h, shard, cuda):
    stream = torch.cuda.current_stream().cuda_stream if cuda else 0
    w = st["w"]
    _core.apollo_phase(
        phase, w.data_ptr(), "BF16", w.stride(0), grad.data_ptr(), "BF16", w.shape[0], w.shape[1],
        st["m"].data_ptr(), st["v"].data_ptr(), st["prev"].data_ptr(), st["status"].data_ptr(),
        st["step"].data_ptr(), 7, st["ws"].data_ptr(), h, shard, cuda, stream,
    )  # fmt: skip


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize(
    "rows,cols,shard",
    [
        (203, 64, None),  # tall, 8-element groups
        (40, 200, None),  # wide
        (37, 203, None),  # columns not a multiple of 8: element by element
        (96, 61, (1, 150, [(3, 21), (70, 40)], True)),  # a shard whose groups straddle the full tensor's
    ],
)
@pytest.mark.parametrize(
    "scaling,rounding", [("tensor", "stochastic"), ("channel", "stochastic"), ("tensor", "nearest")]
)
@pytest.mark.parametrize("rounds", [10, 7])
def test_cuda_update_is_the_cpu_update_bit_for_bit(rows, cols, shard, scaling, rounding, rounds):
    """The update stage alone, from the same state: the CUDA update (its rounding offsets, scaling factors and
    the order of every rounding) and the CPU reference's write the same bf16 bits. The projection and moments
    run on the GPU; their workspace, moments and counters are copied to the host, then both devices update.
    At the first step the limiter leaves the step's scalars independent of the summation order. Under both
    Philox round counts of the rounding offsets (apollo.update_rounds), which the CPU step follows too."""
    with knobs({"apollo.update_rounds": rounds}):
        _update_cuda_and_cpu(rows, cols, shard, scaling, rounding)


def _update_cuda_and_cpu(rows, cols, shard, scaling, rounding):
    torch.manual_seed(rows * cols)
    h = _core.ApolloHyper()
    h.rank, h.lr, h.weight_decay = 1, 1e-2, 0.01
    h.scaling = getattr(_core.Scaling, scaling)
    h.scale = 128.0 if scaling == "tensor" else 1.0
    h.rounding = getattr(_core.Rounding, rounding)
    W = (torch.randn(rows, cols) * 0.1).to(torch.bfloat16)
    G = torch.randn(rows, cols).to(torch.bfloat16)
    nbytes = _core.apollo_phase_layout(rows, cols, 1, shard)[0]
    full = (rows, cols) if shard is None else (rows, shard[1])
    channels = rows if full[0] >= full[1] else cols
    gpu = dict(
        w=W.cuda(), m=torch.zeros(channels, device="cuda"), v=torch.zeros(channels, device="cuda"),
        prev=torch.full((1,), -1.0, device="cuda"), status=torch.zeros(1, dtype=torch.int32, device="cuda"),
        step=torch.zeros(1, dtype=torch.int64, device="cuda"), ws=torch.zeros(nbytes, dtype=torch.uint8, device="cuda"),
    )  # fmt: skip
    g = G.cuda()
    for phase in (_core.ApolloPhase.project, _core.ApolloPhase.moments):
        _phase(phase, gpu, g, h, shard, True)
    torch.cuda.synchronize()
    cpu = {k: v.cpu().clone() for k, v in gpu.items()}
    _phase(_core.ApolloPhase.update, gpu, g, h, shard, True)
    _phase(_core.ApolloPhase.update, cpu, G, h, shard, False)
    torch.cuda.synchronize()
    assert int(gpu["status"]) == int(cpu["status"]) == 0
    assert int(gpu["step"]) == int(cpu["step"]) == 1
    moved = (cpu["w"].view(torch.int16) != W.view(torch.int16)).float().mean()
    assert moved > 0.05, "the step must move the weights for the comparison to mean anything"
    assert torch.equal(gpu["w"].cpu().view(torch.int16), cpu["w"].view(torch.int16))


class knobs:
    """Internal tuning knobs (docs/tuning.md) set for a block, every knob back to its default after it."""

    def __init__(self, settings):
        self.settings = settings

    def __enter__(self):
        _core.tuning_reset()
        for name, value in self.settings.items():
            _core.tuning_set(name, value)

    def __exit__(self, *exc):
        _core.tuning_reset()


def _mini_steps(params, grads, steps=2, **kwargs):
    """``steps`` batched APOLLO-Mini steps of copies of ``params`` with ``grads``: the weights after them."""
    ps = [_copy(p) for p in params]
    opt = ApolloMini(ps, lr=1e-2, weight_decay=0.01, seed=4, **kwargs)
    for _ in range(steps):
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
    torch.cuda.synchronize()
    assert opt.report()["ok"] == len(ps)
    return [p.detach().clone() for p in ps]


def _copy(p):
    """A parameter holding p's values with p's row stride (a strided view stays a view of a wider tensor)."""
    if p.is_contiguous():
        return torch.nn.Parameter(p.clone())
    base = torch.zeros(p.shape[0], p.stride(0), dtype=p.dtype, device=p.device)
    view = base[:, 8 : 8 + p.shape[1]]
    view.copy_(p)
    return torch.nn.Parameter(view)


def _mini_set():
    """bf16 matrices of the batched update's kinds: tall, wide, columns not a multiple of 8, a strided view,
    enough groups that every thread of a grid-capped launch takes several."""
    gen = torch.Generator().manual_seed(9)
    shapes = [(1031, 264), (264, 1031), (77, 203), (4096, 96), (96, 4096), (513, 40)]
    params = [(torch.randn(r, c, generator=gen) * 0.1).to(torch.bfloat16).cuda() for r, c in shapes]
    base = (torch.randn(300, 1040, generator=gen) * 0.1).to(torch.bfloat16).cuda()
    params.append(base[:, 8:1032])  # ld 1040 > cols 1024, 16-byte aligned
    grads = [torch.randn(p.shape, generator=gen).to(torch.bfloat16).cuda() for p in params]
    return params, grads


# Variants of the batched update that must not change a bit (docs/tuning.md: apollo.update_*): one setting per
# compiled kernel, from the table the CUDA dispatcher launches from (so none can name a missing kernel), then
# launch shapes. Each is compared with the generic kernel at 256 threads per block and the same Philox rounds.
GENERIC_UPDATE = {"apollo.update_mini": 0, "apollo.update_threads": 256}
SAME_BITS_VARIANTS = [v for v in _core.apollo_update_variants() if not v["apollo.update_probe"]] + [
    {"apollo.update_threads": 256},
    {"apollo.update_threads": 512},
    {"apollo.update_resident": 4},
    {"apollo.update_mini": 0, "apollo.update_resident": 4},
    {"apollo.update_resident": 2, "apollo.update_threads": 256},
]


def _variant_id(v):
    return ",".join(f"{k.removeprefix('apollo.update_')}={x}" for k, x in v.items())


def test_update_variants_are_listed_from_the_compiled_table():
    # The list the GPU tests run: the shipped setting first (Mini's kernel with its short rounding), the probe once,
    # the full rounding path of Mini's kernel (the default before) among them.
    variants = _core.apollo_update_variants()
    knobs = _core.tuning()
    assert variants[0] == {name: knobs[name]["default"] for name in variants[0]}
    assert variants[0]["apollo.update_fast_round"] == 1 and variants[0]["apollo.update_mini"] == 1
    assert sum(v["apollo.update_probe"] for v in variants) == 1
    assert any(not v["apollo.update_fast_round"] and v["apollo.update_mini"] for v in variants)
    assert "apollo.update_unroll" not in knobs  # its 2 and 4 lost on the H200 (0.80x) and are gone


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("variant", SAME_BITS_VARIANTS, ids=_variant_id)
def test_cuda_update_variants_write_the_shipped_bits(variant):
    # Every kernel and launch shape of the batched update writes the generic kernel's weights (pinned against the
    # CPU step by test_cuda_update_is_the_cpu_update_bit_for_bit, the batched step against the one-by-one step),
    # bit for bit, stochastic and nearest rounding (where Mini's kernel does not apply).
    params, grads = _mini_set()
    rounds = {"apollo.update_rounds": variant.get("apollo.update_rounds", 10)}
    for rounding in ("stochastic", "nearest"):
        with knobs({**GENERIC_UPDATE, **rounds}):
            generic = _mini_steps(params, grads, rounding=rounding)
        with knobs(variant):
            got = _mini_steps(params, grads, rounding=rounding)
        for i, (a, b) in enumerate(zip(got, generic)):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), (rounding, i)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("variant", [{}, {"apollo.update_loads_first": 1}, {"apollo.update_rounds": 7}])
def test_cuda_fast_round_takes_the_full_path_for_huge_and_nonfinite_weights(variant):
    # apollo.update_fast_round rounds a group as (bits + offset) >> 16 unless a value is not finite or >= 2^127;
    # weights there (Inf, NaN, +-2e38, bf16's largest) must come out as the full path writes them (kept, or
    # rounded to nearest at the top of the range), and the groups around them too; the status alike.
    params, grads = _mini_set()
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 2e38, -3e38, 3.3895e38, 1.7e38, -1.8e38])
    gen = torch.Generator().manual_seed(3)
    for p in params:
        flat = p.view(-1) if p.is_contiguous() else p[0]
        at = torch.randint(0, flat.numel(), (24,), generator=gen).to(flat.device)
        flat[at] = special.repeat(3).to(flat.dtype).to(flat.device)

    def run(settings):
        with knobs({"apollo.update_mini": 1, **variant, **settings}):
            ps = [_copy(p) for p in params]
            opt = ApolloMini(ps, lr=1e-2, weight_decay=0.01, seed=4)
            for _ in range(2):
                for p, g in zip(ps, grads):
                    p.grad = g
                opt.step()
            torch.cuda.synchronize()
            return [p.detach().clone() for p in ps], opt.report()

    full, full_report = run({"apollo.update_fast_round": 0})
    fast, fast_report = run({})  # the default
    assert full_report["nonfinite_update"], "the Inf and NaN weights must reach the update's guard"
    assert fast_report == full_report
    for i, (a, b) in enumerate(zip(fast, full)):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), i


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_seven_rounds_batched_equals_one_by_one_and_moves_other_bits():
    # apollo.update_rounds=7 reaches every CUDA path: the batched step equals stepping each parameter alone
    # (the one-kernel step included), and the rounding bits differ from Philox4x32-10's.
    params, grads = _mini_set()
    ten = _mini_steps(params, grads)
    with knobs({"apollo.update_rounds": 7}):
        oa, ob, pa, pb = batched_and_one_by_one()
        for i, (x, y) in enumerate(zip(pa, pb)):
            assert torch.equal(x.detach(), y.detach()), i
        seven = _mini_steps(params, grads)
    differ = sum(int((a.view(torch.int16) != b.view(torch.int16)).sum()) for a, b in zip(seven, ten))
    assert differ > 1000, "7 rounds must change the rounding offsets"

    # The one-kernel step (apollo.fused_step) takes the knob too: its result moves with it (its projection
    # sums in another order than the batched step's, so only the weights' change is compared with that).
    def fused(rounds):
        with knobs({"apollo.update_rounds": rounds, "apollo.fused_step": 1}):
            ps = [_copy(p) for p in params]
            opt = ApolloMini(ps, lr=1e-2, weight_decay=0.01, seed=4)
            for _ in range(2):
                for p, g in zip(ps, grads):
                    p.grad = g
                    opt.step_param(p)
            torch.cuda.synchronize()
            return [p.detach().clone() for p in ps]

    f7, f10 = fused(7), fused(10)
    assert any(not torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(f7, f10))
    for a, b, w0 in zip(f7, seven, params):
        da, db = a.float() - w0.float(), b.float() - w0.float()
        assert float((da - db).norm() / db.norm()) < 1e-2


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_update_probe_moves_every_byte_of_the_update():
    # apollo.update_probe=1 (bench/optim.py --probe): the batched bf16 update writes W + G as 32-bit words,
    # so its loads and stores cover every group the update's do, and nothing else changes W.
    params, grads = _mini_set()
    params = [p for p in params if p.shape[1] % 8 == 0 and p.is_contiguous()]  # the probe's vector path
    grads = [torch.randn(p.shape, device="cuda").to(torch.bfloat16) for p in params]
    with knobs({"apollo.update_probe": 1}):
        got = _mini_steps(params, grads, steps=1)
    for w, g, out in zip(params, grads, got):
        expect = w.contiguous().view(torch.int32).to(torch.int64) + g.view(torch.int32).to(torch.int64)
        expect = ((expect + 2**31) % 2**32 - 2**31).to(torch.int32)
        assert torch.equal(out.contiguous().view(torch.int32), expect)


def test_seven_rounds_change_the_cpu_rounding_not_its_mean():
    # apollo.update_rounds=7 on the CPU step (the reference the CUDA update is pinned to): other bits than
    # Philox4x32-10's, still unbiased stochastic rounding (any uniform 16-bit offset is).
    w0 = torch.randn(64, 32).to(torch.bfloat16)
    g = torch.randn(64, 32).to(torch.bfloat16)

    def stepped(seed):
        p = torch.nn.Parameter(w0.clone())
        opt = ApolloMini([p], lr=1e-2, seed=seed)
        p.grad = g
        opt.step()
        return p.detach()

    ten = stepped(1)
    with knobs({"apollo.update_rounds": 7}):
        seven = [stepped(seed) for seed in range(1, 201)]
    assert int((seven[0].view(torch.int16) != ten.view(torch.int16)).sum()) > 50
    with knobs({}):
        tens = [stepped(seed) for seed in range(1, 201)]
    # The mean over seeds of either stream is the same value within the rounding noise: both unbiased.
    m7, m10 = torch.stack(seven).float().mean(0), torch.stack(tens).float().mean(0)
    z = (m7 - m10).abs() / (bf16_ulp(m10) / 2 / math.sqrt(100))
    assert float(z.mean()) < 1.5
