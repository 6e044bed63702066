"""The configs ``peftkern.inject`` takes: which PEFT method, where, and its hyper-parameters.

Each config is a dataclass that checks its fields when built (a TypeError or ValueError naming the
field) and round-trips through ``to_dict`` / ``config_from_dict`` (the JSON that
``save_pretrained`` writes). Fields shared by every config:

``target_modules``  where the method goes: a list of module-name suffixes (``"query"`` matches
                    ``encoder.layer.0.attention.self.query``; a suffix matches whole name parts) or
                    one regex string that must match the whole name, as in Hugging Face peft.
                    ``None``: the preset for the model's architecture (``model.config.model_type``).
``modules_to_save`` modules that train and are saved whole besides the method's parameters (a
                    new classification head, say); same matching as ``target_modules``.
"""

import dataclasses
import math
import numbers
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

from ..nn import _checks
from ..nn.adapter import ADAPTER_INITS
from ..nn.mask import DEFAULT_SCORE_INIT, DEFAULT_THRESHOLD
from ..ops.adapter import ADAPTER_ACTIVATIONS

Targets = Optional[Union[str, List[str]]]
ADAPTER_PLACEMENTS = ("houlsby", "pfeiffer", "parallel")


def _names(config, field, value):
    """None, one regex string, or a list of name suffixes (a tuple is taken as a list)."""
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"{config}: {field} {value!r:.80} is not a valid regex ({e})") from None
        return value
    if value is None:
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise TypeError(
        f"{config}: {field} must be None, a regex string or a non-empty list of module-name suffixes; "
        f"got {value!r:.80}"
    )


def _real(config, field, value, *, positive=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{config}: {field} must be a float; got {type(value).__name__} {value!r:.40}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(
            f"{config}: {field} must be a finite{' positive' if positive else ''} float; got {value}"
        )
    return value


def _bool(config, field, value):
    if not isinstance(value, bool):
        raise TypeError(f"{config}: {field} must be a bool; got {type(value).__name__} {value!r:.40}")
    return value


def _choice(config, field, value, choices):
    if value not in choices:
        raise ValueError(f"{config}: {field} must be one of {choices}; got {value!r:.40}")
    return value


def _fusion_sources(value):
    """None, or {name: directory} as a new dict in the order of the names."""
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise TypeError(
            f"AdapterConfig: fusion must be None or a non-empty dict {{name: directory}}; got {value!r:.80}"
        )
    out = {}
    for name in sorted(value, key=str):
        path = value[name]
        if not isinstance(name, str) or not name:
            raise TypeError(f"AdapterConfig: fusion's names must be non-empty strings; got {name!r:.40}")
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"AdapterConfig: fusion[{name!r}] must be a directory path; got {type(path).__name__}"
            )
        out[name] = os.fspath(path)
        if not out[name]:
            raise ValueError(f"AdapterConfig: fusion[{name!r}] is an empty path")
    return out


@dataclass
class _Config:
    method = ""  # class attribute: the name save_pretrained writes

    def _check_common(self):
        name = type(self).__name__
        self.target_modules = _names(name, "target_modules", self.target_modules)
        self.modules_to_save = _names(name, "modules_to_save", self.modules_to_save)

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}


