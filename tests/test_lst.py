"""Ladder side-tuning (LSTConfig, peftkern.nn.LadderSideNetwork) against a hand-written forward: the
backbone's blocks run here, the side states built with the paper's formula, the side blocks called,
upsampled, the head applied."""

import pytest
import torch
import torch.nn.functional as F

import peftkern
from peftkern import LSTConfig
from peftkern.nn import LadderSideNetwork
from peftkern.nn.ladder import LadderSideEncoderDecoder

from . import tiny_models
from .conftest import assert_close

T = 0.1  # the paper's gate temperature


def inject(model, r=2, gate=True, name="a", **kw):
    peftkern.inject(model, LSTConfig(reduction_factor=r, gate=gate, **kw), name=name)
    return model


def net_of(model, name="a"):
    base = getattr(model, "base_model", model)
    return base.peftkern_lst[name]


def randomize_gates_and_ladders(net):
    """Gates away from 1/2 (so mu and 1 - mu are told apart) and ladders of a visible size."""
    with torch.no_grad():
        if net.gate_logits is not None:
            net.gate_logits.copy_(torch.randn(net.gate_logits.shape) * 0.2)
        for lin in (*net.downs, net.up):
            if lin is not None:  # a T5 side encoder has no up
                lin.weight.normal_(0, 0.3)
                lin.bias.normal_(0, 0.1)


