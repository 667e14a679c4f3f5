"""Embedding-model students: a sentence encoder distilled into a smaller one.

The teacher is a sentence encoder (a BERT-family body with pooling, as sentence-transformers
ships it: ``bundled:all-minilm-l6-v2`` or any such folder); the student is usually the teacher
with fewer layers (``student.init: prune``). Each record becomes one sentence — its ``text``, its
``prompt``, or the first user turn of a chat — and both models embed it: the encoder's last hidden
states, mean-pooled over the real tokens (or the CLS token, as the teacher's pooling config says),
L2-normalised where the teacher normalises.

Objective, summed over the batch's sentences (the loop divides by their number):

* ``embedding`` — per sentence, 1 − cos(student, teacher) (``embedding.loss: cosine``) or the mean
  squared difference (``mse``), through a learned linear projector where the widths differ;
* ``relation`` — the batch's similarity structure (:mod:`potstill.losses.feature`): softmax KL or
  MSE of each sentence's cosine similarities to the others, or RKD's distance / angle terms;
  width-free;
* ``attention`` — MiniLM-v2's Q–Q, K–K and V–V relations of the student's last layer against the
  teacher's, bidirectional, split into ``embedding.relation_heads`` heads (any head counts).

Held-out evaluation embeds the held-out sentences with both models: mean cosine to the teacher,
recall@10 of the teacher's own ten nearest neighbours, and the Spearman correlation of all pairwise
similarities. The saved student is a sentence-transformers folder (the teacher's modules.json and
pooling config beside the pruned body): ``SentenceTransformer(model_dir)`` loads it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from potstill.data import Example
from potstill.errors import DataError, RecipeError
from potstill.lm import capture_attention, unwrap
from potstill.losses.feature import batch_relation, relation_kl, token_vectors
from potstill.losses.objective import LossSums, weighted_sums
from potstill.methods.base import Method

if TYPE_CHECKING:
    from potstill.recipe import Recipe

EMBEDDING, RELATION, ATTENTION = "embedding", "relation", "attention"
# What sentence-transformers reads beside the weights; copied from the teacher's folder.
SENTENCE_TRANSFORMERS_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)


def sentence_of(record: dict) -> str:
    """The one sentence a record stands for: its text, its prompt, or its first user turn."""
    for key in ("text", "sentence", "prompt"):
        if isinstance(record.get(key), str):
            return record[key]
    for message in record.get("messages") or ():
        if message.get("role") == "user":
            return str(message.get("content", ""))
    raise DataError(
        f"record with keys {sorted(record)} has no sentence: give it a `text`, a `prompt` or a "
        "chat with a user turn"
    )


def pool(hidden: Tensor, mask: Tensor, mode: str) -> Tensor:
    """(B, T, H) hidden states, (B, T) attention mask -> (B, H) fp32 sentence embeddings."""
    if mode == "cls":
        return hidden[:, 0].float()
    weights = mask.unsqueeze(-1).float()  # (B, T, 1)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def teacher_pooling(folder: str | None) -> tuple[str, bool]:
    """``(pooling mode, normalised)`` from a sentence-transformers folder (mean, True if none)."""
    if not folder or not (Path(folder) / "modules.json").is_file():
        return "mean", True
    modules = json.loads((Path(folder) / "modules.json").read_text())
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    mode = "mean"
    for m in modules:
        config = Path(folder) / m.get("path", "") / "config.json"
        if m.get("type", "").endswith("Pooling") and config.is_file():
            pooling = json.loads(config.read_text())
            mode = "cls" if pooling.get("pooling_mode_cls_token") else "mean"
    return mode, normalize


@dataclass
class Embedding(Method, name="embedding"):
    loss_kind: str = "cosine"  # cosine | mse
    embedding_weight: float = 1.0
    relation_weight: float = 0.0
    relation: str = "kl"
    relation_temperature: float = 0.05
    attention_weight: float = 0.0  # MiniLM-v2 Q/K/V relations of the last layers
    relation_heads: int = 12
    attention_layers: tuple[int, int] | None = None  # (student, teacher) layer, set by attach
    teacher_folder: str | None = None  # a local sentence-transformers folder, if the teacher is
    pooling: str = "mean"
    normalize: bool = True
    tokenizer: Any = field(default=None, repr=False)
    projector: nn.Linear | None = field(default=None, repr=False)

    encodes_records: ClassVar[bool] = True

    @classmethod
    def from_recipe(cls, r: Recipe, *, vocab_size: int | None) -> Embedding:
        from potstill.models import resolve_model_path

        folder = None
        if r.teacher.model:
            path, _ = resolve_model_path(r.teacher.model)
            folder = path if Path(path).is_dir() else None
        pooling, normalize = teacher_pooling(folder)
        e = r.embedding
        return cls(
            loss_kind=e.loss,
            embedding_weight=e.weight,
            relation_weight=e.relation_weight,
            relation=e.relation,
            relation_temperature=e.relation_temperature,
            attention_weight=e.attention_weight,
            relation_heads=e.relation_heads,
            teacher_folder=folder,
            pooling=pooling,
            normalize=normalize,
        )

    def describe(self) -> str:
        terms = [f"{self.loss_kind} ×{self.embedding_weight}"]
        if self.relation_weight:
            terms.append(f"relation {self.relation} ×{self.relation_weight}")
        if self.attention_weight:
            s, t = self.attention_layers or ("last", "last")
            terms.append(
                f"Q/K/V relations ({self.relation_heads} heads, layers {s}→{t}) "
                f"×{self.attention_weight}"
            )
        how = f"{self.pooling} pooling{', normalised' if self.normalize else ''}"
        projector = "; a projector to the teacher's width" if self.projector is not None else ""
        return f"embedding: {' + '.join(terms)} per sentence ({how}){projector}"

    def bind(self, student_tokenizer: Any, teacher_tokenizer: Any) -> None:
        self.tokenizer = student_tokenizer

    def example(self, record: dict, *, max_length: int) -> tuple[Example, bool]:
        ids = self.tokenizer(sentence_of(record), truncation=False)["input_ids"]
        truncated = len(ids) > max_length
        if truncated:  # keep the closing [SEP]
            ids = [*ids[: max_length - 1], ids[-1]]
        return Example(input_ids=ids, target_mask=[True] * len(ids)), truncated

    def count_tokens(self, batch: dict[str, Tensor]) -> Tensor:
        """Sentences, not tokens: each sentence's terms count once."""
        return torch.tensor(batch["input_ids"].shape[0], device=batch["input_ids"].device)

    def attach(self, student: nn.Module, teacher: nn.Module | None) -> None:
        s_cfg, t_cfg = unwrap(student).config, unwrap(teacher).config
        pooler = getattr(unwrap(student), "pooler", None)  # BERT's [CLS] head: never read, as
        if pooler is not None:  # sentence-transformers pools the hidden states itself; frozen,
            pooler.requires_grad_(False)  # as DDP wants every trained parameter to get a gradient
        if s_cfg.hidden_size != t_cfg.hidden_size and self.embedding_weight:
            self.projector = nn.Linear(s_cfg.hidden_size, t_cfg.hidden_size, bias=False)
        self.attention_layers = (s_cfg.num_hidden_layers - 1, t_cfg.num_hidden_layers - 1)
        widths = (s_cfg.hidden_size, t_cfg.hidden_size)  # BERT: Q, K and V are as wide
        if self.attention_weight and any(w % self.relation_heads for w in widths):
            raise RecipeError(
                f"embedding.relation_heads={self.relation_heads} must divide both widths {widths}"
            )

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"projector": self.projector} if self.projector is not None else {}

    def embed(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """(B, H) fp32 sentence embeddings, pooled and normalised as the teacher does."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        pooled = pool(out.last_hidden_state, batch["attention_mask"], self.pooling)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def loss(
        self, student: nn.Module, teacher: nn.Module | None, batch: dict[str, Tensor]
    ) -> LossSums:
        layers = self.attention_layers if self.attention_weight else None
        with capture_attention(student, [layers[0]] if layers else []) as s_qkv:
            s = self.embed(student, batch)  # (B, H_s)
        with torch.no_grad(), capture_attention(teacher, [layers[1]] if layers else []) as t_qkv:
            t = self.embed(teacher, batch)  # (B, H_t)
        terms, weights = {}, {}
        if layers:
            (*qkv_s, _), (*qkv_t, _) = s_qkv[layers[0]], t_qkv[layers[1]]  # (B, heads, T, D)
            terms[ATTENTION] = self.attention_sum(qkv_s, qkv_t, batch["attention_mask"])
            weights[ATTENTION] = self.attention_weight
        if self.embedding_weight:
            projected = self.projector(s) if self.projector is not None else s
            if self.loss_kind == "cosine":
                per = 1.0 - F.cosine_similarity(projected, t, dim=-1)  # (B,)
            else:
                per = (projected - t).pow(2).mean(-1)
            terms[EMBEDDING], weights[EMBEDDING] = per.sum(), self.embedding_weight
        if self.relation_weight and s.shape[0] > 1:
            terms[RELATION] = batch_relation(
                self.relation, s, t, temperature=self.relation_temperature
            ).sum()
            weights[RELATION] = self.relation_weight
        return weighted_sums(terms, weights, s)

    def attention_sum(self, qkv_s: list[Tensor], qkv_t: list[Tensor], mask: Tensor) -> Tensor:
        """Σ over sentences of MiniLM-v2's bidirectional Q–Q, K–K, V–V relation KL, averaged over
        each sentence's tokens and the three relations."""
        total = mask.new_zeros((), dtype=torch.float32)
        for b, n in enumerate(mask.sum(1).tolist()):
            per = sum(
                relation_kl(token_vectors(x[b, :, :n]), token_vectors(y[b, :, :n]),
                            heads=self.relation_heads, causal=False).mean()
                for x, y in zip(qkv_s, qkv_t, strict=True)
            )  # fmt: skip
            total = total + per / 3
        return total

    @torch.no_grad()
    def evaluate(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        batches: list[dict[str, Tensor]],
        tokenizer: Any,
    ) -> dict[str, float]:
        if teacher is None or not batches:
            return {}
        s = torch.cat([self.embed(student, b) for b in batches])  # (n, H_s)
        t = torch.cat([self.embed(teacher, b) for b in batches])  # (n, H_t)
        out = similarity_report(s, t)
        if self.projector is not None:
            out["cosine_to_teacher"] = float(
                F.cosine_similarity(self.projector(s), t, dim=-1).mean()
            )
        return out

    def finish(self, model_dir: Path) -> None:
        """Make the saved body a sentence-transformers folder: the teacher's module list and
        pooling config beside it (or mean pooling + normalisation when the teacher has none)."""
        folder = Path(self.teacher_folder) if self.teacher_folder else None
        if folder is not None and (folder / "modules.json").is_file():
            for name in SENTENCE_TRANSFORMERS_FILES:
                if (folder / name).is_file():
                    shutil.copy2(folder / name, model_dir / name)
            for module in json.loads((folder / "modules.json").read_text()):
                path = module.get("path", "")
                if path:  # Pooling, Normalize, ... (an empty folder is still read)
                    (model_dir / path).mkdir(exist_ok=True)
                    if (folder / path).is_dir():
                        shutil.copytree(folder / path, model_dir / path, dirs_exist_ok=True)
            return
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]  # fmt: skip
        if self.normalize:
            modules.append(
                {"idx": 2, "name": "2", "path": "2_Normalize",
                 "type": "sentence_transformers.models.Normalize"}
            )  # fmt: skip
            (model_dir / "2_Normalize").mkdir(exist_ok=True)
        (model_dir / "modules.json").write_text(json.dumps(modules, indent=2))
        (model_dir / "1_Pooling").mkdir(exist_ok=True)
        width = json.loads((model_dir / "config.json").read_text())["hidden_size"]
        (model_dir / "1_Pooling" / "config.json").write_text(
            json.dumps(
                {"word_embedding_dimension": width,
                 "pooling_mode_cls_token": self.pooling == "cls",
                 "pooling_mode_mean_tokens": self.pooling == "mean"},
                indent=2,
            )
        )  # fmt: skip