@dataclass
class AdapterConfig(_Config):
    """Bottleneck adapters ``h + scale * up(act(down(h)))`` (``peftkern.nn.Adapter``), placed as:

    ``houlsby``   after the attention output projection and after the FFN output projection,
                  before the residual add (Houlsby et al. 2019);
    ``pfeiffer``  after the FFN output projection only (Pfeiffer et al. 2021);
    ``parallel``  reads the FFN's input, its scaled output is added to the FFN's output
                  (He et al. 2022, AdaptFormer): ``ops.adapter(ffn_in, ..., residual=ffn_out)``.

    Encoder-decoders (presets): T5 / mT5 and BART / mBART get houlsby adapters after the
    self-attention output projection (``SelfAttention.o``, ``self_attn.out_proj``) and the FFN's
    (``DenseReluDense.wo``, ``fc2``) in encoder and decoder blocks, none after the decoder's
    cross-attention (AdapterHub's default; name ``EncDecAttention.o`` / ``encoder_attn.out_proj`` in
    target_modules for one). Parallel: T5's ``DenseReluDense``; BART has no FFN module, so the
    adapter sits on ``fc2``, reads ``fc1``'s input and adds to ``fc2``'s output.

    With ``target_modules`` the adapter goes after each named module (houlsby / pfeiffer), or reads
    each named module's input and adds to its output (parallel). ``bottleneck`` defaults to
    ``d_model // reduction_factor``. The adapter wraps the projection's output, so it sits before
    the block's dropout (AdapterHub puts it after); in eval mode the two are the same. In BERT-family
    blocks the FFN's output module adds the FFN input back as its residual, and the parallel adapter
    joins there (its output skips the hidden dropout).

    AdapterDrop (Rücklé et al. 2021):

    ``drop_layers``  no adapter in the lowest ``drop_layers`` transformer blocks: a site's block is its
                     index in the outermost ``nn.ModuleList`` on its path (``encoder.layer.N``,
                     ``model.layers.N``, T5's ``block.N``, BART's ``layers.N``; an encoder-decoder's
                     encoder and decoder alike; Swin's stage); sites in blocks below drop_layers are
                     left out when inject plans, so they neither train nor save. With drop_layers > 0
                     every site must lie in a block (a ValueError names one that does not), and one
                     site at least must be left.
    ``drop_prob``    in training mode, each adapter is skipped with probability drop_prob, independently
                     per adapter and per forward call: its site computes as if it had no adapter (a
                     serial adapter's module returns its output as is; a parallel adapter adds nothing),
                     and the adapter gets no gradient from that call. The draw is uniform, from
                     torch's default CPU generator (no GPU sync; ``torch.manual_seed`` fixes it;
                     activation checkpointing's recompute restores that generator, so it draws the
                     same, except where threads share it: nn.DataParallel's replicas). Never in eval
                     mode; drop_prob = 0 draws nothing.

    AdaMix (Wang et al. 2022) and AdapterFusion (Pfeiffer et al. 2021):

    ``num_experts``  above 1: each site holds a ``peftkern.nn.AdaMixAdapter`` of that many experts
                     (a random down and up expert per training forward, their mean in eval mode);
                     ``peftkern.merge`` replaces each by its ``merge_experts()`` Adapter.
    ``fusion``       ``{name: directory}`` of adapters trained and saved before
                     (``peftkern.save_pretrained`` of an AdapterConfig with the same sites, bottleneck,
                     activation and scale): each site holds a ``peftkern.nn.AdapterFusion`` over them
                     (stacked in the order of their names), the adapters frozen, only the fusion's
                     query, key and value training (AdapterFusion's second stage). ``inject`` reads
                     the directories' adapters (not their ``modules_to_save``, a task head say: give
                     the fusion its own); ``save_pretrained`` writes the frozen adapters with the
                     fusion, so ``from_pretrained`` never reads them.

    ``gate``  UniPELT (Mao et al. 2022): each adapter's output is scaled per token by its own learned
              gate ``sigmoid(x @ w_g.T + b_g)`` of the adapter's input x (``Adapter(..., gate=True)``:
              a ``gate`` Linear(d_model, 1), saved as ``<site>.adapter.gate.weight`` / ``.bias``).
              Not with fusion or num_experts; not routed per sample in a mixed batch yet.

    Compacter (Mahabadi et al. 2021):

    ``phm_dim``          set (n): each adapter's down and up projections are PHM layers,
                         ``W = Σ_{i<n} A_i ⊗ s_i t_iᵀ`` (A_i ``[n, n]``, s_i t_iᵀ of rank ``phm_rank``),
                         each with a bias (``peftkern.nn.adapter.Compacter``), initialised as
                         AdapterHub's CompacterConfig (rules ~ N(0, 1e-4²), Glorot-uniform factors, zero
                         biases; ``init`` must stay "houlsby", it does not apply). n must divide d_model
                         and the bottleneck. AdapterHub's Compacter is ``AdapterConfig(phm_dim=4,
                         reduction_factor=32)`` (houlsby placement, gelu). Not with fusion or
                         num_experts. ``peftkern.merge`` turns each into the plain adapter of its
                         built weights.
    ``phm_rank``         the rank of each s_i t_iᵀ (AdapterHub's factorized_phm_W).
    ``shared_phm_rule``  True: one rule ``[n, n, n]`` for every PHM layer of the model (saved once as
                         ``adapter_phm_rule``); False: each PHM layer its own.

    ``train_layer_norms``  True: the layer norms (LayerNorm / RMSNorm modules) inside the transformer
              blocks that hold the adapter's sites train with it. Each adapter name holds its own
              copy of their affine parameters (``<norm>.adapter_norm.<name>.weight`` / ``.bias``,
              saved as ``<norm>.adapter_norm.weight``), initialised from the base's and used when
              that adapter is active; the base's stay frozen and untouched (``delete_adapter``
              restores the base exactly, ``peftkern.merge`` copies them into the base's norms). In
              a mixed batch each sample's rows take their adapter's affine (the base's for samples
              of none); two adapters with copies on one norm cannot apply to one sample together.
              The model's final norm and the embeddings' lie in no block and stay the base's (the
              papers' models, BERT, have none outside the blocks but the embeddings'); with True a
              site in no block is refused, by default it trains no norm. The papers: houlsby trains
              them (Houlsby et al. 2019, Figure 2: "the adapter, the layer normalization parameters,
              and the final classification layer" train); pfeiffer does not (Pfeiffer et al. 2021 train
              the adapters only, AdapterHub's PfeifferConfig likewise); parallel does not (He et al.
              2022 train the added modules only); a fusion does not (its second stage trains only
              the fusion: True is refused). None (the default): the placement's paper's choice,
              True for houlsby (Compacter's houlsby placement too), False for the others and a fusion;
              where the default meets a norm whose formula peftkern does not know (Gemma's 1 + w), that
              norm stays the base's, with a warning. A checkpoint saved before this field existed
              trained no norm and loads as such (``config_from_dict`` reads a missing field as False).

    Placements' sources: ``pfeiffer`` is AdapterHub's ``PfeifferConfig`` (``mh_adapter=False``,
    ``output_adapter=True``: one adapter per block, in the FFN's sub-layer; the config cites Pfeiffer
    et al. 2021, arXiv 2005.00247, whose Figure 2 and MAD-X's §2.2 (Pfeiffer et al. 2020) put the
    adapter after the feed-forward's output, reading it after the FFN's add & norm). Surveys' wording
    "after the self-attention layer, after normalisation" does not match that paper; peftkern follows
    the paper and AdapterHub, which agree.
    """

    bottleneck: Optional[int] = None
    reduction_factor: float = 16
    placement: str = "houlsby"
    activation: str = "gelu"
    scale: float = 1.0
    init: str = "houlsby"
    drop_layers: int = 0
    drop_prob: float = 0.0
    num_experts: int = 1
    fusion: Optional[Dict[str, str]] = None
    target_modules: Targets = None
    modules_to_save: Targets = None
    gate: bool = False
    phm_dim: Optional[int] = None
    phm_rank: int = 1
    shared_phm_rule: bool = True
    train_layer_norms: Optional[bool] = None
    method = "adapter"

    def __post_init__(self):
        self._check_common()
        if self.bottleneck is not None:
            self.bottleneck = _checks.dim("AdapterConfig", "bottleneck", self.bottleneck)
        self.reduction_factor = _real(
            "AdapterConfig", "reduction_factor", self.reduction_factor, positive=True
        )
        _choice("AdapterConfig", "placement", self.placement, ADAPTER_PLACEMENTS)
        _choice("AdapterConfig", "activation", self.activation, ADAPTER_ACTIVATIONS)
        _choice("AdapterConfig", "init", self.init, ADAPTER_INITS)
        self.scale = _real("AdapterConfig", "scale", self.scale)
        self.drop_layers = _checks.dim("AdapterConfig", "drop_layers", self.drop_layers, minimum=0)
        self.drop_prob = _checks.probability("AdapterConfig", "drop_prob", self.drop_prob)
        self.num_experts = _checks.dim("AdapterConfig", "num_experts", self.num_experts)
        self.fusion = _fusion_sources(self.fusion)
        self.gate = _bool("AdapterConfig", "gate", self.gate)
        if self.gate and (self.fusion is not None or self.num_experts > 1):
            raise ValueError(
                "AdapterConfig: gate (UniPELT) gates a single adapter; it cannot take "
                + ("fusion" if self.fusion is not None else f"num_experts ({self.num_experts}) > 1")
            )
        if self.fusion is not None and self.num_experts > 1:
            raise ValueError(
                "AdapterConfig: fusion fuses trained single adapters; it cannot take num_experts "
                f"({self.num_experts}) > 1"
            )
        if self.phm_dim is not None:
            self.phm_dim = _checks.dim("AdapterConfig", "phm_dim", self.phm_dim)
        self.phm_rank = _checks.dim("AdapterConfig", "phm_rank", self.phm_rank)
        self.shared_phm_rule = _bool("AdapterConfig", "shared_phm_rule", self.shared_phm_rule)
        if self.phm_dim is not None and (self.fusion is not None or self.num_experts > 1):
            raise ValueError(
                "AdapterConfig: phm_dim (Compacter) builds single adapters; it cannot take "
                + ("fusion" if self.fusion is not None else f"num_experts ({self.num_experts}) > 1")
            )
        if self.phm_dim is not None and self.init != "houlsby":
            raise ValueError(
                f"AdapterConfig: phm_dim (Compacter) has its own init (AdapterHub's); init must stay "
                f"'houlsby'; got {self.init!r}"
            )
        if self.train_layer_norms is not None:
            self.train_layer_norms = _bool("AdapterConfig", "train_layer_norms", self.train_layer_norms)
        if self.train_layer_norms and self.fusion is not None:
            raise ValueError(
                "AdapterConfig: fusion trains only the fusion's query, key and value (AdapterFusion's second "
                "stage); it cannot take train_layer_norms=True"
            )

    def trains_layer_norms(self) -> bool:
        """train_layer_norms; None: the placement's paper's choice (houlsby trains them)."""
        if self.train_layer_norms is not None:
            return self.train_layer_norms
        return self.placement == "houlsby" and self.fusion is None

    def bottleneck_for(self, d_model: int) -> int:
        return self.bottleneck or max(1, int(d_model // self.reduction_factor))


@dataclass
class LoRAConfig(_Config):
    """LoRA (``peftkern.nn.LoRALinear``) on linear layers: ``scaling = lora_alpha / r`` (or
    ``/ sqrt(r)`` with ``use_rslora``), ``lora_alpha`` defaults to r. Presets: the attention's
    query and value projections, as Hugging Face peft's defaults.

    ``gate``: UniPELT (Mao et al. 2022): the update is scaled per token by a learned gate,
    ``base(x) + sigmoid(x @ w_g.T + b_g) * scaling * B(A(dropout(x)))`` (w_g ``[1, in]``, saved as
    ``<linear>.lora_gate_weight`` and ``<linear>.lora_gate_bias``). A gated LoRA depends on its
    input, so it cannot merge into the weight, and it is not routed per sample in a mixed batch yet.
    """

    r: int = 8
    lora_alpha: Optional[float] = None
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: Targets = None
    modules_to_save: Targets = None
    gate: bool = False
    method = "lora"

    def __post_init__(self):
        self._check_common()
        self.r = _checks.dim("LoRAConfig", "r", self.r)
        if self.lora_alpha is not None:
            self.lora_alpha = _real("LoRAConfig", "lora_alpha", self.lora_alpha)
        self.lora_dropout = _checks.probability("LoRAConfig", "lora_dropout", self.lora_dropout)
        if not isinstance(self.use_rslora, bool):
            raise TypeError(f"LoRAConfig: use_rslora must be a bool; got {self.use_rslora!r:.40}")
        self.gate = _bool("LoRAConfig", "gate", self.gate)


@dataclass
class MaskConfig(_Config):
    """Mask tuning (``peftkern.nn.MaskedLinear``): a learned binary mask over each frozen weight,
    ``scores > threshold``, trained through a straight-through estimator; every score starts at
    ``score_init`` (above the threshold: the first mask keeps every weight). Presets: every linear
    layer of the transformer blocks (Zhao et al. 2020)."""

    threshold: float = DEFAULT_THRESHOLD
    score_init: float = DEFAULT_SCORE_INIT
    target_modules: Targets = None
    modules_to_save: Targets = None
    method = "mask"

    def __post_init__(self):
        self._check_common()
        self.threshold = _real("MaskConfig", "threshold", self.threshold)
        self.score_init = _real("MaskConfig", "score_init", self.score_init)
        if self.score_init <= self.threshold:
            raise ValueError(
                f"MaskConfig: score_init ({self.score_init}) must be above threshold ({self.threshold}), "
                "or every weight starts masked out"
            )


@dataclass
class BitFitConfig(_Config):
    """BitFit (Ben Zaken et al. 2022): only bias terms train. ``bias_names``: None for every
    parameter named ``bias``, or a list of parameter-name suffixes / one regex (as
    ``target_modules``, matched against parameter names)."""

    bias_names: Targets = None
    modules_to_save: Targets = None
    method = "bitfit"

    def __post_init__(self):
        self.bias_names = _names("BitFitConfig", "bias_names", self.bias_names)
        self.modules_to_save = _names("BitFitConfig", "modules_to_save", self.modules_to_save)


def _token_ids(config, field, value):
    """None, or a non-empty list of non-negative int token ids (a tuple is taken as a list)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"{config}: {field} must be None or a non-empty list of token ids; got {value!r:.80}")
    return [_checks.dim(config, f"{field}[{i}]", v, minimum=0) for i, v in enumerate(value)]


@dataclass
class PrefixConfig(_Config):
    """Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): every attention layer
    attends to ``num_virtual_tokens`` learned keys and values in front of the sequence's, through
    ``peftkern.ops.prefix_attention`` (no concatenated KV, no KV-cache tricks).

    ``projection_dim``  None: P-tuning v2, the prefixes are the parameters. Set: Li & Liang's
                        reparametrisation (``peftkern.nn.PrefixKV``: an embedding through a tanh MLP
                        of that width, as peft's ``prefix_projection``); ``peftkern.merge`` evaluates
                        it once and keeps the prefixes.
    ``num_tasks``       above 1: a prefix per task, chosen per sample by ``task_ids [B]`` given to the
                        model's forward (or ``with peftkern.task_ids(ids):`` around the call, for generate()).

    As peft's prefix tuning (a ``past_key_values`` prefix of length P): the prefix sits in front of
    the sequence as P past tokens, the sequence's positions start at P (the position ids the model
    is given or makes are shifted by P), and padding masks cover the sequence keys only. Injection
    registers peftkern's attention with transformers' ``AttentionInterface`` and sets the model to
    use it; the prefix never enters the KV cache, so ``generate()`` works with any cache.

    Encoder-decoders (T5, mT5, BART, mBART): ``sites`` names the attentions that get a prefix, any of
    ``"encoder"`` (the encoder's self-attention, non-causal), ``"decoder"`` (the decoder's causal
    self-attention) and ``"cross"`` (the decoder's cross-attention, in front of the source keys and
    always visible, whatever the source's padding); each layer of each site has its own prefix.
    None: all three, Li & Liang's ``z = [PREFIX; x; PREFIX'; y]``. peft's seq2seq prefix tuning is
    ``sites=["decoder"]``: peft puts its prefix in the decoder's self-attention cache only (it resets
    the cross-attention cache, and the encoder has none), which ``load_prompt_embeddings`` maps.
    The decoder's prefix is P past tokens as on decoders (BART's decoder positions start at P; T5's
    relative position bias gives prefix key p the bias of position p - P, as peft's cache does);
    the encoder's keeps the source's positions (BART's encoder positions start at 0, as Li & Liang's
    BART) and, on T5, gives prefix key p the encoder's bias of position p - P; the cross-attention's
    gets no bias (T5's cross-attention has none). Only with an encoder-decoder.

    ``gate``  UniPELT (Mao et al. 2022): each layer's prefix share of each query's attention output
              is scaled by a learned gate ``sigmoid(h @ w_g.T + b_g)`` of that token's input hidden
              state h to the attention module (one gate per layer, shared by the heads; the softmax
              over prefix and sequence stays joint). Saved as ``<base>.peftkern_prefix.gate.weight``
              ``[num_layers, hidden]`` and ``.gate.bias`` ``[num_layers]``. Not with num_tasks > 1;
              not routed per sample in a mixed batch yet.

    ``init_token_ids``  start each layer's prefix from real words (Li & Liang 2021, section 7.4): the
                        ids, repeated or cut to num_virtual_tokens (as PromptConfig's), are run once
                        through the frozen model as it stands at injection with every peftkern adapter
                        off (eval, no grad), and each layer's prefix keys and values become the keys
                        and values that layer computes for them, what it would keep as P past tokens
                        (after the rotary embedding at positions 0..P-1 on RoPE models). On a causal
                        decoder the model with that prefix so starts as the base model reading the
                        words before each sequence. Encoder-decoders: the ids are the encoder's input
                        and the decoder's (an ``"encoder"`` prefix: the encoder's self-attention keys,
                        ``"decoder"``: the decoder's, ``"cross"``: the cross-attention's keys of the
                        encoder's states). Every task starts from the same words. Ids must be in the
                        model's vocabulary (checked at injection). Not with projection_dim (the
                        reparametrisation's MLP cannot be set to given prefixes). None: random.
    """

    num_virtual_tokens: int = 20
    projection_dim: Optional[int] = None
    num_tasks: int = 1
    modules_to_save: Targets = None
    gate: bool = False
    sites: Optional[List[str]] = None
    init_token_ids: Optional[List[int]] = None
    method = "prefix"

    def __post_init__(self):
        self.modules_to_save = _names("PrefixConfig", "modules_to_save", self.modules_to_save)
        self.sites = _prefix_sites(self.sites)
        self.num_virtual_tokens = _checks.dim("PrefixConfig", "num_virtual_tokens", self.num_virtual_tokens)
        if self.projection_dim is not None:
            self.projection_dim = _checks.dim("PrefixConfig", "projection_dim", self.projection_dim)
        self.num_tasks = _checks.dim("PrefixConfig", "num_tasks", self.num_tasks)
        self.gate = _bool("PrefixConfig", "gate", self.gate)
        if self.gate and self.num_tasks > 1:
            raise ValueError(
                "PrefixConfig: gate (UniPELT) gates one prefix; it cannot take num_tasks "
                f"({self.num_tasks}) > 1"
            )
        self.init_token_ids = _token_ids("PrefixConfig", "init_token_ids", self.init_token_ids)
        if self.init_token_ids is not None and self.projection_dim is not None:
            raise ValueError(
                "PrefixConfig: init_token_ids sets the prefixes themselves; with projection_dim "
                f"({self.projection_dim}) they come from the reparametrisation's MLP, which cannot start "
                "from given prefixes"
            )


PREFIX_SITES = ("encoder", "decoder", "cross")


def _prefix_sites(value):
    """None, or a non-empty list of PREFIX_SITES in their order."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise TypeError(
            f"PrefixConfig: sites must be None or a non-empty list of {PREFIX_SITES}; got {value!r:.80}"
        )
    for v in value:
        _choice("PrefixConfig", "sites", v, PREFIX_SITES)
    if len(set(value)) != len(value):
        raise ValueError(f"PrefixConfig: sites names a site twice: {list(value)}")
    return [s for s in PREFIX_SITES if s in value]


PROMPT_ENCODERS = (None, "mlp", "lstm")


@dataclass
class PromptConfig(_Config):
    """Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021): ``num_virtual_tokens``
    learned input embeddings prepended to each sample's token embeddings
    (``peftkern.nn.SoftPrompt``); the attention mask gains as many ones, token-level ``labels``
    ``[B, L]`` as many -100 (so a causal-LM loss is peft's), and the token-level outputs (logits,
    hidden states) are trimmed back to the input length.

    ``encoder``               None: prompt tuning, the prompts are the parameters. ``"mlp"`` /
                              ``"lstm"``: P-tuning, the prompts come from peft's prompt encoder (an
                              embedding through a 3-layer ReLU MLP, or a bidirectional LSTM and a
                              2-layer MLP); ``peftkern.merge`` evaluates it once into plain prompts.
    ``encoder_hidden_size``   its width (None: the model's hidden size).
    ``encoder_num_layers``    the LSTM's layers.
    ``init_token_ids``        prompt tuning: start the prompts from these tokens' input embeddings
                              (repeated or cut to num_virtual_tokens, as peft's ``prompt_tuning_init_text``
                              tokenized); None: random.
    ``num_tasks``             above 1: a prompt per task, chosen per sample by ``task_ids [B]``.
    ``placeholder_token_id``  None: the prompts are prepended. An id: P-tuning's template (Liu et al.
                              2021, §3, ``[P_0:i], x, [P_i+1:m], y``): nothing is prepended; each
                              sample's input_ids hold this id at its template's positions, and the
                              k-th of them (in sequence order) takes the k-th prompt row; a sample
                              holds exactly num_virtual_tokens of them or none (generate()'s decode
                              steps). The sequence length, mask, labels and positions are the
                              input's. The id may lie outside the vocabulary (looked up as 0 before
                              the rows replace it); it must not be the model's pad token.
    """

    num_virtual_tokens: int = 20
    encoder: Optional[str] = None
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    init_token_ids: Optional[List[int]] = None
    num_tasks: int = 1
    placeholder_token_id: Optional[int] = None
    modules_to_save: Targets = None
    method = "prompt"

    def __post_init__(self):
        name = "PromptConfig"
        self.modules_to_save = _names(name, "modules_to_save", self.modules_to_save)
        self.num_virtual_tokens = _checks.dim(name, "num_virtual_tokens", self.num_virtual_tokens)
        _choice(name, "encoder", self.encoder, PROMPT_ENCODERS)
        if self.encoder_hidden_size is not None:
            self.encoder_hidden_size = _checks.dim(name, "encoder_hidden_size", self.encoder_hidden_size)
        self.encoder_num_layers = _checks.dim(name, "encoder_num_layers", self.encoder_num_layers)
        self.init_token_ids = _token_ids(name, "init_token_ids", self.init_token_ids)
        self.num_tasks = _checks.dim(name, "num_tasks", self.num_tasks)
        if self.placeholder_token_id is not None:
            self.placeholder_token_id = _checks.dim(
                name, "placeholder_token_id", self.placeholder_token_id, minimum=0
            )
        if self.init_token_ids is not None and self.encoder is not None:
            raise ValueError(
                f"{name}: init_token_ids starts plain prompts (encoder=None); P-tuning's encoder "
                f"({self.encoder!r}) makes its own"
            )


@dataclass
class VPTConfig(_Config):
    """Visual prompt tuning (Jia et al. 2022) for ViT-style models: ``num_tokens`` learned tokens
    inserted after the CLS token of the patch embeddings (``peftkern.nn.VisualPrompt``).

    ``deep``  False (VPT-shallow): one set, inserted once. True (VPT-deep): a fresh set per layer,
              replacing the previous layer's prompt tokens.

    The prompt tokens are removed from the last block's output, so ``last_hidden_state`` and the
    pooler see the base model's tokens (``output_hidden_states``' inner states keep them).
    """

    num_tokens: int = 10
    deep: bool = False
    modules_to_save: Targets = None
    method = "vpt"

    def __post_init__(self):
        self.modules_to_save = _names("VPTConfig", "modules_to_save", self.modules_to_save)
        self.num_tokens = _checks.dim("VPTConfig", "num_tokens", self.num_tokens)
        if not isinstance(self.deep, bool):
            raise TypeError(f"VPTConfig: deep must be a bool; got {self.deep!r:.40}")


@dataclass
class IA3Config(_Config):
    """(IA)³ (Liu et al. 2022): learned vectors rescale activations, ``k = l_k ⊙ (W_k x + b_k)``,
    ``v = l_v ⊙ (W_v x + b_v)``, and the FFN's down-projection input, ``W_2 (l_ff ⊙ h)``.

    ``target_modules``       linear layers that get a vector; None: the preset (peft's).
    ``feedforward_modules``  those of target_modules whose input is scaled (``[in]``); the others'
                             output is scaled (``[out]``). None: the preset's (peft's).
    ``init_ia3_weights``     True: every vector starts at ones (the base model's output), as peft.
    """

    target_modules: Targets = None
    feedforward_modules: Targets = None
    init_ia3_weights: bool = True
    modules_to_save: Targets = None
    method = "ia3"

    def __post_init__(self):
        self._check_common()
        ff = self.feedforward_modules  # [] allowed, as peft's: no feed-forward site (mt5's preset)
        self.feedforward_modules = [] if ff in ([], ()) else _names("IA3Config", "feedforward_modules", ff)
        self.init_ia3_weights = _bool("IA3Config", "init_ia3_weights", self.init_ia3_weights)


@dataclass
class AdaLoRAConfig(_Config):
    """AdaLoRA (Zhang et al. 2023): LoRA in SVD form, ``ΔW = P Λ Q`` (``lora_B`` P ``[out, r]``,
    ``lora_E`` Λ ``[r, 1]``, ``lora_A`` Q ``[r, in]``), scaled by ``lora_alpha / ranknum``; the
    rank budget falls from ``init_r`` to ``target_r`` per layer on average, by the importance of each
    singular triplet, through ``peftkern.update_ranks(model, step)`` called after each optimizer
    step. Fields and defaults are Hugging Face peft's ``AdaLoraConfig``'s.

    ``tinit`` / ``tfinal``  steps of full rank before pruning starts / of the final budget at the end;
    ``deltaT``              steps between two budget allocations; ``beta1`` / ``beta2``: the EMA
                            factors of the sensitivity and its uncertainty; ``orth_reg_weight``: the
                            weight of the orthogonality penalty on P and Q; ``total_step``: the
                            training's steps (required).
    """

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: Targets = None
    modules_to_save: Targets = None
    method = "adalora"

    def __post_init__(self):
        name = "AdaLoRAConfig"
        self._check_common()
        self.init_r = _checks.dim(name, "init_r", self.init_r)
        self.target_r = _checks.dim(name, "target_r", self.target_r)
        if self.target_r > self.init_r:
            raise ValueError(f"{name}: target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        self.tinit = _checks.dim(name, "tinit", self.tinit, minimum=0)
        self.tfinal = _checks.dim(name, "tfinal", self.tfinal, minimum=0)
        self.deltaT = _checks.dim(name, "deltaT", self.deltaT)
        for field in ("beta1", "beta2"):
            v = _real(name, field, getattr(self, field))
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name}: {field} must be in [0, 1); got {v}")
            setattr(self, field, v)
        self.orth_reg_weight = _real(name, "orth_reg_weight", self.orth_reg_weight)
        if self.orth_reg_weight < 0:  # peft's check
            raise ValueError(f"{name}: orth_reg_weight must be >= 0; got {self.orth_reg_weight}")
        if self.total_step is None:
            raise ValueError(f"{name}: total_step (the training's steps) is required; got None")
        self.total_step = _checks.dim(name, "total_step", self.total_step)
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"{name}: tinit ({self.tinit}) must be below total_step - tfinal "
                f"({self.total_step} - {self.tfinal}), or no step allocates a budget"
            )
        self.lora_alpha = _real(name, "lora_alpha", self.lora_alpha)
        self.lora_dropout = _checks.probability(name, "lora_dropout", self.lora_dropout)


