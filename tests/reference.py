"""The reference for every op: the plain eager formula, written once, evaluated in float64."""

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

ACTIVATIONS = {
    "gelu": lambda z: F.gelu(z),
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def f64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def adapter(x, w_down, b_down, w_up, b_up, activation="gelu", scale=1.0, residual=None, gate=None):
    """x + scale * up(act(down(x))), as a user writes it (float64 leaves in, float64 out); a gate
    [...] (UniPELT's) multiplies the update per row."""
    h = ACTIVATIONS[activation](F.linear(x, w_down, b_down))
    update = F.linear(h, w_up, b_up)
    if gate is not None:
        update = gate.unsqueeze(-1) * update
    return (x if residual is None else residual) + scale * update


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, mask=None, gate=None):
    """peft's LoRA forward: base(x) + scaling * lora_B(lora_A(dropout(x))); mask = dropout factors;
    a gate [...] multiplies the update per row."""
    dropped = x if mask is None else x * mask
    update = F.linear(F.linear(dropped, lora_A), lora_B)
    if gate is not None:
        update = gate.unsqueeze(-1) * update
    return F.linear(x, weight, bias) + scaling * update


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, mask=None):
    """peft's DoRA forward: the adapted weight W + s·B·A materialised, its row norm detached;
    mask = dropout factors (training), which make peft's form run the base product on dropout(x) too."""
    c = magnitude / torch.linalg.norm(weight + scaling * lora_B @ lora_A, dim=1).detach()
    dropped = x if mask is None else x * mask
    lora = scaling * F.linear(F.linear(dropped, lora_A), lora_B)
    if mask is None:
        return c * (F.linear(x, weight) + lora) + (0 if bias is None else bias)
    return F.linear(x, weight, bias) + (c - 1) * F.linear(dropped, weight) + c * lora


def lora_linear_multi(x, weight, bias, lora_A, lora_B, adapter_ids, scalings):
    """A per-token loop over single-adapter LoRA: the definition of the multi-adapter op."""
    x2 = x.reshape(-1, x.shape[-1])
    rows = [F.linear(x2[:0], weight, bias)]  # no token: an empty output, not an empty cat
    for t, i in enumerate(adapter_ids.tolist()):
        xt = x2[t : t + 1]
        rows.append(
            F.linear(xt, weight, bias)
            if i < 0
            else lora_linear(xt, weight, bias, lora_A[i], lora_B[i], float(scalings[i]))
        )
    return torch.cat(rows).reshape(*x.shape[:-1], weight.shape[0])


