"""Distributed training on the CPU: two processes over gloo train a small model holding every
peftkern module, under DistributedDataParallel and under FSDP2's fully_shard, and end with the
parameters of a single-process run on the same global batch."""

import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import peftkern

WORLD = 2
STEPS = 4
D, HEADS, KV_HEADS = 32, 4, 2


class EveryModule(nn.Module):
    """A soft prompt, prefixed attention, then LoRA, a mask-tuned linear and an adapter."""

    def __init__(self):
        super().__init__()
        self.prompt = peftkern.nn.SoftPrompt(3, D)
        self.prefix = peftkern.nn.PrefixKV(1, KV_HEADS, D // HEADS, 4)
        self.attn = peftkern.nn.PrefixSelfAttention(D, HEADS, num_kv_heads=KV_HEADS, causal=True)
        self.lora = peftkern.nn.LoRALinear(D, D, 4, lora_alpha=8)
        self.mask = peftkern.nn.MaskedLinear(D, D)
        self.adapter = peftkern.nn.Adapter(D, 8, init="lora")
        self.head = nn.Linear(D, 3)
        with torch.no_grad():  # nonzero LoRA B and adapter up, so every factor gets a gradient at once
            self.lora.lora_B.normal_(0, 0.1)
            self.adapter.up.weight.normal_(0, 0.1)
            self.mask.scores.uniform_(0.0, 0.01)  # some weights masked, some scores near the threshold

    def forward(self, emb):
        h, _ = self.prompt(emb)
        prefix_k, prefix_v = self.prefix(0)
        h = h + self.attn(h, prefix_k, prefix_v)
        h = self.adapter(self.mask(self.lora(h)))
        return self.head(h.mean(1))


def make_model():
    torch.manual_seed(0)
    return EveryModule()


def global_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(2 * WORLD, 5, D, generator=g), torch.randint(0, 3, (2 * WORLD,), generator=g)


def train(model, step_batch):
    """STEPS of AdamW on cross-entropy; step_batch(step) -> (inputs, labels) of this process."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(STEPS):
        emb, labels = step_batch(step)
        loss = nn.functional.cross_entropy(model(emb), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()


def trained_state(model):
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def worker(rank, mode, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = make_model()
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            for child in (model.prompt, model.prefix, model.attn, model.lora, model.mask, model.adapter):
                fully_shard(child, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)

        def local_batch(step):
            emb, labels = global_batch(step)
            half = emb.shape[0] // WORLD
            return emb[rank * half : (rank + 1) * half], labels[rank * half : (rank + 1) * half]

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(wrapped, local_batch)
        state = trained_state(model)
        if rank == 0:
            torch.save({"state": state, "warnings": [str(w.message) for w in caught]}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
@pytest.mark.skipif(sys.platform == "win32", reason="file:// store")
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one(mode, tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(mode, str(tmp_path / "store"), str(out)), nprocs=WORLD, join=True)
    result = torch.load(out, weights_only=True)
    views = [w for w in result["warnings"] if "view" in w]
    assert not views, f"{mode}: a module returned a view: {views[0][:200]}"

    single = make_model()
    train(single, global_batch)  # the whole global batch in one process
    expected = trained_state(single)
    assert result["state"].keys() == expected.keys()
    initial = make_model().state_dict()
    moved = 0
    for name, want in expected.items():
        got = result["state"][name]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{mode} {name}: {m}")
        moved += not torch.equal(want, initial[name])
    trainable = sum(p.requires_grad for p in make_model().parameters())
    assert moved >= trainable, f"only {moved} tensors changed in training; {trainable} are trainable"