def batch(B=3, S=7, pad=True):
    ids = torch.randint(3, 97, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    if pad:
        mask[1, 5:] = 0
        mask[2, 3:] = 0
    return ids, mask


def additive_mask(mask, causal, dtype=torch.float32):
    B, S = mask.shape
    keep = mask[:, None, None, :].bool().expand(B, 1, S, S)
    if causal:
        keep = keep & torch.ones(S, S, dtype=torch.bool).tril()
    return torch.zeros(B, 1, S, S, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


def rope(head_dim, S, theta):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.arange(S, dtype=torch.float32)[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)[None]
    return emb.cos(), emb.sin()


def ladder(net, i, s, h):
    """The paper's gated ladder (§3.2): mu_i * s_{i-1} + (1 - mu_i) * down_i(h_i)."""
    lateral = F.linear(h, net.downs[i + 1].weight, net.downs[i + 1].bias)
    if net.gate_logits is None:
        return s + lateral
    mu = torch.sigmoid(net.gate_logits[i] / T)
    return mu * s + (1 - mu) * lateral


def bert_reference(model, ids, mask):
    net = net_of(model)
    with torch.no_grad():
        h = model.embeddings(input_ids=ids)
    m = additive_mask(mask, causal=False)
    s = F.linear(h, net.downs[0].weight, net.downs[0].bias)
    for i, block in enumerate(model.encoder.layer):
        with torch.no_grad():
            h = block(h, attention_mask=m)
        s = net.blocks[i](ladder(net, i, s, h), attention_mask=m)
    return F.linear(s, net.up.weight, net.up.bias)


def llama_reference(model, ids, mask):
    net = net_of(model)
    cfg, S = model.config, ids.shape[1]
    hd = cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
    m = additive_mask(mask, causal=True)
    pos = torch.arange(S)[None]
    theta = cfg.rope_parameters["rope_theta"]
    big_rope, side_rope = rope(hd, S, theta), rope(hd // 2, S, theta)  # the side's head dim: hd / r
    s = F.linear(h, net.downs[0].weight, net.downs[0].bias)
    for i, block in enumerate(model.model.layers):
        with torch.no_grad():
            h = block(h, attention_mask=m, position_ids=pos, position_embeddings=big_rope)
        s = net.blocks[i](
            ladder(net, i, s, h), attention_mask=m, position_ids=pos, position_embeddings=side_rope
        )
    return model.lm_head(F.linear(net.norm(s), net.up.weight, net.up.bias))  # the side's pruned final norm


@pytest.mark.parametrize("gate", [True, False])
def test_bert_matches_hand_written_forward(gate):
    model = inject(tiny_models.bert(), gate=gate)
    randomize_gates_and_ladders(net_of(model))
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    ref = bert_reference(model, ids, mask)
    assert_close(out, ref, torch.float32, "last_hidden_state")
    grad = torch.randn_like(out)
    (g_out,) = torch.autograd.grad(out, [net_of(model).downs[1].weight], grad)
    (g_ref,) = torch.autograd.grad(ref, [net_of(model).downs[1].weight], grad)
    assert_close(g_out, g_ref, torch.float32, "grad downs[1].weight")
    assert (net_of(model).gate_logits is None) == (not gate)


def test_llama_matches_hand_written_forward():
    model = inject(tiny_models.llama())
    net = net_of(model)
    randomize_gates_and_ladders(net)
    with torch.no_grad():
        net.norm.weight.normal_(1, 0.2)
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask).logits
    ref = llama_reference(model, ids, mask)
    assert_close(out, ref, torch.float32, "logits")
    # the side blocks: the head count kept, the head dim halved (the side's rotary of dim 4)
    attn = net.blocks[0].self_attn
    assert attn.q_proj.weight.shape == (16, 16) and attn.k_proj.weight.shape == (8, 16)
    assert attn.head_dim == 4


def test_padding_reaches_the_side_blocks():
    """Changing padded tokens leaves the unpadded positions' outputs as they were (BERT, non-causal:
    only the attention mask keeps the side blocks from reading them)."""
    model = inject(tiny_models.bert())
    randomize_gates_and_ladders(net_of(model))
    ids, mask = batch()
    other = ids.clone()
    other[mask == 0] = 5
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).last_hidden_state
        b = model(input_ids=other, attention_mask=mask).last_hidden_state
        c = model(input_ids=other).last_hidden_state
    keep = mask.bool()
    assert_close(a[keep], b[keep], torch.float32, "unpadded positions")
    assert (a[~keep] - c[~keep]).abs().max() > 1e-3


def magnitude_hidden(blocks, names, extra=()):
    """The test's own statement of the criterion for hidden dims: per dim k, the sum of squares of
    every weight entry on that hidden dim (columns of the input projections, rows of the output
    projections, biases and norms), over all blocks."""
    imp = 0
    for b in blocks:
        p = dict(b.named_parameters())
        for n in names["in"]:
            imp = imp + p[n].detach().double().pow(2).sum(0)
        for n in names["out"]:
            imp = imp + p[n].detach().double().pow(2).sum(1)
        for n in names["vec"]:
            imp = imp + p[n].detach().double().pow(2)
    for t in extra:
        imp = imp + t.detach().double().pow(2)
    return imp


BERT_H = dict(
    **{
        "in": [f"attention.self.{x}.weight" for x in ("query", "key", "value")]
        + ["intermediate.dense.weight"]
    },
    out=["attention.output.dense.weight", "output.dense.weight"],
    vec=[
        f"{m}.{x}"
        for m in ("attention.output.dense", "attention.output.LayerNorm", "output.dense", "output.LayerNorm")
        for x in ("weight", "bias")
        if not (m.endswith("dense") and x == "weight")
    ],
)


def largest(imp, k):
    return sorted(sorted(range(len(imp)), key=lambda j: (-imp[j].item(), j))[:k])


def test_pruning_keeps_the_largest_magnitude_rows_bert():
    model = tiny_models.bert()
    big = [b for b in model.encoder.layer]
    H = largest(magnitude_hidden(big, BERT_H), 16)
    b0 = dict(big[0].named_parameters())
    inject(model)
    side = net_of(model).blocks[0]
    # FFN neurons of block 0: the intermediate rows and bias, the output's columns
    f_imp = (
        b0["intermediate.dense.weight"].double().pow(2).sum(1)
        + b0["intermediate.dense.bias"].double().pow(2)
        + b0["output.dense.weight"].double().pow(2).sum(0)
    )
    Fk = largest(f_imp, 24)
    assert torch.equal(side.intermediate.dense.weight, b0["intermediate.dense.weight"][Fk][:, H])
    assert torch.equal(side.output.dense.weight, b0["output.dense.weight"][H][:, Fk])
    assert torch.equal(side.output.LayerNorm.weight, b0["output.LayerNorm.weight"][H])
    # head dims, per head (4 heads of 8 -> 4 of 4): query, key, value rows + biases, output columns
    inner = sum(
        b0[f"attention.self.{x}.weight"].double().pow(2).sum(1)
        + b0[f"attention.self.{x}.bias"].double().pow(2)
        for x in ("query", "key", "value")
    ) + b0["attention.output.dense.weight"].double().pow(2).sum(0)
    Q = [h * 8 + j for h in range(4) for j in largest(inner[h * 8 : (h + 1) * 8], 4)]
    assert torch.equal(side.attention.self.query.weight, b0["attention.self.query.weight"][Q][:, H])
    assert torch.equal(side.attention.self.value.bias, b0["attention.self.value.bias"][Q])
    assert torch.equal(side.attention.output.dense.weight, b0["attention.output.dense.weight"][H][:, Q])


def test_pruning_llama_keeps_rotary_pairs_per_kv_group():
    model = tiny_models.llama()
    b1 = dict(model.model.layers[1].named_parameters())
    inject(model)
    side = net_of(model).blocks[1].self_attn

    # 4 query heads of dim 8 share 2 key-value heads: group g = query heads 2g, 2g+1 and kv head g
    def sq(name, dim):
        return b1[f"self_attn.{name}.weight"].double().pow(2).sum(dim)

    q = sq("q_proj", 1) + sq("o_proj", 0)  # per query inner index: its row, the output's column
    k = sq("k_proj", 1) + sq("v_proj", 1)
    Q, K = [], []
    for g in range(2):
        imp = q[16 * g : 16 * g + 8] + q[16 * g + 8 : 16 * g + 16] + k[8 * g : 8 * g + 8]
        pairs = largest(imp[:4] + imp[4:], 2)  # rotate-half pairs (j, j + 4)
        dims = pairs + [j + 4 for j in pairs]
        K += [8 * g + j for j in dims]
        Q += [8 * h + j for h in (2 * g, 2 * g + 1) for j in dims]
    big = [b for b in model.model.layers]
    H = largest(
        magnitude_hidden(
            big,
            {
                "in": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"]
                + ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
                "out": ["self_attn.o_proj.weight", "mlp.down_proj.weight"],
                "vec": ["input_layernorm.weight", "post_attention_layernorm.weight"],
            },
            extra=[model.model.norm.weight],
        ),
        16,
    )
    assert torch.equal(side.q_proj.weight, b1["self_attn.q_proj.weight"][Q][:, H])
    assert torch.equal(side.k_proj.weight, b1["self_attn.k_proj.weight"][K][:, H])
    assert torch.equal(side.o_proj.weight, b1["self_attn.o_proj.weight"][H][:, Q])
    assert torch.equal(net_of(model).norm.weight, model.model.norm.weight[H])


def saved_bytes(fn):
    """The bytes autograd saves for backward while fn() runs (every saved tensor, by storage once)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_backbone_activations_are_not_saved():
    """LST's training forward saves exactly what the side network alone saves (the reference's side
    half, fed by backbone states computed without gradient), far less than LoRA's."""
    ids, mask = batch(4, 16, pad=False)
    # eager attention: the mask the model builds and the reference's are the same float [B, 1, S, S]
    model = inject(tiny_models.llama(attn_implementation="eager")).train()
    _, lst = saved_bytes(lambda: model(input_ids=ids, attention_mask=mask).logits.sum())
    _, ref = saved_bytes(lambda: llama_reference(model, ids, mask).sum())
    assert lst == ref > 0
    lora = peftkern.inject(
        tiny_models.llama(attn_implementation="eager").train(), peftkern.LoRAConfig(r=8), name="a"
    )
    _, lora_bytes = saved_bytes(lambda: lora(input_ids=ids, attention_mask=mask).logits.sum())
    assert lst < lora_bytes


