"""LoRA on a borrowed base: peft layers for K users, per-row routing, new-token rows, and an exact undo.

The base is a warm object other code holds on to, so training borrows it and gives it back as it
was: :func:`attach` injects peft LoRA layers (``inject_adapter_in_model``: the same layers diffusers'
``add_adapter`` makes) and :meth:`Attachment.detach` removes them again, restoring every
parameter's ``requires_grad``, every module's train/eval mode, gradient checkpointing, the text
encoders' token embeddings and the attributes peft, accelerate and transformers set on a model they
work with (:data:`BORROW_ATTRIBUTES`). The tokenizers are never touched: training uses copies that
also know the new tokens. Tests compare a base's weights, module tree, attributes, flags and
tokenizers before and after training.

Several users train in one job as K peft adapters on the same layers. Each batch row belongs to one
user and goes through that user's LoRA only, so each user's gradients come from their own rows alone.
:class:`Router` routes the rows with forward hooks: a trainer's batch (each user's rows in turn, in
equal runs) gets every user's LoRA in two batched products per layer (:func:`batched_lora_delta`);
any other routing goes through peft's mixed-batch forward (``adapter_names=[...]``, one name per
row, as peft's own ``PeftModel`` does at inference), which loops over the users in every layer.

New tokens (pivotal tuning) do not resize the base's embedding matrix: :class:`TokenRows` wraps it
and looks up ids at or past the first new id in small trainable tables, one per user.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F

from gen.base import Base

TEXT_ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
# Set on a model while it is lent: peft's config; accelerate's mark and its autocast wrapper around ``forward``;
# the input-embedding hooks transformers adds with activation checkpointing.
BORROW_ATTRIBUTES = ("peft_config", "_is_accelerate_prepared", "forward", "_original_forward", "_require_grads_hook", "_require_grads_hooks")


def adapter_name(k: int) -> str:
    return f"user{k}"


class TokenRows(nn.Module):
    """A token embedding extended with trainable rows: ids ``>= first_id`` read ``rows[k]`` of user k."""

    def __init__(self, base: nn.Embedding, first_id: int, init: Sequence[torch.Tensor]):
        super().__init__()
        self.base = base
        self.first_id = first_id
        self.rows = nn.ParameterList([nn.Parameter(t.detach().float().clone()) for t in init])
        self.vocabulary_std = float(base.weight.detach().float().std())

    @torch.no_grad()
    def retract(self, power: float) -> None:
        """Scale each user's rows by ``(vocabulary std / their std) ** power``.

        Unchecked, a new token's embedding grows far past the vocabulary's scale (the built-in base:
        norm ~1.2 after 800 steps against 0.26 +- 0.12 for its words) and outweighs the prompt's other
        words; diffusers' pivotal tuning retracts it after every step (power 0.1). Per user, so one
        user's rows never move another's.
        """
        for rows in self.rows:
            rows.mul_((self.vocabulary_std / rows.std().clamp_min(1e-12)) ** power)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = torch.cat(list(self.rows))
        new = ids >= self.first_id
        out = self.base(ids.masked_fill(new, 0))
        extra = table[(ids - self.first_id).clamp(0, len(table) - 1)].to(out.dtype)
        return torch.where(new.unsqueeze(-1), extra, out)


class Router:
    """Per-row adapter names, set around each forward pass, and the multi-user LoRA math they select.

    A trainer's batch holds each user's rows in turn, in equal runs. Then peft computes only the base
    layer (every row routed to ``"__base__"``) and a forward hook adds every user's LoRA in two batched
    products per layer (:func:`batched_lora_delta`), so a layer costs the same few operations for any
    number of users. Other routings (one name for all rows, uneven runs) use peft's mixed-batch forward,
    which loops over the users in every layer: gather their rows, A, B, scatter-add. ``batched=False``
    always uses peft's: the baseline ``scripts/bench_multi_user.py`` measures against.
    """

    def __init__(self, models: Sequence[nn.Module], batched: bool = True):
        self.names: str | list[str] | None = None
        self.runs: list[str] | None = None  # the users in row order, when the rows come in equal runs per user
        self.batched = batched
        layers = [m for model in models for m in model.modules() if isinstance(m, LoraLayer)]
        self._batchable = {id(m) for m in layers if batchable(m)}
        self._handles = [m.register_forward_pre_hook(self._route_rows, with_kwargs=True) for m in layers]
        self._handles += [m.register_forward_hook(self._add_runs, with_kwargs=True) for m in layers if id(m) in self._batchable]

    @contextlib.contextmanager
    def route(self, names: str | list[str]) -> Iterator[None]:
        """Rows use ``names[i]``; a single name applies to every row (e.g. when sampling one user)."""
        previous = self.names, self.runs
        self.names, self.runs = names, (equal_runs(names) if self.batched and not isinstance(names, str) else None)
        try:
            yield
        finally:
            self.names, self.runs = previous

    def _route_rows(self, module, args, kwargs):
        if self.names is None:
            raise RuntimeError("a multi-user LoRA model ran without routing; wrap the call in router.route(...)")
        rows = len(args[0] if args else kwargs["x"])
        if self.runs and id(module) in self._batchable:
            kwargs["adapter_names"] = ["__base__"] * rows  # the LoRA part comes from _add_runs
        else:
            kwargs["adapter_names"] = [self.names] * rows if isinstance(self.names, str) else self.names
        return args, kwargs

    def _add_runs(self, module, args, kwargs, output):
        if not self.runs or module.disable_adapters:
            return None
        return output + batched_lora_delta(module, args[0] if args else kwargs["x"], self.runs).to(output.dtype)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def equal_runs(names: Sequence[str]) -> list[str] | None:
    """The distinct names in order if ``names`` is equal runs of each (``[a, a, b, b]`` -> ``[a, b]``), else None."""
    users = list(dict.fromkeys(names))
    n = len(names) // len(users) if users else 0
    if "__base__" in users or n * len(users) != len(names) or list(names) != [u for u in users for _ in range(n)]:
        return None
    return users


def batchable(layer: LoraLayer) -> bool:
    """Plain LoRA (no DoRA or other variant) on a Linear or a Conv2d: what :func:`batched_lora_delta` computes."""
    return isinstance(layer.get_base_layer(), (nn.Linear, nn.Conv2d)) and not getattr(layer, "lora_variant", None)


def batched_lora_delta(layer: LoraLayer, x: torch.Tensor, users: Sequence[str]) -> torch.Tensor:
    """Every user's LoRA update on their own rows at once; the rows of ``x`` are ``len(users)`` equal runs, in order.

    Linear: the runs as a (users, rows x tokens, features) batch through two ``bmm``. Conv2d: the runs
    side by side as channel groups through two grouped convolutions. Gradients reach each user's A and B
    through the stacks, from that user's rows only.
    """
    k = len(users)
    a = torch.stack([layer.lora_A[u].weight for u in users])  # (K, r, in) or (K, r, in, kh, kw)
    # The users of one attachment share rank and alpha (one LoraSpec), hence one scale
    b = torch.stack([layer.lora_B[u].weight for u in users]) * layer.scaling[users[0]]  # (K, out, r) or (K, out, r, 1, 1)
    x = layer.lora_dropout[users[0]](x.to(a.dtype))
    if a.ndim == 3:
        delta = torch.bmm(torch.bmm(x.reshape(k, -1, x.shape[-1]), a.transpose(1, 2)), b.transpose(1, 2))
        return delta.reshape(*x.shape[:-1], b.shape[1])
    conv, n = layer.lora_A[users[0]], x.shape[0] // k
    grouped = x.reshape(k, n, *x.shape[1:]).transpose(0, 1).reshape(n, -1, *x.shape[2:])
    h = F.conv2d(grouped, a.flatten(0, 1), stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=k)
    delta = F.conv2d(h, b.flatten(0, 1), groups=k)
    return delta.reshape(n, k, -1, *delta.shape[2:]).transpose(0, 1).reshape(x.shape[0], -1, *delta.shape[2:])


@dataclass(frozen=True)
class LoraSpec:
    """What to attach: rank, alpha, dropout and targets, plus each user's new tokens and their initial words."""

    rank: int
    alpha: float
    dropout: float
    unet_targets: tuple[str, ...]
    text_targets: tuple[str, ...] | None  # None: no text-encoder LoRA
    new_tokens: tuple[tuple[str, ...], ...]  # per user; all empty without pivotal tuning
    init_words: tuple[str, ...]  # per user: new tokens start at the mean embedding of this word
    seeds: tuple[int, ...]  # per user: LoRA init