def _ranks(x: Tensor) -> Tensor:
    """Ranks 0..n−1 of a 1-D tensor (ties broken by position)."""
    ranks = torch.empty_like(x)
    ranks[x.argsort()] = torch.arange(x.numel(), dtype=x.dtype)
    return ranks


def similarity_report(student: Tensor, teacher: Tensor, k: int = 10) -> dict[str, float]:
    """How well the student's embeddings keep the teacher's structure over n sentences.

    student (n, H_s), teacher (n, H_t) -> ``recall_at_10`` (share of each sentence's ten nearest
    neighbours under the teacher that are also among its ten under the student), ``spearman``
    (rank correlation of all pairwise cosine similarities) and, where the widths match,
    ``cosine_to_teacher`` (mean cosine between the two embeddings of a sentence)."""
    n = student.shape[0]
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    sim_s, sim_t = s @ s.T, t @ t.T  # (n, n)
    eye = torch.eye(n, dtype=torch.bool)
    k = min(k, n - 1)
    out: dict[str, float] = {}
    if k >= 1:
        near_s = sim_s.masked_fill(eye, float("-inf")).topk(k, -1).indices  # (n, k)
        near_t = sim_t.masked_fill(eye, float("-inf")).topk(k, -1).indices
        hits = (near_s[:, :, None] == near_t[:, None, :]).any(-1).float()  # (n, k)
        out["recall_at_10"] = float(hits.mean())
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
        a, b = _ranks(sim_s[upper]), _ranks(sim_t[upper])
        out["spearman"] = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    if s.shape[1] == t.shape[1]:
        out["cosine_to_teacher"] = float((s * t).sum(-1).mean())
    return out