def train_side(model, side, steps, **batch):
    """Adam on the side parameters over one batch; the losses."""
    opt, losses = torch.optim.Adam(side, lr=5e-2), []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_step_trains_only_the_side():
    torch.manual_seed(0)
    model = inject(tiny_models.llama()).train()
    backbone = model.model.layers[0].self_attn.q_proj.weight
    backbone.requires_grad_(True)  # unfrozen by hand: the backbone still runs without gradient
    side = [p for n, p in model.named_parameters() if "peftkern_lst" in n]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("peftkern_lst" in n for n in trainable if n != "model.layers.0.self_attn.q_proj.weight")
    ids, mask = batch(4, 12, pad=False)
    losses = train_side(model, side, 8, input_ids=ids, attention_mask=mask, labels=ids)
    assert losses[-1] < losses[0] - 0.1
    assert backbone.grad is None
    assert all(p.grad is not None for p in side if p.requires_grad)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_save_load_round_trip(tmp_path, kind):
    build = getattr(tiny_models, kind)
    model = inject(build(), gate=kind == "bert")
    randomize_gates_and_ladders(net_of(model))
    ids, mask = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask)[0]
    peftkern.save_pretrained(model, tmp_path)
    loaded = peftkern.from_pretrained(build(), tmp_path)
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask)[0]
    assert torch.equal(got, expected)
    trainable, _ = peftkern.trainable_parameters(loaded)
    assert trainable == sum(p.numel() for p in net_of(loaded, "default").parameters())
    assert isinstance(net_of(loaded, "default"), LadderSideNetwork)


