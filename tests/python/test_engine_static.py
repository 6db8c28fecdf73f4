"""The reference engine's static-cache decode (livetrain.engines.static, ``--batch-attention static``) on a
tiny random Llama: greedy answers equal one-at-a-time decoding's (fp32, rows joining and leaving, slots
compacted), a request longer than the cache is refused by name, and a replaced weight tensor makes the
next step capture again; on a GPU the replayed CUDA graphs give the eager steps' answers bit for bit and
see in-place weight updates."""

import pytest
import torch
import transformers

from livetrain.engines import batching, static

import tiny_model
from scheduler_answers import answers


def llama(device: str = "cpu", dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_model.llama_config(48)).eval().to(device, dtype)


# Prompts of different lengths and answers of different lengths: rows join a running batch and leave it
# in another order than they came (their slots are compacted), more requests than slots.
PROMPTS = [[(7 * i + 3 * j) % 45 + 2 for j in range(2 + 3 * i)] for i in range(7)]


def test_buckets():
    assert (
        static.buckets(1) == [1] and static.buckets(16) == [1, 2, 4, 8, 16] and static.buckets(12) == [1, 2, 4, 8, 12]
    )


@pytest.mark.parametrize("shortest", [128, 8])
def test_static_cache_greedy_answers_equal_one_at_a_time_decoding(monkeypatch, shortest):
    # shortest 8: the steps attend over spans of 8, 16, 32 and 64 positions as the rows grow.
    monkeypatch.setattr(static, "SHORTEST", shortest)
    model = llama()
    want, _ = answers(model, PROMPTS, max_batch=1)
    got, load = answers(model, PROMPTS, max_batch=4, attention="static", static_length=64)
    assert got == want and load["peak_batch"] == 4
    assert all(isinstance(t, int) for a in got.values() for t in a)


def test_requests_admitted_together_are_prefilled_in_one_forward(monkeypatch):
    # The static cache's prefill of requests admitted together: one forward of the right-padded prompts;
    # a request too long for the cache fails alone, rows that end at their first token leave at once (the
    # others' slots compacted), and every answer equals one-at-a-time decoding's.
    monkeypatch.setattr(static, "SHORTEST", 8)
    model = llama()
    prompts = [PROMPTS[3], PROMPTS[0], list(range(2, 40)), PROMPTS[5], PROMPTS[1], PROMPTS[6]]
    max_tokens = [7, 1, 30, 9, 1, 5]
    want, _ = answers(model, prompts, max_tokens, max_batch=1)
    calls = []
    together = batching.Scheduler._prefill_slots
    monkeypatch.setattr(
        batching.Scheduler, "_prefill_slots", lambda self, seqs: calls.append(len(seqs)) or together(self, seqs)
    )
    got, load = answers(model, prompts, max_tokens, max_batch=4, attention="static", static_length=64)
    assert calls[0] == 4 and load["peak_batch"] >= 3
    assert got[2] == [
        "ValueError: prompt (38 tokens) + max_tokens (30) exceeds the static KV cache of 64 positions (--static-cache-len)"
    ]
    assert len(got[1]) == len(got[4]) == 1
    assert {i: a for i, a in got.items() if i != 2} == {i: a for i, a in want.items() if i != 2}


def test_a_request_longer_than_the_static_cache_is_refused_by_name():
    got, _ = answers(llama(), [list(range(2, 30)), [5, 6]], max_batch=2, attention="static", static_length=32)
    assert got[0] == [
        "ValueError: prompt (28 tokens) + max_tokens (6) exceeds the static KV cache of 32 positions (--static-cache-len)"
    ]
    assert len(got[1]) == 9 and all(isinstance(t, int) for t in got[1])


def test_a_cache_that_does_not_fit_is_refused_with_its_size():
    with pytest.raises(static.CacheTooLarge, match=r"1048576 slots x 1048576 positions needs \d+ MiB on cpu"):
        static.Decoder(llama(), 1 << 20, 1 << 20, graphs=False)
    # A limit (what --batch-attention auto gives the cache) refuses before allocating; at the size it passes.
    size = static.Decoder(llama(), 2, 32, graphs=False).bytes
    with pytest.raises(static.CacheTooLarge, match=r"more than the 0 MiB it may take"):
        static.Decoder(llama(), 2, 32, graphs=False, max_bytes=size - 1)
    assert static.Decoder(llama(), 2, 32, graphs=False, max_bytes=size).bytes == size