class Binarizer(torch.autograd.Function):
    """The papers' straight-through binarizer: forward scores > threshold (in float32, strict),
    backward passes the gradient through unchanged."""

    @staticmethod
    def forward(ctx, scores, threshold):
        return (scores.to(torch.float32) > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def masked_linear(x, weight, bias, scores, threshold):
    return F.linear(x, weight * Binarizer.apply(scores, threshold).to(weight.dtype), bias)


def mask_bits(keep):
    """Bit-by-bit packing of a bool [rows, cols] mask, written independently of the op:
    bit j of int32 word w of row n is element (n, 32 w + j)."""
    rows, cols = keep.shape
    words = (cols + 31) // 32
    out = torch.zeros(rows, words, dtype=torch.int64)
    for c in range(cols):
        out[:, c // 32] |= keep[:, c].to(torch.int64) << (c % 32)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def prefix_attention_gated(q, k, v, prefix_k, prefix_v, gate, **kwargs):
    """The prefix's share of each query row scaled by gate (broadcastable to [B, H, L]):
    attention(...) + (gate - 1) * (the prefix part alone, under the joint softmax), the prefix part
    being the same attention with the sequence values zeroed."""
    full = prefix_attention(q, k, v, prefix_k, prefix_v, **kwargs)
    prefix_part = prefix_attention(q, k, torch.zeros_like(v), prefix_k, prefix_v, **kwargs)
    return full + (gate - 1).unsqueeze(-1) * prefix_part


def prefix_attention(
    q, k, v, prefix_k, prefix_v, prefix_ids=None, attn_mask=None, causal=False, scale=None, prefix_bias=None
):
    """Prefix tuning as a user writes it: torch.cat of the (expanded or per-sample) prefix in front of
    k and v, then F.scaled_dot_product_attention (grouped-query heads through enable_gqa). The mask
    covers the sequence keys: the prefix is always visible; sequence key j is hidden when causal and
    j > i + (S - L) (bottom-right, as causal_lower_right), and where a bool attn_mask is False (an
    additive one is added). prefix_bias (broadcastable to [B, H, L, P]) is added to the prefix keys'
    scores: one additive mask [prefix_bias ; sequence mask] over the concatenated keys. A query that
    sees no key outputs 0 (SDPA alone gives NaN). float64 runs SDPA's math backend (the softmax
    written out), so the tests' reference shares no fused kernel."""
    B, H, L, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], prefix_k.shape[-2]
    if prefix_ids is None:
        pk, pv = prefix_k.expand(B, *prefix_k.shape), prefix_v.expand(B, *prefix_v.shape)
    else:
        pk, pv = prefix_k[prefix_ids], prefix_v[prefix_ids]
    keys, values = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    mask, blind = None, None
    if attn_mask is None and causal and L <= S and prefix_bias is None:
        mask = causal_lower_right(L, P + S)  # over [prefix; sequence]: with L <= S the prefix stays visible
    elif attn_mask is not None or causal or prefix_bias is not None:
        seq_bias = torch.zeros(B, H, L, S, dtype=q.dtype, device=q.device)
        if attn_mask is not None:
            seq_bias = (
                seq_bias.masked_fill(~attn_mask, float("-inf"))
                if attn_mask.dtype == torch.bool
                else seq_bias + attn_mask
            )
        if causal:
            i = torch.arange(L, device=q.device)[:, None]
            j = torch.arange(S, device=q.device)[None]
            seq_bias = seq_bias.masked_fill(j > i + (S - L), float("-inf"))
        prefix_part = torch.zeros(B, H, L, P, dtype=q.dtype, device=q.device)
        if prefix_bias is not None:
            prefix_part = prefix_part + prefix_bias.to(q.dtype)
        bias = torch.cat([prefix_part, seq_bias], -1)
        blind = torch.isneginf(bias).all(
            -1, keepdim=True
        )  # rows that see no key: computed unmasked, then zeroed
        mask = bias.masked_fill(blind, 0)
    with sdpa_kernel(SDPBackend.MATH) if q.dtype == torch.float64 else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=scale, enable_gqa=H != Hkv
        )
    return out if blind is None else out.masked_fill(blind, 0)


# Eager twins of peftkern.nn's modules, on the formulas above: what a user writes without peftkern
# (the model tests train them side by side with peftkern; the benchmarks time them).
class EagerAdapter(nn.Module):
    """A bottleneck adapter as AdapterHub computes it: two nn.Linear, the activation, the scaled add."""

    def __init__(self, d, r, scale=1.0, activation="gelu", device=None, dtype=None):
        super().__init__()
        self.down, self.up = (
            nn.Linear(d, r, device=device, dtype=dtype),
            nn.Linear(r, d, device=device, dtype=dtype),
        )
        self.scale, self.activation = scale, activation

    def forward(self, x, residual=None):
        return adapter(
            x,
            self.down.weight,
            self.down.bias,
            self.up.weight,
            self.up.bias,
            self.activation,
            self.scale,
            residual,
        )


class EagerLoRALinear(nn.Module):
    """peft's LoRA layer written out: frozen weight and bias, lora_A, lora_B, nn.Dropout on the branch."""

    def __init__(self, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0):
        super().__init__()
        self.weight, self.bias, self.lora_A, self.lora_B = weight, bias, lora_A, lora_B
        self.scaling, self.dropout = scaling, nn.Dropout(dropout_p)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(
            F.linear(self.dropout(x), self.lora_A), self.lora_B
        )


class EagerMaskedLinear(nn.Module):
    """Mask tuning written out: F.linear with weight * Binarizer(scores) (straight-through)."""

    def __init__(self, weight, bias, scores, threshold):
        super().__init__()
        self.weight, self.bias, self.scores, self.threshold = weight, bias, scores, threshold

    def forward(self, x):
        return masked_linear(x, self.weight, self.bias, self.scores, self.threshold)


class EagerAdaMix(nn.Module):
    """AdaMix written out on the stacked experts: in training one down and one up expert drawn per call
    (two uniform draws from torch's CPU generator, as AdaMix's paper routes), in eval their means."""

    def __init__(self, m):
        super().__init__()
        self.down_weight, self.down_bias, self.up_weight, self.up_bias = (
            m.down_weight,
            m.down_bias,
            m.up_weight,
            m.up_bias,
        )
        self.scale, self.activation = m.scale, m.activation

    def forward(self, x, residual=None):
        route = torch.randint(self.down_weight.shape[0], (2,)).tolist() if self.training else None
        stacked = (self.down_weight, self.down_bias, self.up_weight, self.up_bias)
        return adamix(x, *stacked, route, self.activation, self.scale, residual)