def test_ladder_network_bad_arguments():
    block = torch.nn.Linear(4, 4)
    with pytest.raises(TypeError, match="blocks must be a non-empty sequence"):
        LadderSideNetwork([], 8, 4)
    with pytest.raises(TypeError, match="gate must be a bool"):
        LadderSideNetwork([block], 8, 4, gate=1)
    with pytest.raises(TypeError, match="norm must be None or an nn.Module"):
        LadderSideNetwork([block], 8, 4, norm="rms")
    with pytest.raises(ValueError, match="d_side must be in"):
        LadderSideNetwork([block], 8, 0)
    with pytest.raises(ValueError, match="has no gate"):
        LadderSideNetwork([block], 8, 4, gate=False).gate(0)
    with pytest.raises(TypeError, match="upsample must be a bool"):
        LadderSideNetwork([block], 8, 4, upsample=None)
    enc, dec = LadderSideNetwork([block], 8, 4, upsample=False), LadderSideNetwork([block], 8, 4)
    with pytest.raises(TypeError, match="decoder must be a LadderSideNetwork"):
        LadderSideEncoderDecoder(enc, block)
    with pytest.raises(ValueError, match="encoder's network must have upsample=False"):
        LadderSideEncoderDecoder(dec, dec)
    with pytest.raises(ValueError, match="d_side 4 and the decoder's 2 differ"):
        LadderSideEncoderDecoder(enc, LadderSideNetwork([block], 8, 2))


def test_inactive_delete_and_merge():
    base = tiny_models.bert()
    ids, mask = batch()
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).last_hidden_state
        inject(base)
        peftkern.set_active(base, None)
        off = base(input_ids=ids, attention_mask=mask).last_hidden_state
        peftkern.set_active(base, "a")
        on = base(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(off, plain) and not torch.allclose(on, plain)
    peftkern.merge(base, "a", verbose=False)  # nothing folds: the side stays
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids, attention_mask=mask).last_hidden_state, on)
    other = inject(tiny_models.bert())
    peftkern.delete_adapter(other, "a")
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids, attention_mask=mask).last_hidden_state, plain)
    assert not hasattr(other, "peftkern_lst")


def test_classifier_head_trains_through_pooler():
    model = tiny_models.bert_head("BertForSequenceClassification", num_labels=3)
    inject(model, modules_to_save=["classifier"])
    out = model(*batch(), labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    names = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any("classifier" in n for n in names) and any("peftkern_lst" in n for n in names)
    assert all("peftkern" in n for n in names)


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(reduction_factor=0), ValueError, "reduction_factor must be in [1"),
        (dict(reduction_factor=2.0), TypeError, "reduction_factor must be an int"),
        (dict(reduction_factor=True), TypeError, "reduction_factor must be an int"),
        (dict(gate="yes"), TypeError, "gate must be a bool"),
        (dict(modules_to_save=3), TypeError, "modules_to_save must be None"),
    ],
)
def test_bad_config(kwargs, exc, msg):
    with pytest.raises(exc, match=msg.replace("[", r"\[")):
        LSTConfig(**kwargs)