def test_auto_attention_is_static_on_a_gpu_and_rows_where_static_cannot_serve(monkeypatch, capsys):
    # --batch-attention auto (the engine's default): rows on CPU; static where auto picks it (a GPU), and
    # rows with a warning when the static cache does not fit; an explicit static that does not fit is refused.
    assert batching.auto_attention(torch.device("cpu"), True) == "rows"
    assert batching.auto_attention(torch.device("cuda", 0), True) == "static"
    assert batching.auto_attention(torch.device("cuda", 0), False) == "rows"
    sched = batching.Scheduler(llama(), set(), max_batch=2, attention="auto")
    try:
        assert sched.attention == "rows" and sched.decoder is None and sched.max_batch == 2
    finally:
        sched.close()
    monkeypatch.setattr(batching, "auto_attention", lambda device, graphs: "static")
    sched = batching.Scheduler(llama(), set(), max_batch=2, attention="auto", graphs=False)
    try:
        assert sched.attention == "static" and sched.decoder is not None
    finally:
        sched.close()

    def too_large(*a, **kw):
        raise static.CacheTooLarge(
            "the static KV cache of 2 slots x 32 positions needs 1 MiB on cpu, which is not free"
        )

    monkeypatch.setattr(static, "Decoder", too_large)
    sched = batching.Scheduler(llama(), set(), max_batch=2, attention="auto", static_length=32)
    try:
        assert sched.attention == "rows" and sched.decoder is None and sched.max_batch == 2
    finally:
        sched.close()
    assert "which is not free; --batch-attention auto uses rows" in capsys.readouterr().err
    with pytest.raises(static.CacheTooLarge):
        batching.Scheduler(llama(), set(), max_batch=2, attention="static", static_length=32)
    got, _ = answers(llama(), PROMPTS, max_batch=3, attention="auto")
    want, _ = answers(llama(), PROMPTS, max_batch=1, attention="rows")
    assert got == want


def test_a_replaced_weight_makes_the_next_step_capture_again(monkeypatch):
    # A captured graph reads the weights by address: a parameter replaced (not updated in place) must not
    # leave the graphs on the old memory. The capture is counted here (CPU has no graphs); the GPU test
    # below checks the answers.
    model = llama()
    decoder = static.Decoder(model, 2, 32, graphs=False)
    decoder.graphs_wanted = True

    def capture():
        decoder._addresses, decoder.captures = decoder.addresses(), decoder.captures + 1

    monkeypatch.setattr(decoder, "capture", capture)
    with torch.inference_mode():
        decoder.step([3, 4], [0, 0])
        decoder.step([5, 6], [1, 1])
        assert decoder.captures == 1
        model.model.layers[0].mlp.up_proj.weight.data.mul_(2)  # in place: the same graphs
        decoder.step([5, 6], [2, 2])
        assert decoder.captures == 1
        layer = model.model.layers[1].self_attn.o_proj
        layer.weight.data = layer.weight.data.clone()  # replaced: captured again
        decoder.step([5, 6], [3, 3])
        assert decoder.captures == 2