class EagerAdapterFusion(nn.Module):
    """AdapterFusion as AdapterHub computes it: each adapter on x in turn, then adapter_fusion."""

    def __init__(self, m):
        super().__init__()
        self.adapters, self.query, self.key, self.value = m.adapters, m.query, m.key, m.value
        self.temperature = m.temperature

    def forward(self, x, residual=None):
        a = self.adapters
        stack = adapter_stack(x, a.down_weight, a.down_bias, a.up_weight, a.up_bias, a.activation, a.scale)

        def w(lin, name):
            return None if lin is None else getattr(lin, name)

        return adapter_fusion(
            x,
            stack,
            w(self.query, "weight"),
            w(self.query, "bias"),
            w(self.key, "weight"),
            w(self.key, "bias"),
            w(self.value, "weight"),
            residual,
            self.temperature,
        )


def to_eager(model):
    """Swaps every peftkern module of a model for its eager twin, in place (the same Parameters, so
    the same names, values and trainable flags, and the same training mode); returns the model."""
    import peftkern

    for name, m in list(model.named_modules()):
        if isinstance(m, peftkern.nn.AdaptedLinear):  # peftkern.inject's layers: one adapter, "default"
            if len(m.lora_A):
                scaling, p = m.lora_settings["default"]
                new = EagerLoRALinear(m.weight, m.bias, m.lora_A["default"], m.lora_B["default"], scaling, p)
            else:
                new = EagerMaskedLinear(m.weight, m.bias, m.scores["default"], m.mask_thresholds["default"])
        elif isinstance(m, peftkern.nn.LoRALinear):
            if m.merged:
                raise ValueError(f"to_eager: {name} is merged; its twin is a plain nn.Linear")
            new = EagerLoRALinear(m.weight, m.bias, m.lora_A, m.lora_B, m.scaling, m.lora_dropout)
        elif isinstance(m, peftkern.nn.MaskedLinear):
            new = EagerMaskedLinear(m.weight, m.bias, m.scores, m.threshold)
        elif isinstance(m, peftkern.nn.Adapter):
            new = EagerAdapter(m.d_model, m.bottleneck, m.scale, m.activation, device="meta")
            new.down, new.up = m.down, m.up
        elif isinstance(m, peftkern.nn.AdaMixAdapter):
            new = EagerAdaMix(m)
        elif isinstance(m, peftkern.nn.AdapterFusion):
            new = EagerAdapterFusion(m)
        else:
            continue
        new.train(m.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


@contextlib.contextmanager
def adapter_calls(model):
    """A list that gets the site name of every adapter call (peftkern's or the eager twin's adapter; one
    that AdapterDrop skips is not called) while the context is open."""
    calls = []
    handles = [
        a.register_forward_hook(lambda *_, n=n: calls.append(n))
        for n, m in model.named_modules()
        if isinstance(getattr(m, "adapter", None), nn.ModuleDict)
        for a in m.adapter.values()
    ]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def eager_twin(model):
    """A deep copy of a peftkern-injected model, computing eagerly (to_eager)."""
    return to_eager(copy.deepcopy(model))


# ---------------------------------------------------------------- AdaMix and side-tuning
def adamix(
    x, down_weight, down_bias, up_weight, up_bias, route=None, activation="gelu", scale=1.0, residual=None
):
    """AdaMix (Wang et al. 2022) written out on the stacked experts [E, ...]: route = (i, j) takes the
    down-projection of expert i and the up-projection of expert j; route None averages each stacked
    tensor over the experts (the merged, inference-time adapter)."""
    if route is None:
        wd, bd, wu, bu = (t.mean(0) for t in (down_weight, down_bias, up_weight, up_bias))
    else:
        i, j = route
        wd, bd, wu, bu = down_weight[i], down_bias[i], up_weight[j], up_bias[j]
    return adapter(x, wd, bd, wu, bu, activation, scale, residual)


def symmetric_kl(logits_a, logits_b):
    """KL(p_a || p_b) + KL(p_b || p_a) of the softmax distributions over the last dimension, averaged
    over the rows (all leading dimensions), through F.kl_div (which takes log q as its input and p as
    its target and gives KL(p || q))."""
    la = F.log_softmax(logits_a.reshape(-1, logits_a.shape[-1]), -1)
    lb = F.log_softmax(logits_b.reshape(-1, logits_b.shape[-1]), -1)
    return F.kl_div(lb, la, reduction="batchmean", log_target=True) + F.kl_div(
        la, lb, reduction="batchmean", log_target=True
    )


def side_tuning(base_out, side_out, alpha):
    """Side-tuning's blend (Zhang et al. 2020)."""
    return alpha * base_out + (1 - alpha) * side_out


# ---------------------------------------------------------------- many adapters: multi, stack, fusion


def adapter_multi(x, w_down, b_down, w_up, b_up, adapter_ids, activation="gelu", scale=1.0, residual=None):
    """The eager loop over adapters a user writes: each adapter on its own tokens, the tokens of no
    adapter (id -1) keep their residual."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    res2 = x2 if residual is None else residual.reshape(-1, d)
    out = res2.clone()
    for i in range(w_down.shape[0]):
        rows = adapter_ids == i
        out[rows] = adapter(
            x2[rows],
            w_down[i],
            None if b_down is None else b_down[i],
            w_up[i],
            None if b_up is None else b_up[i],
            activation,
            scale,
            res2[rows],
        )
    return out.reshape(x.shape)


def adapter_stack(x, w_down, b_down, w_up, b_up, activation="gelu", scale=1.0):
    """Each adapter's scaled output without the residual, stacked: [..., N, d]."""
    outs = [
        scale
        * F.linear(
            ACTIVATIONS[activation](F.linear(x, w_down[n], None if b_down is None else b_down[n])),
            w_up[n],
            None if b_up is None else b_up[n],
        )
        for n in range(w_down.shape[0])
    ]
    return torch.stack(outs, dim=-2)


def adapter_fusion(x, stack, wq, bq, wk, bk, wv, residual=None, temperature=1.0):
    """AdapterFusion as AdapterHub computes it: query from the layer output, keys and values (value
    before the softmax) from each adapter's output, softmax over the adapters, residual added after.
    stack: the adapters' outputs [..., N, d]; wq / wk / wv None: that projection is the identity."""
    q = x if wq is None else F.linear(x, wq, bq)
    k = stack if wk is None else F.linear(stack, wk, bk)
    v = stack if wv is None else F.linear(stack, wv)
    scores = torch.matmul(q.unsqueeze(-2), k.transpose(-2, -1)).squeeze(-2)
    probs = torch.softmax(scores / temperature, dim=-1)
    mixed = torch.matmul(probs.unsqueeze(-2), v).squeeze(-2)
    return (x if residual is None else residual) + mixed


# ---------------------------------------------------------------- virtual tokens on Hugging Face models
def _cache_kwarg(model):
    """transformers 5's forward takes the KV cache as ``cache`` (older versions: ``past_key_values``)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefix_as_past_key_values(prefix, batch, task_ids=None):
    """peft's prefix tuning: every layer's prefix (from a peftkern.nn.PrefixKV) in a DynamicCache as P
    past tokens of each sample (its task's, with task_ids)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer in range(prefix.num_layers):
        k, v = prefix(layer)
        if k.dim() == 3:
            k, v = k.expand(batch, *k.shape), v.expand(batch, *v.shape)
        else:
            k, v = k[task_ids], v[task_ids]
        cache.update(k, v, layer)
    return cache


def prefix_model(base, prefix, input_ids, attention_mask=None, task_ids=None, **kwargs):
    """A base model's forward with the prefix as peft gives it: the cache above and the attention mask
    extended with P ones (the positions then start at P)."""
    B, L = input_ids.shape
    mask = torch.ones(B, L, dtype=torch.long) if attention_mask is None else attention_mask
    mask = torch.cat([mask.new_ones(B, prefix.prefix_len), mask], 1)
    cache = prefix_as_past_key_values(prefix, B, task_ids)
    return base(input_ids=input_ids, attention_mask=mask, **{_cache_kwarg(base): cache}, **kwargs)


@torch.no_grad()
def prefix_greedy(base, prefix, input_ids, attention_mask, steps, task_ids=None):
    """Greedy decoding with the prefix in the cache as past tokens and the mask extended, the way peft
    runs generate(); positions from the extended mask (as generate makes them). Returns the tokens
    and each step's last-position logits [steps, B, V]."""
    B, P = input_ids.shape[0], prefix.prefix_len
    cache = prefix_as_past_key_values(prefix, B, task_ids)
    mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], 1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, P:]
    tokens, step_ids, scores = input_ids, input_ids, []
    for _ in range(steps):
        out = base(
            input_ids=step_ids, attention_mask=mask, position_ids=positions, **{_cache_kwarg(base): cache}
        )
        scores.append(out.logits[:, -1])
        step_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, step_ids], 1)
        mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
        positions = positions[:, -1:] + 1
    return tokens, torch.stack(scores)