def test_refusals():
    with pytest.raises(ValueError, match="reduction_factor 3 must divide the model's hidden_size"):
        inject(tiny_models.bert(), r=3)
    with pytest.raises(ValueError, match="runs T5 and BART .* only"):
        inject(tiny_models.mbart())
    with pytest.raises(ValueError, match="needs every block to run; the model's decoder_layerdrop is 0.1"):
        inject(tiny_models.bart(decoder_layerdrop=0.1))
    with pytest.raises(ValueError, match="reduction_factor 3 must divide the model's d_model"):
        inject(tiny_models.t5(), r=3)
    with pytest.raises(ValueError, match="modules_to_save matched shared"):
        inject(tiny_models.t5(), modules_to_save=["shared"])
    with pytest.raises(ValueError, match="modules_to_save matched embeddings"):
        inject(tiny_models.bert(), modules_to_save=["embeddings"])
    with pytest.raises(ValueError, match="without other adapters"):
        inject(peftkern.inject(tiny_models.bert(), peftkern.LoRAConfig(r=2), name="l"))
    both = peftkern.inject(inject(tiny_models.llama()), peftkern.LoRAConfig(r=2), name="l")
    peftkern.set_active(both, ["a", "l"])
    ids, mask = batch()
    with pytest.raises(ValueError, match=r"cannot apply together with other adapters \(\['l'\]\)"):
        both(input_ids=ids, attention_mask=mask)
    model = inject(tiny_models.llama())
    with pytest.raises(ValueError, match="cannot serve a mixed batch.*whole batch"):
        with peftkern.tasks(["a", None, "a"]):
            model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(ids[:1], max_new_tokens=2, do_sample=False)
    assert torch.is_grad_enabled()  # restored after the refusal
    out = model.generate(ids[:1], max_new_tokens=2, do_sample=False, use_cache=False)
    assert out.shape == (1, 9)


# -- T5: a side network beside the encoder and one beside the decoder ---------------------------------


def seq2seq_batch(B=3, S=7, T=5):
    ids, mask = batch(B, S)
    return ids, mask, torch.randint(3, 97, (B, T))


def seq2seq_masks(mask, T):
    """Additive masks of an encoder-decoder call: the encoder's padding, the decoder's causal one over
    T positions, and the cross-attention's (decoder queries over the encoder's unpadded keys)."""
    B, S = mask.shape
    m_cross = torch.zeros(B, 1, T, S).masked_fill(
        ~mask[:, None, None, :].bool(), torch.finfo(torch.float32).min
    )
    return (
        additive_mask(mask, causal=False),
        additive_mask(torch.ones(B, T, dtype=torch.long), causal=True),
        m_cross,
    )


def t5_reference(model, ids, mask, dec, scale):
    """The paper's T5 LST written out: backbone blocks without gradient, the ladders, side blocks with
    their own first block's relative position bias, the side decoder cross-attending to the side
    encoder's normed output, up(norm(s^dec_L)) (times d_model**-0.5 where T5 scales) to lm_head."""
    pair = net_of(model)
    enc, decn = pair.encoder, pair.decoder
    S, T_ = ids.shape[1], dec.shape[1]
    m_enc, m_dec, m_cross = seq2seq_masks(mask, T_)

    def stack(big_blocks, net, h, m, n, **cross):
        big_bias = big_blocks[0].layer[0].SelfAttention.compute_bias(n, n)
        side_bias = net.blocks[0].layer[0].SelfAttention.compute_bias(n, n)
        s = F.linear(h, net.downs[0].weight, net.downs[0].bias)
        for i, block in enumerate(big_blocks):
            with torch.no_grad():
                h = block(h, attention_mask=m, position_bias=big_bias, **cross.get("big", {}))[0]
            x = ladder(net, i, s, h)
            s = net.blocks[i](x, attention_mask=m, position_bias=side_bias, **cross.get("side", {}))[0]
        return h, net.norm(s)

    with torch.no_grad():
        h = model.shared(ids)
    h, s_enc = stack(model.encoder.block, enc, h, m_enc, S)
    with torch.no_grad():
        h_enc = model.encoder.final_layer_norm(h)
        h = model.shared(dec)
    cross = dict(
        big=dict(encoder_hidden_states=h_enc, encoder_attention_mask=m_cross),
        side=dict(encoder_hidden_states=s_enc, encoder_attention_mask=m_cross),
    )
    _, s_dec = stack(model.decoder.block, decn, h, m_dec, T_, **cross)
    out = F.linear(s_dec, decn.up.weight, decn.up.bias)
    return F.linear(out * 32**-0.5 if scale else out, model.lm_head.weight)


def randomize_encoder_decoder(model):
    pair = net_of(model)
    for net in (pair.encoder, pair.decoder):
        randomize_gates_and_ladders(net)
        with torch.no_grad():
            if net.norm is not None:  # T5's; BART has no final norm
                net.norm.weight.normal_(1, 0.2)
                net.blocks[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0, 0.5)


