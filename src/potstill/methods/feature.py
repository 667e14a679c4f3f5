"""Feature distillation: logit KD plus the teacher's intermediate hidden states and attention.

Token-level KD (a :class:`~potstill.methods.token_level.TokenLevel` it holds: the divergence,
T², the hard term, the fused loss) with three more terms, each with its own weight (``feature.*`` in a recipe), summed over supervised tokens
like every term and divided once by the loop:

* ``hidden`` — for each pair of the layer map (default: student layer i ↔ teacher layer
  round((i + 1) · L_t / L_s) − 1), the student's hidden states, through a learned linear projector
  where the widths differ, against the teacher's: MSE or cosine distance per token, both sides
  layer-normalised by default; averaged over the pairs.
* ``relation`` — the batch's documents, mean-pooled from the final hidden states: each one's
  cosine similarities to the others (softmax KL or MSE), or RKD's distance or angle structure
  (Park et al. 2019); widths need not match.
* ``attention`` — on chosen student layers (default: the last) against their mapped teacher
  layers: MiniLM-v2's Q–Q, K–K and V–V relations split into ``feature.relation_heads`` heads (any
  head counts; averaged over the three), or TinyBERT's attention-probability KL
  (``feature.attention: probabilities``, equal query-head counts). Causal, within each document.

One forward pass per model gives every layer's hidden states and the chosen layers' queries,
keys and values (:func:`potstill.lm.forward_features`), padding-free or padded alike. Projectors
are built when the run starts (:meth:`Feature.attach`, sized from both models), trained and
checkpointed with the student, saved beside it as ``projectors.safetensors``, and never part of
the exported model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from potstill.errors import RecipeError
from potstill.lm import Features, forward_features, unwrap
from potstill.losses.feature import (
    attention_kl,
    batch_relation,
    hidden_distance,
    relation_kl,
    token_vectors,
    uniform_layer_map,
)
from potstill.losses.objective import LossSums
from potstill.methods.base import Method
from potstill.methods.token_level import TokenLevel

if TYPE_CHECKING:
    from potstill.recipe import Recipe

HIDDEN, ATTENTION, RELATION = "hidden", "attention", "relation"  # the terms' names in the log


@dataclass
class Feature(Method, name="feature"):
    kd: TokenLevel  # the logit part: divergence, temperature, hard term, fused path
    hidden_weight: float = 1.0
    hidden_loss: str = "mse"  # mse | cosine
    hidden_normalize: bool = True
    layer_map: list[tuple[int, int]] | None = None  # (student, teacher) layers; None: uniform
    attention_weight: float = 0.0
    attention: str = "relations"  # relations (MiniLM-v2) | probabilities (TinyBERT)
    attention_layers: list[int] | None = None  # student layers; None: the last
    relation_heads: int = 8
    relation_weight: float = 0.0
    relation: str = "kl"  # kl | mse | rkd_distance | rkd_angle, over the batch's documents
    relation_temperature: float = 0.05
    projectors: nn.ModuleDict = field(default_factory=nn.ModuleDict, repr=False)
    pairs: list[tuple[int, int]] = field(default_factory=list)  # resolved layer map
    attention_pairs: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def from_recipe(cls, r: Recipe, *, vocab_size: int | None) -> Feature:
        f = r.feature
        return cls(
            kd=TokenLevel.from_recipe(r, vocab_size=vocab_size),
            hidden_weight=f.hidden_weight,
            hidden_loss=f.hidden_loss,
            hidden_normalize=f.hidden_normalize,
            layer_map=[tuple(p) for p in f.layer_map] if f.layer_map else None,
            attention_weight=f.attention_weight,
            attention=f.attention,
            attention_layers=f.attention_layers,
            relation_heads=f.relation_heads,
            relation_weight=f.relation_weight,
            relation=f.relation,
            relation_temperature=f.relation_temperature,
        )

    def describe(self) -> str:
        terms = [f"{self.name}: {self.kd.describe().split(': ', 1)[1]}"]
        if self.hidden_weight:
            terms.append(
                f"hidden {self.hidden_loss} ×{self.hidden_weight} on layers "
                f"{', '.join(f'{s}→{t}' for s, t in self.pairs)}"
                f"{' (layer-normalised)' if self.hidden_normalize else ''}"
                f"{f'; {len(self.projectors)} projectors' if len(self.projectors) else ''}"
            )
        if self.attention_weight:
            what = (
                f"Q/K/V relations, {self.relation_heads} heads"
                if self.attention == "relations"
                else "attention probabilities"
            )
            terms.append(
                f"attention ({what}) ×{self.attention_weight} on layers "
                f"{', '.join(f'{s}→{t}' for s, t in self.attention_pairs)}"
            )
        if self.relation_weight:
            terms.append(f"relation {self.relation} ×{self.relation_weight} between documents")
        return "; ".join(terms)

    # --- the run's models ------------------------------------------------------------------

    def attach(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Resolve the layer maps against both models and build the projectors."""
        s_cfg, t_cfg = unwrap(student).config, unwrap(teacher).config
        n_s, n_t = s_cfg.num_hidden_layers, t_cfg.num_hidden_layers
        self.pairs = self.layer_map or uniform_layer_map(n_s, n_t)
        for s, t in self.pairs:
            if not (0 <= s < n_s and 0 <= t < n_t):
                raise RecipeError(
                    f"feature.layer_map pair [{s}, {t}] is outside the student's {n_s} or the "
                    f"teacher's {n_t} layers (0-based)"
                )
        mapped = dict(uniform_layer_map(n_s, n_t)) | dict(self.pairs)  # explicit pairs win
        layers = self.attention_layers if self.attention_layers is not None else [n_s - 1]
        self.attention_pairs = [(s, mapped[s]) for s in layers if 0 <= s < n_s]
        if len(self.attention_pairs) != len(layers):
            raise RecipeError(f"feature.attention_layers {layers} must be in 0..{n_s - 1}")
        if self.attention_weight and self.attention == "relations":
            for name, cfg in (("student", s_cfg), ("teacher", t_cfg)):
                widths = _qkv_widths(cfg)
                if any(w % self.relation_heads for w in widths):
                    raise RecipeError(
                        f"feature.relation_heads={self.relation_heads} must divide the "
                        f"{name}'s query and key/value widths {widths}; "
                        f"e.g. {_common_divisors(widths)}"
                    )
        heads = (s_cfg.num_attention_heads, t_cfg.num_attention_heads)
        if self.attention_weight and self.attention == "probabilities" and heads[0] != heads[1]:
            raise RecipeError(
                "feature.attention=probabilities compares attention head by head, but the "
                f"student has {heads[0]} heads and the teacher {heads[1]}; use "
                "feature.attention=relations"
            )
        if self.hidden_weight and s_cfg.hidden_size != t_cfg.hidden_size:
            for s, _ in self.pairs:  # one projector per student layer of the map
                self.projectors[str(s)] = nn.Linear(
                    s_cfg.hidden_size, t_cfg.hidden_size, bias=False
                )

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"projectors": self.projectors} if len(self.projectors) else {}

    # --- the loss ---------------------------------------------------------------------------

    def loss(
        self, student: nn.Module, teacher: nn.Module | None, batch: dict[str, Tensor]
    ) -> LossSums:
        att_s = [s for s, _ in self.attention_pairs] if self.attention_weight else []
        att_t = [t for _, t in self.attention_pairs] if self.attention_weight else []
        f_s = forward_features(student, batch, att_s)
        with torch.no_grad():
            f_t = forward_features(teacher, batch, att_t)
        supervised = batch["labels"][f_s.keep] != self.ignore_index  # (S,) in packed order
        labels = batch["labels"][f_s.keep][supervised]  # (N,)
        sums = self.kd.objective(
            student, teacher, f_s.hidden[-1][supervised], f_t.hidden[-1][supervised], labels
        )
        terms, loss = dict(sums.terms), sums.loss
        if self.hidden_weight:
            hidden = self.hidden_sum(f_s, f_t, supervised)
            terms[HIDDEN], loss = hidden.detach(), loss + self.hidden_weight * hidden
        if self.attention_weight:
            attention = self.attention_sum(f_s, f_t, supervised)
            terms[ATTENTION], loss = attention.detach(), loss + self.attention_weight * attention
        if self.relation_weight:
            relation = self.relation_sum(f_s, f_t, supervised)
            terms[RELATION], loss = relation.detach(), loss + self.relation_weight * relation
        return LossSums(loss, terms)

    def relation_sum(self, f_s: Features, f_t: Features, supervised: Tensor) -> Tensor:
        """The batch's documents as mean-pooled final hidden states; each document's relation
        term (to the others) weighted by its supervised tokens, so the loop's division by tokens
        gives a token-weighted mean. 0 with fewer than two documents."""
        docs = [(a, b) for a, b in f_s.documents if supervised[a:b].any()]
        if len(docs) < 2:
            return f_s.hidden[-1].new_zeros((), dtype=torch.float32)
        pooled_s = torch.stack([f_s.hidden[-1][a:b].float().mean(0) for a, b in docs])  # (D, H_s)
        pooled_t = torch.stack([f_t.hidden[-1][a:b].float().mean(0) for a, b in docs])  # (D, H_t)
        per_doc = batch_relation(
            self.relation, pooled_s, pooled_t, temperature=self.relation_temperature
        )  # (D,)
        weights = torch.stack([supervised[a:b].sum() for a, b in docs]).float()
        return (per_doc * weights).sum()

    def hidden_sum(self, f_s: Features, f_t: Features, supervised: Tensor) -> Tensor:
        """Σ over supervised tokens of the per-token distance, averaged over the layer pairs."""
        total = f_s.hidden[0].new_zeros((), dtype=torch.float32)
        for s, t in self.pairs:
            student = f_s.hidden[s + 1][supervised]  # (N, H_s): hidden_states[i + 1] = layer i
            if str(s) in self.projectors:
                student = self.projectors[str(s)](student.to(self.projectors[str(s)].weight.dtype))
            teacher = f_t.hidden[t + 1][supervised]  # (N, H_t)
            total = (
                total
                + hidden_distance(
                    student, teacher, loss=self.hidden_loss, normalize=self.hidden_normalize
                ).sum()
            )
        return total / len(self.pairs)

    def attention_sum(self, f_s: Features, f_t: Features, supervised: Tensor) -> Tensor:
        """Σ over supervised query tokens, document by document, averaged over layer pairs."""
        total = f_s.hidden[0].new_zeros((), dtype=torch.float32)
        for s, t in self.attention_pairs:
            (*s_qkv, s_scale), (*t_qkv, t_scale) = f_s.attention[s], f_t.attention[t]
            for a, b in f_s.documents:
                rows = supervised[a:b]  # (n,)
                if not rows.any():
                    continue
                doc_s = [x[:, a:b] for x in s_qkv]  # (heads, n, D) each
                doc_t = [x[:, a:b] for x in t_qkv]
                if self.attention == "relations":
                    per_token = (
                        sum(
                            relation_kl(
                                token_vectors(x), token_vectors(y), heads=self.relation_heads
                            )
                            for x, y in zip(doc_s, doc_t, strict=True)
                        )
                        / 3
                    )  # (n,) Q–Q, K–K, V–V averaged
                else:
                    per_token = attention_kl(
                        doc_s[0], doc_s[1], doc_t[0], doc_t[1],
                        student_scale=s_scale, teacher_scale=t_scale,
                    )  # fmt: skip
                total = total + per_token[rows].sum()
        return total / len(self.attention_pairs)


def _qkv_widths(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return heads * head_dim, kv * head_dim


def _common_divisors(widths: tuple[int, ...]) -> str:
    found = [d for d in range(1, 65) if all(w % d == 0 for w in widths)]
    return ", ".join(map(str, found[-4:]))