@torch.no_grad()
def prompt_greedy(base, prompts, input_ids, attention_mask, steps):
    """Greedy decoding with per-sample prompts [B, N, E] in front of the token embeddings, every step
    recomputed from scratch (no cache); positions from the extended mask. Returns the tokens and each
    step's last-position logits [steps, B, V]."""
    B, N = input_ids.shape[0], prompts.shape[1]
    tokens, mask, scores = input_ids, attention_mask, []
    for _ in range(steps):
        embeds = torch.cat([prompts, base.get_input_embeddings()(tokens)], 1)
        full = torch.cat([mask.new_ones(B, N), mask], 1)
        positions = (full.cumsum(-1) - 1).masked_fill(full == 0, 0)
        logits = base(inputs_embeds=embeds, attention_mask=full, position_ids=positions).logits
        scores.append(logits[:, -1])
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
    return tokens, torch.stack(scores)


def vpt_vit(base, prompts, pixel_values):
    """VPT (Jia et al. 2022) on a transformers ViTModel, written out: the patch embeddings, prompts
    [n_sets, N, E] inserted after CLS (set 0), replaced before each later block when there is a set per
    block (deep), dropped after the last; then the final LayerNorm and the pooler."""
    N = prompts.shape[1]
    h = base.embeddings(pixel_values)
    B = h.shape[0]
    blocks = base.layers if hasattr(base, "layers") else base.encoder.layer
    for i, block in enumerate(blocks):
        if i == 0 or prompts.shape[0] > 1:
            h = torch.cat([h[:, :1], prompts[i].expand(B, -1, -1), h[:, 1 + (N if i else 0) :]], 1)
        out = block(h)
        h = out if isinstance(out, torch.Tensor) else out[0]
    h = torch.cat([h[:, :1], h[:, 1 + N :]], 1)
    h = base.layernorm(h)
    return h, (base.pooler(h) if base.pooler is not None else None)