@pytest.mark.parametrize("tie", [True, False])
def test_t5_matches_hand_written_forward(tie):
    model = inject(tiny_models.t5(tie_word_embeddings=tie))
    randomize_encoder_decoder(model)
    ids, mask, dec = seq2seq_batch()
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    ref = t5_reference(model, ids, mask, dec, scale=tie)
    assert_close(out, ref, torch.float32, "logits")
    grad = torch.randn_like(out)
    w = [
        net_of(model).encoder.downs[1].weight,
        net_of(model).encoder.blocks[0].layer[0].SelfAttention.q.weight,
    ]
    for g_out, g_ref in zip(torch.autograd.grad(out, w, grad), torch.autograd.grad(ref, w, grad)):
        assert_close(g_out, g_ref, torch.float32, "grad of an encoder side parameter")


def test_t5_side_blocks_pruned_with_own_first_bias_table():
    model = tiny_models.t5()
    big_enc, big_dec = list(model.encoder.block), list(model.decoder.block)
    attn = [f"layer.0.SelfAttention.{x}.weight" for x in "qkv"]
    enc_names = dict(
        **{"in": attn + ["layer.1.DenseReluDense.wi.weight"]},
        out=["layer.0.SelfAttention.o.weight", "layer.1.DenseReluDense.wo.weight"],
        vec=["layer.0.layer_norm.weight", "layer.1.layer_norm.weight"],
    )
    dec_names = dict(
        **{
            "in": attn
            + [f"layer.1.EncDecAttention.{x}.weight" for x in "qkv"]
            + ["layer.2.DenseReluDense.wi.weight"]
        },
        out=[f"layer.{i}.{n}.o.weight" for i, n in ((0, "SelfAttention"), (1, "EncDecAttention"))]
        + ["layer.2.DenseReluDense.wo.weight"],
        vec=[f"layer.{i}.layer_norm.weight" for i in range(3)],
    )
    norms = [model.encoder.final_layer_norm.weight, model.decoder.final_layer_norm.weight]
    H = largest(magnitude_hidden(big_enc, enc_names) + magnitude_hidden(big_dec, dec_names, norms), 16)
    b0 = dict(big_dec[0].named_parameters())
    inject(model)
    pair = net_of(model)
    side = pair.decoder.blocks[0].layer[1].EncDecAttention
    # the cross-attention's own head dims: query and output (q, o) plus key and value rows, per head

    def sq(name, dim):
        return b0[f"layer.1.EncDecAttention.{name}.weight"].double().pow(2).sum(dim)

    inner = sq("q", 1) + sq("o", 0) + sq("k", 1) + sq("v", 1)
    C = [h * 8 + j for h in range(4) for j in largest(inner[h * 8 : (h + 1) * 8], 4)]
    assert torch.equal(side.k.weight, b0["layer.1.EncDecAttention.k.weight"][C][:, H])
    assert torch.equal(side.o.weight, b0["layer.1.EncDecAttention.o.weight"][H][:, C])
    assert torch.equal(pair.encoder.norm.weight, norms[0][H])
    # side block 0 of each stack: its own relative position bias table, the backbone's copied (the
    # head count is kept, so nothing of it is pruned); the other side blocks reuse its bias
    for net, big in ((pair.encoder, big_enc), (pair.decoder, big_dec)):
        own = net.blocks[0].layer[0].SelfAttention.relative_attention_bias.weight
        assert own is not big[0].layer[0].SelfAttention.relative_attention_bias.weight
        assert torch.equal(own, big[0].layer[0].SelfAttention.relative_attention_bias.weight)
        assert not net.blocks[1].layer[0].SelfAttention.has_relative_attention_bias
    assert pair.encoder.up is None and pair.decoder.up.weight.shape == (32, 16)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_encoder_decoder_training_step_trains_only_the_side(kind):
    torch.manual_seed(0)
    model = inject(getattr(tiny_models, kind)()).train()
    backbone = next(
        p
        for n, p in model.named_parameters()
        if "decoder" in n and n.endswith("q.weight" if kind == "t5" else "q_proj.weight")
    )
    backbone.requires_grad_(True)  # unfrozen by hand: the backbone still runs without gradient
    side = [p for n, p in model.named_parameters() if "peftkern_lst" in n]
    ids, mask, dec = seq2seq_batch()
    losses = train_side(model, side, 6, input_ids=ids, attention_mask=mask, labels=dec)
    assert losses[-1] < losses[0] - 0.1
    assert backbone.grad is None
    assert all(p.grad is not None for p in side)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        n for n, _ in model.named_parameters() if "peftkern_lst" in n
    }
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("kind, eos", [("t5", 1), ("bart", 2)])
def test_encoder_decoder_save_load_and_generate(tmp_path, kind, eos):
    build = getattr(tiny_models, kind)
    model = inject(build())
    randomize_encoder_decoder(model)
    ids, mask, dec = seq2seq_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    peftkern.save_pretrained(model, tmp_path)
    loaded = peftkern.from_pretrained(build(), tmp_path)
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert torch.equal(got, expected)
    assert isinstance(net_of(loaded, "default"), LadderSideEncoderDecoder)
    # greedy decoding without a cache: each step's logits are the full forward's at its last position
    out = loaded.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, use_cache=False)
    assert out.shape == (3, 4)
    with torch.no_grad():
        step = loaded(input_ids=ids, attention_mask=mask, decoder_input_ids=out[:, :-1]).logits
    ended = out[:, 1:-1] == eos  # a generated EOS: the tokens after it are padding
    live = torch.cat([torch.zeros_like(ended[:, :1]), ended], 1).cumsum(1) == 0
    assert live[:, 0].all() and live.sum() > 3
    assert torch.equal(step.argmax(-1)[live], out[:, 1:][live])
    with pytest.raises(ValueError, match="use_cache=False"):
        loaded.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="num_beams > 1"):
        loaded.generate(ids, attention_mask=mask, max_new_tokens=2, num_beams=2, use_cache=False)
    # encoder outputs computed with the adapter off give the side decoder nothing to read
    peftkern.set_active(loaded, None)
    with torch.no_grad():
        enc = loaded.get_encoder()(input_ids=ids, attention_mask=mask)
    peftkern.set_active(loaded, "default")
    with pytest.raises(ValueError, match="not the output of this model's encoder"):
        loaded(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec)
    assert torch.is_grad_enabled()


