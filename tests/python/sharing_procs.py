"""The two processes of the sharing tests (test_sharing.py runs them with subprocess): an engine that
serves a small random Llama from shared memory (CPU) or CUDA IPC memory, and trainers that attach.

usage: python sharing_procs.py engine MANIFEST DEVICE   (then commands on stdin: "logits", "quit")
       python sharing_procs.py train MANIFEST           (attach, build the HF model, check, update, report)
       python sharing_procs.py hold MANIFEST            (attach and hold the lease until stdin closes)
Each process prints one JSON object per line on stdout.
"""

import json
import sys

import torch
import transformers

import livetrain

import tiny_model

TOKENS = torch.tensor([[1, 7, 42, 3, 99, 5, 250, 17, 8, 64, 128, 2]])


def tiny_config() -> transformers.LlamaConfig:
    return tiny_model.llama_config(256, intermediate_size=112, rms_norm_eps=1e-5)


def logits_hex(model, device) -> str:
    with torch.no_grad():
        out = model(TOKENS.to(device)).logits
    return out.float().cpu().numpy().tobytes().hex()


def say(**kw) -> None:
    print(json.dumps(kw), flush=True)


def engine(manifest: str, device: str) -> None:
    torch.manual_seed(0)
    config = tiny_config()
    # Built on its device, as the trainer builds it: buffers such as rotary inv_freq are then computed by
    # the same kernels on both sides (CPU and GPU pow may differ in the last bit).
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    params = dict(model.named_parameters())
    config_dict = json.loads(config.to_json_string())
    if device == "cpu":
        exported = livetrain.export_cpu(params, manifest, model_path="random-tiny-llama", config=config_dict)
        # Serve from the segment from now on: the trainer's in-place updates land there.
        for name, p in params.items():
            p.data = exported.tensors[name]
    else:
        exported = livetrain.export_cuda(params, manifest, model_path="random-tiny-llama", config=config_dict)
    say(ready=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "logits":
            say(logits=logits_hex(model, device))
        elif cmd == "quit":
            break
    exported.close()


def train(manifest: str) -> None:
    try:
        attached = livetrain.attach(manifest)
    except livetrain.Error as e:
        say(error=str(e))
        return
    model = livetrain.build_hf_model(attached).eval()
    device = next(model.parameters()).device
    before = logits_hex(model, device)
    # (b) no copy: every parameter's bytes lie inside a buffer mapped from the engine.
    buffers = attached.buffers()
    outside = []
    for name, p in model.named_parameters():
        start, end = p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()
        if not any(base <= start and end <= base + size for base, size, _ in buffers):
            outside.append(name)
    # (c) an optimizer step, in place, through autograd on the views.
    model.train()
    loss = model(TOKENS.to(device), labels=TOKENS.to(device)).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.eval()
    say(
        before=before,
        after=logits_hex(model, device),
        outside=outside,
        params=sum(1 for _ in model.parameters()),
        lease=attached.lease_held,
    )


def hold(manifest: str) -> None:
    try:
        attached = livetrain.attach(manifest)
    except livetrain.Error as e:
        say(error=str(e))
        return
    say(holding=attached.lease_held, tensors=len(attached.tensors))
    sys.stdin.read()


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "engine":
        engine(path, sys.argv[3])
    elif mode == "train":
        train(path)
    elif mode == "hold":
        hold(path)
    else:
        sys.exit(f"unknown mode {mode}")
