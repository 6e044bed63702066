"""AdaLoRA: AdaptedLinear.add_adalora against the float64 formula (tests/reference.py), the method
against Hugging Face peft's (logits, loss with the orthogonal penalty, gradients, the rank allocator's
masks step for step, its checkpoints), and a fine-tune of all-MiniLM-L6-v2 with pruning."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkern
from peftkern.nn import AdaptedLinear

from . import reference as ref
from . import tiny_models
from .conftest import DEVICES, assert_close, check_against_reference, poison_cuda_cache, randn
from .test_lora import seeded_mask

NAMES = ("x", "weight", "bias", "lora_A", "lora_E", "lora_B")


def make_layer(n_in, n_out, r, dtype, device, alpha=8.0, p=0.0):
    m = AdaptedLinear.adapt(nn.Linear(n_in, n_out, device=device, dtype=dtype))
    m.add_adalora("a", r, lora_alpha=alpha, lora_dropout=p)
    m._peftkern_active = ("a",)  # what inject's set_active does
    return m


def make_inputs(lead, n_in, n_out, r, dtype, device):
    t = (
        randn(*lead, n_in, dtype=dtype, device=device),
        randn(n_out, n_in, dtype=dtype, device=device, scale=n_in**-0.5),
        randn(n_out, dtype=dtype, device=device, scale=0.1),
        randn(r, n_in, dtype=dtype, device=device, scale=n_in**-0.5),
        randn(r, 1, dtype=dtype, device=device),
        randn(n_out, r, dtype=dtype, device=device, scale=r**-0.5),
    )
    for i in (0, 3, 4, 5):
        t[i].requires_grad_()
    return t


def call(m, x, W, b, A, E, B):
    params = {"weight": W, "bias": b, "lora_A.a": A, "lora_E.a": E, "lora_B.a": B}
    return torch.func.functional_call(m, params, (x,))


def check_layer(lead, n_in, n_out, r, dtype, device, p=0.0, alpha=8.0, seed=0):
    m = make_layer(n_in, n_out, r, dtype, device, alpha, p).train()
    inputs = make_inputs(lead, n_in, n_out, r, dtype, device)
    mask = None
    if p > 0:  # the dropout factors lora_linear draws on x after manual_seed(seed)
        A_folded = (inputs[3] * inputs[4]).detach()
        mask = seeded_mask((inputs[0], inputs[1], inputs[2], A_folded, inputs[5]), 1.0, p, seed)
        mask = mask.to(device="cpu", dtype=torch.float64)

    def fn(*ts):
        torch.manual_seed(seed)
        return call(m, *ts)

    def ref_fn(x, W, b, A, E, B):  # peft: scaling = r when lora_alpha <= 0
        return ref.adalora_linear(x, W, b, A, E, B, alpha if alpha > 0 else float(r), float(r), mask)

    return check_against_reference(fn, ref_fn, inputs, NAMES, dtype)


SHAPES = [((1,), 33, 17, 1), ((7,), 33, 65, 12), ((2, 3, 7), 64, 40, 5), ((129,), 96, 33, 7)]


@pytest.mark.parametrize("lead,n_in,n_out,r", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_forward_and_every_gradient(lead, n_in, n_out, r, dtype):
    check_layer(lead, n_in, n_out, r, dtype, "cpu")


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_forward_and_gradients(p):
    check_layer((5, 9), 33, 20, 6, torch.float32, "cpu", p=p, seed=3)


def test_alpha_not_positive_is_r_as_in_peft():
    check_layer((7,), 16, 8, 4, torch.float32, "cpu", alpha=0.0)  # peft: scaling = r when alpha <= 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_forward_and_every_gradient(dtype):
    for lead, n_in, n_out, r in SHAPES:
        poison_cuda_cache()  # an unwritten output element reads as NaN
        check_layer(lead, n_in, n_out, r, dtype, "cuda")
    poison_cuda_cache()
    check_layer((3, 33), 64, 96, 12, dtype, "cuda", p=0.1, seed=5)


def test_gradcheck_float64():
    m = make_layer(9, 5, 3, torch.float64, "cpu")
    inputs = make_inputs((4,), 9, 5, 3, torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda *ts: call(m, *ts), inputs)


def test_init_is_peft_s():
    torch.manual_seed(0)
    m = make_layer(300, 200, 12, torch.float32, "cpu")
    assert torch.equal(m.lora_E["a"], torch.zeros(12, 1))
    for t in (m.lora_A["a"], m.lora_B["a"]):
        assert abs(t.std().item() - 0.02) < 2e-3 and abs(t.mean().item()) < 2e-3
    assert m.ranknum["a"].item() == 12 and not m.ranknum["a"].requires_grad
    assert m.lora_settings["a"][0] == pytest.approx(8.0 / (12 + 1e-5), rel=1e-12)


def test_remove_and_restore_leave_a_plain_linear():
    m = make_layer(8, 4, 3, torch.float32, "cpu")
    m.add_lora("b", 2)
    assert "adalora[a]: r=3" in repr(m) and "lora[b]: r=2" in repr(m)
    m.remove("a")
    assert not hasattr(m, "lora_E") and not hasattr(m, "ranknum")
    m.remove("b")
    m.restore()
    assert type(m) is nn.Linear and not any("lora" in n for n, _ in m.named_parameters())


def test_merge_folds_B_E_A():
    m = make_layer(20, 12, 5, torch.float32, "cpu")
    with torch.no_grad():
        m.lora_E["a"].normal_()
    x = randn(6, 20)
    want = ref.adalora_linear(
        *(ref.f64(t) for t in (x, m.weight, m.bias, m.lora_A["a"], m.lora_E["a"], m.lora_B["a"])), 8.0, 5.0
    )
    assert_close(F.linear(x, m.merged_weight(["a"]), m.bias), want, torch.float32)


# ---------------------------------------------------------------- pruned ranks cost nothing


def pruned_layer(r=8, keep=(1, 0, 1, 1, 0, 0, 1, 0), device="cpu"):
    m = make_layer(33, 21, r, torch.float32, device)
    keep = torch.tensor(keep, dtype=torch.bool, device=device)
    with torch.no_grad():
        m.lora_E["a"].normal_()
        m.lora_E["a"].masked_fill_(~keep[:, None], 0.0)
    return m, keep


@pytest.mark.parametrize("device", DEVICES)
def test_final_pattern_computes_kept_ranks_with_the_same_outputs_and_gradients(device):
    full, keep = pruned_layer(device=device)
    compact = copy.deepcopy(full)
    compact.set_rank_pattern("a", keep, final=True)
    assert torch.equal(compact._kept_ranks("a", torch.zeros(1)), keep.nonzero().view(-1))
    x1 = randn(5, 7, 33, requires_grad=True, device=device)
    x2 = x1.detach().clone().requires_grad_()
    g = randn(5, 7, 21, device=device)
    if device == "cuda":
        poison_cuda_cache()
    out1, out2 = full(x1), compact(x2)
    assert_close(out2, out1, torch.float32)
    (out1 * g).sum().backward()
    (out2 * g).sum().backward()
    assert_close(x2.grad, x1.grad, torch.float32, "grad x")
    for d in ("lora_A", "lora_B"):  # pruned rows: zero in both
        assert_close(getattr(compact, d)["a"].grad, getattr(full, d)["a"].grad, torch.float32, d)
    E1, E2 = full.lora_E["a"].grad, compact.lora_E["a"].grad
    assert_close(E2[keep], E1[keep], torch.float32, "grad E kept")
    assert torch.equal(E2[~keep], torch.zeros_like(E2[~keep]))  # peft's would be discarded by its mask


def test_rank_zero_layer_keeps_one_zero_rank():
    m, keep = pruned_layer(r=3, keep=(0, 0, 0))
    m.set_rank_pattern("a", keep, final=True)
    assert m._kept_ranks("a", torch.zeros(1)).tolist() == [0]
    x = randn(4, 33, requires_grad=True)
    out = m(x)
    assert_close(out, F.linear(x, m.weight, m.bias), torch.float32)
    out.sum().backward()
    assert torch.equal(m.lora_A["a"].grad, torch.zeros_like(m.lora_A["a"]))


def test_no_grad_skips_zero_E_ranks_and_notices_when_E_changes():
    m, keep = pruned_layer()
    x = randn(3, 33)
    with torch.no_grad():
        assert torch.equal(m._kept_ranks("a", x), keep.nonzero().view(-1))
        out = m(x)
        want = ref.adalora_linear(
            *(ref.f64(t) for t in (x, m.weight, m.bias, m.lora_A["a"], m.lora_E["a"], m.lora_B["a"])),
            8.0,
            8.0,
        )
        assert_close(out, want, torch.float32)
        m.lora_E["a"].fill_(1.0)  # an in-place change (an optimizer step): every rank again
        assert m._kept_ranks("a", x) is None
    assert m._kept_ranks("a", x.requires_grad_()) is None  # a gradient needed: every rank


def test_no_grad_after_an_optimizer_step_sees_the_new_E():
    m, keep = pruned_layer()
    with torch.no_grad():
        assert m._kept_ranks("a", torch.zeros(1)) is not None
    m(randn(2, 33)).sum().backward()
    torch.optim.AdamW(m.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert m._kept_ranks("a", torch.zeros(1)) is None  # the pruned E moved


def test_compact_under_compile_fullgraph():
    m, keep = pruned_layer()
    x = randn(4, 33)
    with torch.no_grad():
        want = m(x)
        got = torch.compile(m, fullgraph=True, backend="eager")(x)  # every rank there
    assert_close(got, want, torch.float32)
    m.set_rank_pattern("a", keep, final=True)  # the final pattern: the kept ranks, compiled too
    x.requires_grad_()
    got = torch.compile(m, fullgraph=True, backend="eager")(x)
    assert_close(got, want, torch.float32)
    got.sum().backward()
    assert torch.equal(m.lora_E["a"].grad[~keep], torch.zeros(int((~keep).sum()), 1))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(total_step=None), ValueError, "total_step (the training's steps) is required"),
        (dict(total_step=10, init_r=4, target_r=8), ValueError, "target_r (8) must not exceed init_r (4)"),
        (dict(total_step=10, tinit=5, tfinal=5), ValueError, "tinit (5) must be below total_step - tfinal"),
        (dict(total_step=10, beta1=1.0), ValueError, "beta1 must be in [0, 1)"),
        (dict(total_step=10, init_r=0), ValueError, "init_r must be in [1, 2^63)"),
        (dict(total_step=10, lora_dropout=1.0), ValueError, "lora_dropout must be in [0, 1)"),
        (dict(total_step=10, orth_reg_weight=-1.0), ValueError, "orth_reg_weight must be >= 0"),
    ],
)
def test_bad_configs(kwargs, error, message):
    with pytest.raises(error) as e:
        peftkern.AdaLoRAConfig(**kwargs)
    assert message in str(e.value)


def test_bad_layer_arguments():
    m = make_layer(8, 4, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="already holds an adapter named 'a'"):
        m.add_adalora("a", 3)
    with pytest.raises(ValueError, match="r must be in"):
        m.add_adalora("b", 0)
    with pytest.raises(TypeError, match="lora_alpha must be a finite float"):
        m.add_adalora("b", 2, lora_alpha="8")
    with pytest.raises(ValueError, match="keep has 2 entries for r = 3"):
        m.set_rank_pattern("a", torch.ones(2, dtype=torch.bool), final=True)
    with pytest.raises(ValueError, match="no AdaLoRA named 'zz'"):
        m.set_rank_pattern("zz", None, final=True)


def test_update_ranks_bad_calls():
    model = tiny_models.bert()
    with pytest.raises(ValueError, match="holds no AdaLoRA adapter"):
        peftkern.update_ranks(model, 0)
    peftkern.inject(model, peftkern.AdaLoRAConfig(total_step=10))
    with pytest.raises(TypeError, match="step must be an int >= 0"):
        peftkern.update_ranks(model, -1)
    with pytest.raises(ValueError, match="has no gradient; call update_ranks after loss.backward"):
        peftkern.update_ranks(model, 0)
    with pytest.raises(ValueError, match="no AdaLoRA adapter named 'x'"):
        peftkern.update_ranks(model, 0, name="x")


# ---------------------------------------------------------------- against Hugging Face peft

peft = pytest.importorskip("peft")

SCHEDULE = dict(init_r=6, target_r=3, tinit=2, tfinal=3, deltaT=2, total_step=12, lora_alpha=16.0)
MODELS = {
    "bert": lambda: tiny_models.bert_head("BertForSequenceClassification", num_labels=3),
    "llama": lambda: tiny_models.llama(),
}


def batch(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (4, 9), generator=g)
    labels = torch.randint(0, 3, (4,), generator=g) if kind == "bert" else ids
    return ids, labels


def peft_and_peftkern(kind, random_E=True, **overrides):
    cfg = {**SCHEDULE, **overrides}
    base = MODELS[kind]()
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**cfg))
    ours = peftkern.inject(copy.deepcopy(base), peftkern.AdaLoRAConfig(**cfg))
    inner = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for n, m in ours.named_modules():
            if isinstance(m, AdaptedLinear):
                if random_E:
                    inner[n].lora_E["default"].normal_(0, 0.5)
                for a in ("lora_A", "lora_E", "lora_B"):
                    getattr(m, a)["default"].copy_(getattr(inner[n], a)["default"])
    return theirs, ours


def lora_params(model, prefix=""):
    return {n[len(prefix) :]: p for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("kind", list(MODELS))
def test_logits_loss_with_penalty_and_gradients_are_peft_s(kind):
    theirs, ours = peft_and_peftkern(kind)
    ids, labels = batch(kind)
    # AdaLoraModel.forward adds the penalty (a bare PeftModel's forward skips it)
    a, b = theirs.base_model(input_ids=ids, labels=labels), ours(input_ids=ids, labels=labels)
    assert_close(b.logits, a.logits, torch.float32, "logits")
    assert_close(b.loss, a.loss, torch.float32, "loss")
    # the penalty is in it: the loss without it differs by the reference penalty
    pairs = [
        (ref.f64(m.lora_A["default"]), ref.f64(m.lora_B["default"]))
        for m in ours.modules()
        if isinstance(m, AdaptedLinear)
    ]
    penalty = ref.adalora_orth_loss(pairs, SCHEDULE.get("orth_reg_weight", 0.5))
    assert_close(peftkern.adalora_orth_loss(ours), penalty, torch.float32, "penalty")
    plain = F.cross_entropy(b.logits.reshape(-1, b.logits.shape[-1]).double(), labels.reshape(-1))
    if kind == "llama":  # the causal LM shifts its labels
        lg = b.logits[:, :-1].reshape(-1, b.logits.shape[-1]).double()
        plain = F.cross_entropy(lg, labels[:, 1:].reshape(-1))
    assert_close(b.loss, plain + penalty, torch.float32, "loss = task loss + penalty")
    a.loss.backward()
    b.loss.backward()
    theirs_p = lora_params(theirs, "base_model.model.")
    ours_p = lora_params(ours)
    assert set(ours_p) == set(theirs_p)
    for n, p in ours_p.items():
        assert_close(p.grad, theirs_p[n].grad, torch.float32, f"grad {n}")


def train_both(kind, steps=12, compact_check=False):
    theirs, ours = peft_and_peftkern(kind, random_E=False)
    opts = [
        torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-2) for m in (theirs, ours)
    ]
    theirs.train(), ours.train()
    history = []
    for step in range(steps):
        ids, labels = batch(kind, seed=step)
        outs = []
        for m, opt in zip((theirs.base_model, ours), opts):
            out = m(input_ids=ids, labels=labels)
            out.loss.backward()
            opt.step()
            outs.append(out)
        theirs.base_model.update_and_allocate(step)
        budget, pattern = peftkern.update_ranks(ours, step)
        for o in opts:
            o.zero_grad()
        history.append((step, outs, budget, pattern, theirs.peft_config["default"].rank_pattern))
        yield theirs, ours, history[-1]


@pytest.mark.parametrize("kind", list(MODELS))
def test_training_with_update_ranks_gives_peft_s_masks_patterns_and_logits(kind):
    masked_steps, last = [], SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    for theirs, ours, (step, (a, b), budget, pattern, their_pattern) in train_both(kind):
        assert_close(b.logits, a.logits, torch.float32, f"logits at step {step}", tol=1e-4)
        assert_close(b.loss, a.loss, torch.float32, f"loss at step {step}", tol=1e-4)
        theirs_E = {n: p for n, p in lora_params(theirs, "base_model.model.").items() if "lora_E" in n}
        for n, p in lora_params(ours).items():
            if "lora_E" in n:
                assert torch.equal(p == 0, theirs_E[n] == 0), f"E mask of {n} at step {step}"
        if pattern is not None:
            masked_steps.append(step)
            assert pattern == their_pattern, f"rank pattern at step {step}"
        if step >= last:
            assert sum(sum(v) for v in pattern.values()) <= budget
    # tinit 2, deltaT 2: masks at 4, 6, 8, the final one at 9, then every step with the fixed pattern
    assert masked_steps == [4, 6, 8, 9, 10, 11]
    assert budget == SCHEDULE["target_r"] * len(pattern)
    # after the final pattern the layers compute only the kept ranks
    for m in ours.modules():
        if isinstance(m, AdaptedLinear):
            kept = m._kept_ranks("default", torch.zeros(1, requires_grad=True))
            assert kept is not None and len(kept) < SCHEDULE["init_r"]


def test_the_compact_path_gives_the_full_path_s_outputs_and_gradients():
    for theirs, ours, (step, _, _, _, _) in train_both("bert"):
        pass
    full = copy.deepcopy(ours)
    for m in full.modules():
        if isinstance(m, AdaptedLinear):
            m.__dict__["_adalora_kept"] = {}  # forget the final pattern: every rank computes
    ids, labels = batch("bert", seed=99)
    a, b = full(input_ids=ids, labels=labels), ours(input_ids=ids, labels=labels)
    assert_close(b.logits, a.logits, torch.float32)
    a.loss.backward()
    b.loss.backward()
    full_p = lora_params(full)
    for n, p in lora_params(ours).items():
        if "lora_E" in n:  # the pruned E's gradient is zero on the compact path (the next mask drops it)
            kept = p.detach() != 0
            assert_close(p.grad[kept], full_p[n].grad[kept], torch.float32, f"grad {n}")
        else:
            assert_close(p.grad, full_p[n].grad, torch.float32, f"grad {n}")


@pytest.mark.parametrize("pruned", [False, True])
def test_load_peft_weights_before_and_after_pruning(tmp_path, pruned):
    if pruned:
        for theirs, _, _ in train_both("bert"):
            pass
        assert theirs.peft_config["default"].rank_pattern is not None
    else:
        theirs, _ = peft_and_peftkern("bert")
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    saved = __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(tmp_path / "adapter_model.safetensors")
    )
    shapes = {k: v.shape[0] for k, v in saved.items() if k.endswith("lora_A")}
    assert (min(shapes.values()) < SCHEDULE["init_r"]) == pruned  # peft cut the pruned ranks
    # peft's own reload of its checkpoint, and peftkern's
    reloaded = peft.PeftModel.from_pretrained(MODELS["bert"](), tmp_path).eval()
    ours = peftkern.inject(MODELS["bert"](), peftkern.AdaLoRAConfig(**SCHEDULE)).eval()
    peftkern.integrations.peft.load_peft_weights(ours, str(tmp_path))
    ids, _ = batch("bert", seed=7)
    with torch.no_grad():
        want, again, got = (m(input_ids=ids).logits for m in (theirs, reloaded, ours))
    assert_close(again, want, torch.float32)
    assert_close(got, want, torch.float32)


def test_load_peft_weights_bad_checkpoint():
    theirs, ours = peft_and_peftkern("bert")
    state = peft.get_peft_model_state_dict(theirs)
    key = next(k for k in state if k.endswith("lora_E"))
    with pytest.raises(ValueError, match="lacks the tensor for"):
        peftkern.integrations.peft.load_peft_weights(ours, {k: v for k, v in state.items() if k != key})
    state[key] = torch.zeros(9, 1)
    with pytest.raises(ValueError, match=r"lora_E is \(9, 1\) in the state dict but \(6, 1\) in the model"):
        peftkern.integrations.peft.load_peft_weights(ours, state)


def test_save_then_from_pretrained_and_merge(tmp_path, capsys):
    _, ours = peft_and_peftkern("bert")
    ids, labels = batch("bert")
    with torch.no_grad():
        want = ours(input_ids=ids).logits
    peftkern.save_pretrained(ours, tmp_path)
    loaded = peftkern.from_pretrained(MODELS["bert"](), tmp_path)
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, want, torch.float32, "reloaded")
    peftkern.merge(loaded)
    assert "AdaLoRA merged into" in capsys.readouterr().out
    with torch.no_grad():
        out = loaded(input_ids=ids, labels=labels)
    assert_close(out.logits, want, torch.float32, "merged")
    assert not any(isinstance(m, AdaptedLinear) for m in loaded.modules())
    # merged: no penalty is added any more (no factors left)
    assert_close(out.loss, F.cross_entropy(out.logits, labels), torch.float32, "merged loss")


def test_delete_adapter_takes_the_penalty_off():
    _, ours = peft_and_peftkern("bert")
    ids, labels = batch("bert")
    peftkern.delete_adapter(ours, "default")
    out = ours(input_ids=ids, labels=labels)
    assert torch.equal(out.loss, F.cross_entropy(out.logits, labels))
    assert "_peftkern_adalora_hook" not in ours.__dict__ and "_peftkern_adalora" not in ours.__dict__


def test_mixed_batch_of_an_adalora_and_a_lora_equals_each_alone():
    _, model = peft_and_peftkern("bert")
    peftkern.inject(model, peftkern.LoRAConfig(r=4), name="lora")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AdaptedLinear):
                m.lora_B["lora"].normal_(0, 0.3)
    model.eval()
    ids, _ = batch("bert", seed=3)
    alone = {}
    with torch.no_grad():
        for n in ("default", "lora", None):
            peftkern.set_active(model, n)
            alone[n] = model(input_ids=ids).logits
        names = ["default", "lora", None, "default"]
        with peftkern.tasks(names):
            mixed = model(input_ids=ids).logits
    for i, n in enumerate(names):
        assert_close(mixed[i], alone[n][i], torch.float32, f"sample {i} ({n})")
    peftkern.set_active(model, ["default", "lora"])  # together: the updates add
    with torch.no_grad():
        both = model(input_ids=ids).logits
    assert not torch.allclose(both, alone["default"]) and torch.isfinite(both).all()


def test_mixed_batch_gradients_are_each_adapter_s_own_samples():
    _, model = peft_and_peftkern("bert")
    peftkern.inject(model, peftkern.LoRAConfig(r=4), name="lora")
    model.train()
    ids, labels = batch("bert", seed=4)
    names = ["default", "lora", "default", None]
    with peftkern.tasks(names):
        logits = model(input_ids=ids).logits
    (logits * torch.arange(1.0, 4.0)).sum().backward()
    mixed = {n: p.grad.clone() for n, p in lora_params(model).items() if n.endswith(".default")}
    model.zero_grad()
    peftkern.set_active(model, "default")
    rows = [i for i, n in enumerate(names) if n == "default"]
    (model(input_ids=ids[rows]).logits * torch.arange(1.0, 4.0)).sum().backward()
    for n, p in lora_params(model).items():
        if n.endswith(".default"):
            assert_close(mixed[n], p.grad, torch.float32, f"grad {n}")


def test_update_ranks_names_the_adapter_when_there_are_several():
    _, model = peft_and_peftkern("bert")
    peftkern.inject(model, peftkern.AdaLoRAConfig(**SCHEDULE), name="second")
    with pytest.raises(ValueError, match=r"holds AdaLoRA adapters \['default', 'second'\]; name one"):
        peftkern.update_ranks(model, 0)
    with pytest.raises(ValueError, match="the rank pattern is not set"):
        peftkern.update_ranks(model, SCHEDULE["total_step"] - 1, name="second")


@pytest.mark.cuda
def test_cuda_final_pattern_forward_and_backward_make_no_host_sync():
    from .conftest import count_cuda_syncs

    m, keep = pruned_layer(device="cuda")
    m.set_rank_pattern("a", keep, final=True)
    x = randn(64, 33, device="cuda", requires_grad=True)
    m(x).sum().backward()  # warm-up
    assert count_cuda_syncs(lambda: m(x).sum().backward()) == 0
    m.set_rank_pattern("a", None, final=False)
    with torch.no_grad():
        m(x)  # the zero-E search: one host read, then cached until E changes
        assert m._kept_ranks("a", x) is not None
        assert count_cuda_syncs(lambda: m(x)) == 0


# ---------------------------------------------------------------- MiniLM

minilm_tests = pytest.importorskip("tests.test_minilm")


def test_minilm_fine_tune_with_pruning():
    D, LAYERS = minilm_tests.D, minilm_tests.LAYERS
    steps, cfg = 24, peftkern.AdaLoRAConfig(init_r=8, target_r=4, tinit=4, tfinal=6, deltaT=2, total_step=24)
    encoder = copy.deepcopy(minilm_tests._base())
    torch.manual_seed(1)
    peftkern.inject(encoder, cfg)
    sites = LAYERS * 2  # query and value
    trainable, _ = peftkern.trainable_parameters(encoder)
    assert trainable == sites * cfg.init_r * (D + 1 + D)
    model = minilm_tests.Classifier(encoder).train()
    ids, mask, labels = minilm_tests._batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(steps):
        loss = F.cross_entropy(model(ids, mask), labels) + peftkern.adalora_orth_loss(encoder)
        loss.backward()
        opt.step()
        budget, pattern = peftkern.update_ranks(encoder, step)
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert budget == sites * cfg.target_r
    kept = sum(sum(v) for v in pattern.values())
    assert budget - 2 <= kept <= budget  # ties at the threshold prune together
    E = [m.lora_E["default"] for m in encoder.modules() if isinstance(m, AdaptedLinear)]
    assert sum(int((e != 0).sum()) for e in E) <= budget