class Attachment:
    """K users' trainable LoRA (and token rows) on a base's models, until :meth:`detach`."""

    def __init__(self, base: Base, spec: LoraSpec):
        """Record the state to restore; :meth:`build` then changes the models."""
        pipe = base.pipe
        self.spec = spec
        self.users = len(spec.seeds)
        self.unet = pipe.unet
        self.text_encoders = {e: getattr(pipe, e) for _, e in TEXT_ENCODERS if getattr(pipe, e, None) is not None}
        self.tokenizers = {t: copy.deepcopy(getattr(pipe, t)) for t, e in TEXT_ENCODERS if e in self.text_encoders}
        self._models = {"unet": self.unet, **self.text_encoders}
        for name, model in self._models.items():
            if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
                raise RuntimeError(f"the base's {name} already has peft layers; unload them before training")
        self._saved = {
            name: (set(model.__dict__), [(p, p.requires_grad) for p in model.parameters()], [(m, m.training) for m in model.modules()])
            for name, model in self._models.items()
        }
        self._checkpointing = {name: _is_checkpointing(m) for name, m in self._models.items()}
        self._embeddings: dict[str, nn.Embedding] = {}
        self._tuner_layers: list[BaseTunerLayer] = []  # peft's LoRA layers, found once (base_only runs every step)
        self.router: Router | None = None

    # --- building ---

    def build(self) -> None:
        """Freeze the base, inject every user's LoRA, add token rows and routing."""
        for model in self._models.values():
            model.requires_grad_(False)
        self._inject("unet", self.spec.unet_targets)
        if self.spec.text_targets:
            for name in self.text_encoders:
                self._inject(name, self.spec.text_targets)
        if any(self.spec.new_tokens):
            self._add_token_rows()
        self._tuner_layers = [m for model in self._models.values() for m in model.modules() if isinstance(m, BaseTunerLayer)]
        if self.users > 1:
            self.router = Router(list(self._models.values()))

    def _inject(self, name: str, targets: tuple[str, ...]) -> None:
        model, s = self._models[name], self.spec
        config = LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(targets), init_lora_weights=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Already found a `peft_config`")  # several adapters is the point
            for k in range(self.users):
                inject_adapter_in_model(config, model, adapter_name=adapter_name(k))
        layers = [(path, m) for path, m in model.named_modules() if isinstance(m, LoraLayer)]
        if not layers:
            raise ValueError(f"no module of the {name} matches the LoRA targets {', '.join(targets)}")
        component = list(self._models).index(name)
        for k, seed in enumerate(s.seeds):  # each user's init depends on their seed only, not on the others
            generator = torch.Generator().manual_seed((seed * 1_000_003 + component) % 2**63)
            for _, layer in layers:
                a, b = layer.lora_A[adapter_name(k)].weight, layer.lora_B[adapter_name(k)].weight
                with torch.no_grad():
                    a.copy_(nn.init.kaiming_uniform_(torch.empty(a.shape), a=math.sqrt(5), generator=generator))
                    b.zero_()
        for _, layer in layers:  # every user's adapter trains (peft makes only the active one trainable)
            for k in range(self.users):
                layer.lora_A[adapter_name(k)].requires_grad_(True)
                layer.lora_B[adapter_name(k)].requires_grad_(True)

    def _add_token_rows(self) -> None:
        for tokenizer_name, encoder_name in TEXT_ENCODERS:
            if encoder_name not in self.text_encoders:
                continue
            tokenizer, encoder = self.tokenizers[tokenizer_name], self.text_encoders[encoder_name]
            first_id = len(tokenizer)
            tokens = [t for user in self.spec.new_tokens for t in user]
            if tokenizer.add_tokens(tokens) != len(tokens):
                raise ValueError(f"new tokens {tokens} collide with the tokenizer's vocabulary")
            ids = tokenizer.convert_tokens_to_ids(tokens)
            if ids != list(range(first_id, first_id + len(tokens))):
                raise RuntimeError(f"the tokenizer gave new tokens ids {ids}, expected consecutive ids from {first_id}")
            embedding = encoder.get_input_embeddings()
            init = []
            for user_tokens, word in zip(self.spec.new_tokens, self.spec.init_words):
                word_ids = tokenizer(word, add_special_tokens=False).input_ids
                init.append(embedding.weight[word_ids].float().mean(dim=0).expand(len(user_tokens), -1))
            self._embeddings[encoder_name] = embedding
            encoder.set_input_embeddings(TokenRows(embedding, first_id, init).to(embedding.weight.device))

    # --- training ---

    def trainable_models(self) -> dict[str, nn.Module]:
        """The models that hold trainable parameters (these go through ``accelerator.prepare``)."""
        return {n: m for n, m in self._models.items() if any(p.requires_grad for p in m.parameters())}

    def user_parameters(self, k: int) -> dict[str, list[nn.Parameter]]:
        """User k's trainable parameters: ``unet_A``/``unet_B`` and ``text_A``/``text_B`` LoRA matrices (apart,
        since LoRA+ gives B its own learning rate) and ``tokens`` rows."""
        name = adapter_name(k)
        groups: dict[str, list[nn.Parameter]] = {"unet_A": [], "unet_B": [], "text_A": [], "text_B": [], "tokens": []}
        for model_name, model in self._models.items():
            side = "unet" if model_name == "unet" else "text"
            for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
                if name in layer.lora_A:
                    groups[f"{side}_A"].append(layer.lora_A[name].weight)
                    groups[f"{side}_B"].append(layer.lora_B[name].weight)
        for encoder_name in self._embeddings:
            groups["tokens"].append(self.text_encoders[encoder_name].get_input_embeddings().rows[k])
        return groups

    def training_changes(self, caption: str) -> bool:
        """Whether training moves ``caption``'s text encoding: always with text-encoder LoRA, else only when it holds
        a new token. Captions it does not move (the class rows' in pivotal tuning) can be encoded once."""
        if self.spec.text_targets:
            return True
        return any(
            max(self.tokenizers[t](caption).input_ids) >= self.text_encoders[e].get_input_embeddings().first_id
            for t, e in TEXT_ENCODERS if e in self._embeddings
        )

    def retract_tokens(self, power: float) -> None:
        """Pull every user's new token rows toward the vocabulary's scale (:meth:`TokenRows.retract`)."""
        for encoder_name in self._embeddings:
            self.text_encoders[encoder_name].get_input_embeddings().retract(power)

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        for name, encoder in self.text_encoders.items():
            if name in self.trainable_models():
                encoder.activation_checkpointing_enable()

    def train(self, mode: bool = True) -> None:
        for model in self._models.values():
            model.train(mode)

    def using(self, k: int) -> contextlib.AbstractContextManager:
        """Every forward pass inside uses user k's adapter only (for sampling)."""
        return self.router.route(adapter_name(k)) if self.router else contextlib.nullcontext()

    @contextlib.contextmanager
    def base_only(self) -> Iterator[None]:
        """Forward passes inside run the base alone: every LoRA layer off, ``requires_grad`` untouched.

        (peft's ``enable_adapters(False)`` also changes ``requires_grad``, which would freeze the
        adapters being trained.) Rows are routed to peft's ``"__base__"`` too, so a multi-user
        router does not hand a smaller batch the full batch's per-row names.
        """
        routed = self.router.route("__base__") if self.router else contextlib.nullcontext()
        for layer in self._tuner_layers:
            layer._disable_adapters = True
        try:
            with routed:
                yield
        finally:
            for layer in self._tuner_layers:
                layer._disable_adapters = False

    def rows(self, users: Sequence[int]) -> contextlib.AbstractContextManager:
        """Row i of every forward pass inside uses user ``users[i]``'s adapter.

        Keep the backward pass inside too: gradient checkpointing reruns the forward there.
        """
        return self.router.route([adapter_name(k) for k in users]) if self.router else contextlib.nullcontext()

    def view(self, base: Base) -> Base:
        """The base as it samples now (LoRA live), with the training tokenizers so prompts may use new tokens."""
        pipe = copy.copy(base.pipe)  # shares the models; own tokenizers and scheduler
        for name, tokenizer in self.tokenizers.items():
            setattr(pipe, name, tokenizer)
        view = replace(base, pipe=pipe)
        view.__dict__["fingerprints"] = base.fingerprints  # the base's identity, not a hash of the models with LoRA in them
        return view

    # --- results ---

    def extract(self, k: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """User k's LoRA tensors (``<component>.<module>.lora_A.weight`` ...) and token embeddings, on the CPU."""
        name = adapter_name(k)
        tensors = {}
        for component, model in self._models.items():
            for path, layer in model.named_modules():
                if isinstance(layer, LoraLayer) and name in layer.lora_A:
                    tensors[f"{component}.{path}.lora_A.weight"] = layer.lora_A[name].weight.detach().float().cpu().clone()
                    tensors[f"{component}.{path}.lora_B.weight"] = layer.lora_B[name].weight.detach().float().cpu().clone()
        embeddings = {
            encoder_name: self.text_encoders[encoder_name].get_input_embeddings().rows[k].detach().float().cpu().clone()
            for encoder_name in self._embeddings
        }
        return tensors, embeddings

    def detach(self) -> None:
        """Give the base back exactly as it was lent."""
        if self.router is not None:
            self.router.close()
        for encoder_name, embedding in self._embeddings.items():
            self.text_encoders[encoder_name].set_input_embeddings(embedding)
        self._tuner_layers = []
        for name, model in self._models.items():
            recurse_remove_peft_layers(model)
            if _is_checkpointing(model) and not self._checkpointing[name]:
                if name == "unet":
                    model.disable_gradient_checkpointing()
                else:
                    model.activation_checkpointing_disable()
                    model.disable_input_require_grads()
            keys, grads, modes = self._saved[name]
            for key in BORROW_ATTRIBUTES:
                if key not in keys:
                    model.__dict__.pop(key, None)
            for p, requires_grad in grads:
                p.requires_grad_(requires_grad)
            for m, training in modes:
                m.training = training


def _is_checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@contextlib.contextmanager
def attach(base: Base, spec: LoraSpec) -> Iterator[Attachment]:
    """Borrow ``base`` for training; it is given back unchanged however the block exits."""
    attachment = Attachment(base, spec)
    try:
        attachment.build()
        yield attachment
    finally:
        attachment.detach()