@dataclass
class KronAConfig(_Config):
    """KronA (Edalati et al. 2022): a Kronecker-product update on linear layers,
    ``out = W x + b + scaling · (A ⊗ B) x`` with A ``[out_a, in_a]`` and B ``[out_b, in_b]``
    (``out = out_a · out_b``, ``in = in_a · in_b``), computed as ``A X Bᵀ`` on x reshaped to
    ``[in_a, in_b]`` (two small GEMMs, ``[out, in]`` never formed). The factor shapes come from
    peft's LoKr ``factorization(dim, decompose_factor)``; peft's LoKr with full-rank factors
    (``lokr_w1``, ``lokr_w2``, scaling = alpha / r) is this form. Presets: LoRA's (the query and
    value projections).

    ``decompose_factor``  as peft's LoKr: -1, the most balanced factors; else A's sides are the
                          factor where it divides the dimension. ``scaling``: the update's scale (peft's
                          alpha / r for a LoKr checkpoint). Init: as peft's LoKr, A zero and B
                          Kaiming-uniform, so the model starts as its base.
    """

    decompose_factor: int = -1
    scaling: float = 1.0
    target_modules: Targets = None
    modules_to_save: Targets = None
    method = "krona"

    def __post_init__(self):
        self._check_common()
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int):
            raise TypeError(
                f"KronAConfig: decompose_factor must be an int (-1: the most balanced factors); got "
                f"{self.decompose_factor!r:.40}"
            )
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(
                f"KronAConfig: decompose_factor must be -1 or a positive int; got {self.decompose_factor}"
            )
        self.scaling = _real("KronAConfig", "scaling", self.scaling)


