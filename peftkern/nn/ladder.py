"""peftkern.nn.LadderSideNetwork: the trainable side network of ladder side-tuning (Sung, Cho, Bansal
2022, LST, §3.2), fed by a frozen backbone's hidden states through "ladders" (downsamplers)."""

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import _checks

# the paper's gate temperature (§3.2: mu_i = sigmoid(alpha_i / T), T = 0.1, alpha_i starting at 0)
GATE_TEMPERATURE = 0.1
# the authors' init of the ladder and output linears (their _init_weights of plain nn.Linear modules)
LADDER_INIT_STD = 0.01


class LadderSideNetwork(nn.Module):
    """The side network g of LST, fed by a backbone f of L blocks of width d (Sung et al. 2022, §3.2).

    With ``h_0`` the backbone's input to its first block (the embeddings' output) and ``h_i`` the
    output of backbone block i (i = 1..L), the side states of width ``d_side`` are::

        s_0  = down_0(h_0)
        x_i  = mu_i * s_{i-1} + (1 - mu_i) * down_i(h_i)    (gate=False: x_i = s_{i-1} + down_i(h_i))
        s_i  = block_i(x_i)
        out  = up(norm(s_L))                                (norm: the identity when None;
                                                             upsample=False: out = norm(s_L))

    ``mu_i = sigmoid(alpha_i / T)``, ``T = GATE_TEMPERATURE`` (0.1), ``alpha = gate_logits`` (float32
    ``[L]``, starting at 0, so mu_i = 1/2), computed in float32 (float64 for float64 states). The
    mix reads backbone block i's output before side block i, as the authors' code does (the
    paper's Figure 3: each side block takes its backbone block's downsampled output and the side
    state below it). ``down_i`` (``downs[i]``, ``Linear(d, d_side)``) and ``up`` (``Linear(d_side,
    d)``) start as the authors' code has them: weights ~ N(0, 0.01²), biases zero. ``upsample=False``
    leaves ``up`` out (``None``): an encoder's side network whose output stays at ``d_side``, read by
    the side decoder's cross-attention (``LadderSideEncoderDecoder``).

    ``blocks`` are the side blocks (any modules called ``block(x, **kwargs)`` returning a tensor or
    a tuple whose first element is the new state; ``peftkern.inject(model, LSTConfig(...))`` builds
    them as the backbone's own block class at the reduced width, pruned from its weights).
    ``norm``: the side's final norm (None: none). The module only holds the parameters and the
    formula; the hooks that run it beside a backbone live in ``peftkern.integrations`` (which also
    sets ``rotary``, the side's rotary embedding of its own head dim, on rotary models).
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        d_model: int,
        d_side: int,
        *,
        gate: bool = True,
        norm: Optional[nn.Module] = None,
        upsample: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        d_model = _checks.dim("LadderSideNetwork", "d_model", d_model)
        d_side = _checks.dim("LadderSideNetwork", "d_side", d_side)
        blocks = list(blocks)
        if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
            raise TypeError("LadderSideNetwork: blocks must be a non-empty sequence of nn.Modules")
        if not isinstance(gate, bool):
            raise TypeError(f"LadderSideNetwork: gate must be a bool; got {type(gate).__name__} {gate!r:.40}")
        if not isinstance(upsample, bool):
            raise TypeError(
                f"LadderSideNetwork: upsample must be a bool; got {type(upsample).__name__} {upsample!r:.40}"
            )
        if norm is not None and not isinstance(norm, nn.Module):
            raise TypeError(
                f"LadderSideNetwork: norm must be None or an nn.Module; got {type(norm).__name__}"
            )
        fac = dict(device=device, dtype=dtype)
        self.d_model, self.d_side = d_model, d_side
        self.blocks = nn.ModuleList(blocks)
        self.downs = nn.ModuleList(nn.Linear(d_model, d_side, **fac) for _ in range(len(blocks) + 1))
        self.up = nn.Linear(d_side, d_model, **fac) if upsample else None
        for lin in (*self.downs, *([self.up] if upsample else [])):
            nn.init.normal_(lin.weight, std=LADDER_INIT_STD)
            nn.init.zeros_(lin.bias)
        self.norm = norm
        self.gate_logits = (
            nn.Parameter(torch.zeros(len(blocks), dtype=torch.float32, device=device)) if gate else None
        )

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def gate(self, i: int, dtype=torch.float32) -> Tensor:
        """mu_i = sigmoid(alpha_i / T) of side block i (0-based), a 0-d tensor."""
        if self.gate_logits is None:
            raise ValueError("LadderSideNetwork: this network has no gate (gate=False)")
        a = self.gate_logits[i]
        return torch.sigmoid(a.to(torch.promote_types(a.dtype, dtype)) / GATE_TEMPERATURE)

    def start(self, h0: Tensor) -> Tensor:
        """s_0 = down_0(h_0)."""
        return self.downs[0](h0)

    def mix(self, i: int, side: Tensor, h: Tensor) -> Tensor:
        """x_{i+1}: side block i's input from the side state below it and backbone block i's output."""
        lateral = self.downs[i + 1](h)
        if self.gate_logits is None:
            return side + lateral
        mu = self.gate(i, side.dtype)
        return (mu * side + (1 - mu) * lateral).to(side.dtype)

    def step(self, i: int, side: Tensor, h: Tensor, *, with_rest: bool = False, **block_kwargs):
        """s_{i+1} = block_i(mix(i, s_i, h_{i+1})); block_kwargs go to the side block as they are.
        with_rest: ``(s_{i+1}, rest)``, rest the block's other outputs (a tuple, empty when none)."""
        res = self.blocks[i](self.mix(i, side, h), **block_kwargs)
        out, rest = (res[0], tuple(res[1:])) if isinstance(res, (tuple, list)) else (res, ())
        if not isinstance(out, Tensor):
            raise TypeError(
                f"LadderSideNetwork: side block {i} ({type(self.blocks[i]).__name__}) returned "
                f"{type(out).__name__}, not a tensor"
            )
        return (out, rest) if with_rest else out

    def finish(self, side: Tensor) -> Tensor:
        """up(norm(s_L)): the side's last state at the backbone's width (norm(s_L) without up)."""
        out = side if self.norm is None else self.norm(side)
        return out if self.up is None else self.up(out)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_side={self.d_side}, gate={self.gate_logits is not None}, "
            f"upsample={self.up is not None}"
        )