def bart_reference(model, ids, mask, dec):
    """BART's LST written out: embeddings (learned positions at offset 2) through layernorm_embedding,
    backbone blocks without gradient, the ladders, the side decoder cross-attending to the side
    encoder's last state (BART has no final norm), lm_head(up(s^dec_L)) + final_logits_bias."""
    pair = net_of(model)
    enc, decn = pair.encoder, pair.decoder
    T_ = dec.shape[1]
    m_enc, m_dec, m_cross = seq2seq_masks(mask, T_)

    def first(x):
        return x[0] if isinstance(x, tuple) else x

    def embed(stack, x):
        pos = stack.embed_positions.weight[torch.arange(x.shape[1]) + 2]
        return stack.layernorm_embedding(F.embedding(x, model.model.shared.weight) + pos)

    def run(big_blocks, net, h, m, big_kw, side_kw):
        s = F.linear(h, net.downs[0].weight, net.downs[0].bias)
        for i, block in enumerate(big_blocks):
            with torch.no_grad():
                h = first(block(h, attention_mask=m, **big_kw))
            s = first(net.blocks[i](ladder(net, i, s, h), attention_mask=m, **side_kw))
        return h, s

    with torch.no_grad():
        h = embed(model.model.encoder, ids)
    h_enc, s_enc = run(model.model.encoder.layers, enc, h, m_enc, {}, {})
    with torch.no_grad():
        h = embed(model.model.decoder, dec)
    _, s_dec = run(
        model.model.decoder.layers,
        decn,
        h,
        m_dec,
        dict(encoder_hidden_states=h_enc, encoder_attention_mask=m_cross),
        dict(encoder_hidden_states=s_enc, encoder_attention_mask=m_cross),
    )
    out = F.linear(s_dec, decn.up.weight, decn.up.bias)
    return F.linear(out, model.lm_head.weight) + model.final_logits_bias


def test_bart_matches_hand_written_forward():
    model = inject(tiny_models.bart())
    randomize_encoder_decoder(model)
    with torch.no_grad():
        model.final_logits_bias.normal_()
    ids, mask, dec = seq2seq_batch()
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    ref = bart_reference(model, ids, mask, dec)
    assert_close(out, ref, torch.float32, "logits")
    pair = net_of(model)
    assert pair.encoder.norm is None and pair.encoder.up is None
    assert pair.decoder.blocks[0].encoder_attn.k_proj.weight.shape == (16, 16)
    w = [pair.encoder.downs[2].weight, pair.decoder.gate_logits]
    grad = torch.randn_like(out)
    for g_out, g_ref in zip(torch.autograd.grad(out, w, grad), torch.autograd.grad(ref, w, grad)):
        assert_close(g_out, g_ref, torch.float32, "grad of a side parameter")