@dataclass
class LSTConfig(_Config):
    """Ladder side-tuning (Sung, Cho, Bansal 2022, LST, §3): a small side network
    (``peftkern.nn.LadderSideNetwork``) beside the frozen backbone, fed by each backbone block's
    output through a learned downsampler and gate; its last state, upsampled, replaces the
    backbone's last hidden state before the model's head. The backbone runs under no_grad, so none
    of its activations is kept for the backward pass.

    ``reduction_factor``  r (the paper's 8 by default): the side blocks are the backbone's own block
                          class at hidden size d / r, FFN size / r and head dim / r (the head count
                          kept, as the paper's T5 side networks), initialised by pruning the
                          backbone's weights (magnitude criterion; see methods/lst.py). r must
                          divide the hidden size, the FFN size and the head dim.
    ``gate``              True: the paper's gated ladder, ``mu_i = sigmoid(alpha_i / 0.1)``; False: a
                          plain sum of the side state and the downsampled backbone state.

    Trains the side blocks, downsamplers, gates, upsampler and final side norm (plus
    ``modules_to_save``, a new task head say, outside the backbone's blocks and embeddings).
    ``target_modules`` is not used (LST takes every block). Models: BERT-style and Llama-style
    stacks, and T5 and BART (a side network beside each stack, the side decoder cross-attending to
    the side encoder); mBART and BART with layerdrop are refused. Not routed per sample in a mixed
    batch; no cached decoding (``generate(..., use_cache=False)``), no beam search.
    """

    reduction_factor: int = 8
    gate: bool = True
    modules_to_save: Targets = None
    method = "lst"

    def __post_init__(self):
        self.modules_to_save = _names("LSTConfig", "modules_to_save", self.modules_to_save)
        self.reduction_factor = _checks.dim("LSTConfig", "reduction_factor", self.reduction_factor)
        self.gate = _bool("LSTConfig", "gate", self.gate)


CONFIGS = {
    c.method: c
    for c in (
        AdapterConfig,
        LoRAConfig,
        MaskConfig,
        BitFitConfig,
        PrefixConfig,
        PromptConfig,
        VPTConfig,
        IA3Config,
        AdaLoRAConfig,
        KronAConfig,
        LSTConfig,
    )
}


def config_from_dict(d: dict) -> _Config:
    """The config ``to_dict`` wrote (``d["method"]`` names its class)."""
    if not isinstance(d, dict) or d.get("method") not in CONFIGS:
        raise ValueError(f"not a peftkern config: 'method' must be one of {sorted(CONFIGS)}; got {d!r:.120}")
    cls = CONFIGS[d["method"]]
    if d["method"] == "adapter" and "train_layer_norms" not in d:  # saved before the field: no norm trained
        d = {**d, "train_layer_norms": False}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields - {"method"})
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
    return cls(**{k: v for k, v in d.items() if k != "method"})