class LadderSideEncoderDecoder(nn.Module):
    """LST's side networks of an encoder-decoder (Sung et al. 2022, §3.2, their T5): one beside each
    stack. ``encoder`` (``upsample=False``) ends at ``enc = norm_enc(s^enc_L)`` (``s^enc_L`` where it has
    no norm: BART), of width ``d_side``;
    ``decoder``'s side blocks cross-attend to ``enc`` (never to the backbone encoder's output) and
    its ``up(norm_dec(s^dec_L))`` goes to the model's head."""

    def __init__(self, encoder: LadderSideNetwork, decoder: LadderSideNetwork):
        super().__init__()
        for what, net in (("encoder", encoder), ("decoder", decoder)):
            if not isinstance(net, LadderSideNetwork):
                raise TypeError(
                    f"LadderSideEncoderDecoder: {what} must be a LadderSideNetwork; got {type(net).__name__}"
                )
        if encoder.up is not None or decoder.up is None:
            raise ValueError(
                "LadderSideEncoderDecoder: the encoder's network must have upsample=False (its output feeds "
                "the side decoder at d_side) and the decoder's upsample=True"
            )
        if encoder.d_side != decoder.d_side:
            raise ValueError(
                f"LadderSideEncoderDecoder: the encoder's d_side {encoder.d_side} and the decoder's "
                f"{decoder.d_side} differ"
            )
        self.encoder, self.decoder = encoder, decoder