def test_static_attention_is_refused_under_tensor_parallelism():
    from livetrain.engines import options, ranks

    with pytest.raises(ValueError, match="not supported with tensor parallelism"):
        ranks.TPScheduler(None, set(), attention="static")
    import argparse

    p = argparse.ArgumentParser()
    options.add_options(p)
    ns = p.parse_args(["--batch-attention", "static", "--tensor-parallel", "2"])
    assert options.check(ns) == "--batch-attention static is not supported with --tensor-parallel > 1"
    # livetrain serve passes the static cache's options on to the engine process.
    ns = p.parse_args(["--batch-attention", "static", "--static-cache-len", "512"])
    assert options.check(ns) is None and vars(p.parse_args(options.argv(ns))) == vars(ns)
    # auto (the default) is accepted at any TP: the TP scheduler runs rows.
    ns = p.parse_args(["--tensor-parallel", "2"])
    assert ns.batch_attention == "auto" and options.check(ns) is None
    assert options.check(p.parse_args(["--static-cache-len", "0"])) == "--static-cache-len must be >= 1"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_graphs_answer_as_the_eager_static_steps_and_see_weight_updates(monkeypatch):
    monkeypatch.setattr(static, "SHORTEST", 16)  # graphs of spans 16, 32 and 64 positions
    model = llama("cuda", torch.bfloat16)
    eager, _ = answers(model, PROMPTS, max_batch=4, attention="static", static_length=64, graphs=False)
    graphs, _ = answers(model, PROMPTS, max_batch=4, attention="static", static_length=64)
    assert graphs == eager  # the same kernels, replayed: bit for bit
    fp32 = llama("cuda")
    want, _ = answers(fp32, PROMPTS, max_batch=1)
    got, _ = answers(fp32, PROMPTS, max_batch=4, attention="static", static_length=64)
    assert got == want

    decoder = static.Decoder(model, 4, 32, graphs=True)
    with torch.inference_mode():
        decoder.warm()
        assert decoder.captures == 1 and decoder.graphs

        def logits():  # every row at position 0: the cache holds nothing else
            return decoder.step([3, 4, 5], [0, 0, 0]).clone()

        def eager():
            return model(input_ids=torch.tensor([[3], [4], [5]], device="cuda")).logits[:, -1].float()

        before = logits()
        torch.testing.assert_close(before, eager(), rtol=0, atol=0.05)
        model.lm_head.weight.data.mul_(-1)  # a live in-place update (what the trainer does): seen
        after = logits()
        assert decoder.captures == 1
        torch.testing.assert_close(after, -before, rtol=0, atol=0)
        head = model.lm_head
        head.weight.data = head.weight.data.clone().mul_(2)  # replaced: captured again
        replaced = logits()
        assert decoder.captures == 2
        torch.testing.assert_close(replaced, eager(), rtol=0, atol=0.1)
        torch.testing.assert_close(replaced, 2 * after, rtol=0.02, atol=0.05)


def test_fused_rms_norms_give_the_same_outputs():
    # The scheduler switches transformers' plain RMSNorm layers to torch's fused rms_norm (fewer launches per
    # step); the math is the same: the outputs equal the original forward's, here bit for bit on CPU (on a
    # GPU within a bf16 rounding).
    model = llama(dtype=torch.bfloat16)
    x = torch.tensor([[3, 9, 27, 5, 44]])
    norm = model.model.norm
    h = torch.randn(3, 7, norm.weight.shape[0], dtype=torch.bfloat16) * 4
    with torch.inference_mode():
        want = norm(h)
        norm.forward = batching._rms_norm_forward.__get__(norm)
        assert torch.equal(norm(h), want)
        del norm.forward
    if torch.cuda.is_available():
        norm = norm.cuda()
        with torch.inference_mode():
            want = norm(h.cuda())
            norm.forward = batching._rms_norm_forward.__get__(norm)
            torch.testing.assert_close(norm(h.cuda()), want, rtol=2**-6, atol=0)
            del norm.forward
        norm.cpu()
    with torch.inference_mode():
        want = model(input_ids=x).logits
        assert batching.fuse_rms_norms(model) == 2 * 2 + 1
        got = model(input_ids=x).logits
    assert torch.equal(got, want)


def test_compact_moves_only_the_rows_above_the_new_count_into_the_gaps():
    # Slots 0..5 in use; the rows of slots 0 and 3 leave. The rows of slots 4 and 5 move into the freed slots
    # (two moves), not every row after the first gap (five moves before); the rows below stay where they are.
    decoder = static.Decoder(llama(), 6, 8, graphs=False)
    for t in decoder.cache.keys + decoder.cache.values:
        for s in range(6):
            t[s].fill_(s)  # each slot's positions hold its number
    before = [t.clone() for t in decoder.cache.keys + decoder.cache.values]
    copies = []
    real = torch.Tensor.copy_

    def counted(self, *args, **kwargs):
        copies.append(1)
        return real(self, *args, **kwargs)

    keep, lengths = [1, 2, 4, 5], [3, 8, 5, 2]
    torch.Tensor.copy_ = counted
    try:
        order = decoder.compact(keep, lengths)
    finally:
        torch.Tensor.copy_ = real
    assert order == [4, 1, 2, 5]
    assert len(copies) == 2 * len(before)  # two rows moved, one copy per layer and tensor each
    for t, b in zip(decoder.cache.keys + decoder.cache.values, before):
        for j, s in enumerate(order):
            n = lengths[keep.index(s)]
            assert torch.equal(t[j, :, :n], b[s, :, :n])  # the positions in use came along
    assert decoder.compact([0, 1, 2], [1, 1, 1]) == [0, 1, 2]  # nothing left: nothing moves