def adalora_linear(x, weight, bias, lora_A, lora_E, lora_B, lora_alpha, ranknum, mask=None):
    """peft's AdaLoRA SVDLinear forward: base(x) + (dropout(x) @ (A * E).T @ B.T) * alpha / (ranknum + 1e-5);
    mask = dropout factors."""
    dropped = x if mask is None else x * mask
    update = dropped @ (lora_A * lora_E).T @ lora_B.T
    return F.linear(x, weight, bias) + update * lora_alpha / (ranknum + 1e-5)


def adalora_orth_loss(pairs, orth_reg_weight):
    """peft's AdaLoRA penalty: orth_reg_weight * mean over every lora_A, lora_B of ||P P^T - I||_F
    (A A^T for A, B^T B for B); pairs = [(lora_A, lora_B), ...]."""
    terms = []
    for A, B in pairs:
        for cov in (A @ A.T, B.T @ B):
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype)))
    return orth_reg_weight * torch.stack(terms).mean()


def krona_linear(x, weight, bias, kron_A, kron_B, scaling):
    """KronA: x @ (W + scaling · kron(A, B)).T + b, the Kronecker product formed (as peft's LoKr)."""
    return F.linear(x, weight, bias) + x @ (scaling * torch.kron(kron_A, kron_B)).T


def phm_weight(rule, left, right):
    """A PHM layer's weight Σ_i kron(A_i, s_i t_iᵀ): rule [n, n, n], left [n, out/n, r],
    right [n, in/n, r]."""
    return sum(torch.kron(rule[i], left[i] @ right[i].T) for i in range(rule.shape[0]))


def compacter(x, rule_down, left_down, right_down, b_down, rule_up, left_up, right_up, b_up, **kwargs):
    """Compacter: the bottleneck adapter of the PHM weights."""
    w_down = phm_weight(rule_down, left_down, right_down)
    w_up = phm_weight(rule_up, left_up, right_up)
    return adapter(x, w_down, b_down, w_up, b_up, **kwargs)


def ia3_linear(x, weight, bias, ia3_scale, scale_input):
    """(IA)³ as peft computes it: ``F.linear(x * l, W, b)`` for a feed-forward (input) scale, else
    ``F.linear(x, W, b) * l`` (the bias scaled with the output)."""
    if scale_input:
        return F.linear(x * ia3_scale, weight, bias)
    return F.linear(x, weight, bias) * ia3_scale
