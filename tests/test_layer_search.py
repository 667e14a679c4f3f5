"""Which layers a pruned student keeps: `only_layers` computes what `prune_layers` builds and puts
everything back, the KL scorer matches a plain computation on pruned copies, the greedy search
takes the best candidate each round, and `potstill pick-layers` runs on a tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _sums import write_sums

from potstill.cli import main
from potstill.layer_search import KLScorer, evenly_spread, greedy_layers
from potstill.models import only_layers, prune_layers

VOCAB = 40


def batches_for(vocab: int) -> list[dict[str, torch.Tensor]]:
    """Two padded batches of random ids with some unsupervised positions."""
    g = torch.Generator().manual_seed(3)
    out = []
    for rows in (3, 2):
        ids = torch.randint(0, vocab, (rows, 10), generator=g)
        mask = torch.ones(rows, 10, dtype=torch.long)
        mask[0, 7:] = 0  # padding
        labels = ids.clone()
        labels[:, :3] = -100  # a prompt
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def test_only_layers_computes_the_pruned_model_and_puts_everything_back(tiny_llama):
    model = tiny_llama(VOCAB, layers=5).eval()
    layers = model.model.layers
    ids = torch.randint(0, VOCAB, (2, 8))
    keep = [1, 3, 4]
    pruned = prune_layers(model, keep)
    with torch.no_grad(), only_layers(model, keep) as inside:
        assert inside is model and model.config.num_hidden_layers == 3
        assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
        torch.testing.assert_close(model(ids, use_cache=True).logits, pruned(ids).logits)
    assert model.model.layers is layers and model.config.num_hidden_layers == 5
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3, 4]
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2]
    kinds = ["full_attention", "sliding_attention"] * 2 + ["full_attention"]
    model.config.layer_types = list(kinds)
    with pytest.raises(ValueError), only_layers(model, keep):  # an error inside still restores
        assert model.config.layer_types == [kinds[i] for i in keep]
        raise ValueError
    assert model.model.layers is layers and model.config.num_hidden_layers == 5
    assert model.config.layer_types == kinds


def test_scorer_is_the_kl_of_pruned_copies(tiny_llama):
    model = tiny_llama(VOCAB, layers=5).eval()
    batches = batches_for(VOCAB)
    score = KLScorer(model, batches)
    assert score(list(range(5))) == pytest.approx(0.0, abs=1e-6)
    keep = [0, 2, 4]
    pruned = prune_layers(model, keep)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for b in batches:  # plain: full-sequence logits, shifted positions with a label
            pos = b["labels"] != -100
            full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            part = pruned(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            p_log, q_log = full.log_softmax(-1)[pos], part.log_softmax(-1)[pos]  # (N, V)
            total += float(F.kl_div(q_log, p_log, log_target=True, reduction="sum"))
            tokens += int(pos.sum())
    assert score(keep) == pytest.approx(total / tokens, rel=1e-4)


def test_greedy_takes_the_best_candidate_each_round(tiny_llama):
    model = tiny_llama(VOCAB, layers=6).eval()
    score = KLScorer(model, batches_for(VOCAB))
    rounds = list(greedy_layers(score, 6, 4, progress=False))
    assert [len(r.keep) for r in rounds] == [3, 4] and [r.candidates for r in rounds] == [4, 3]
    first = {i: score(sorted([0, 5, i])) for i in range(1, 5)}
    assert rounds[0].keep == sorted([0, 5, min(first, key=first.get)])
    assert rounds[0].kl == pytest.approx(min(first.values()))
    # a crafted score: lower for higher indices, ties broken towards the lower index
    highest = list(greedy_layers(lambda k: -max(k[1:-1], default=0), 8, 3, progress=False))
    assert highest[0].keep == [0, 6, 7]
    assert list(greedy_layers(lambda k: 0.0, 8, 4, progress=False))[-1].keep == [0, 1, 2, 7]
    assert list(greedy_layers(lambda k: 0.0, 8, 3, start=[2], progress=False))[-1].keep == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot grow 2 start layers to 9 of 8"):
        next(greedy_layers(lambda k: 0.0, 8, 9))


def test_evenly_spread():
    assert evenly_spread(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spread(5, 2) == [0, 4] and evenly_spread(5, 5) == [0, 1, 2, 3, 4]


def test_pick_layers_command(tmp_path, tiny_chat_lm, tiny_llama, capsys):
    _, tokenizer = tiny_chat_lm
    tiny_llama(len(tokenizer), layers=5, seed=1).save_pretrained(tmp_path / "five")
    tokenizer.save_pretrained(tmp_path / "five")
    train, _ = write_sums(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"method: token_level\nteacher: {{model: {tmp_path / 'five'}}}\n"
        "student: {init: prune, keep_layers: [0, 1, 4]}\n"
        f"data: {{train: {train}, max_length: 32}}\n"
    )
    assert main(["pick-layers", str(recipe), "--layers", "3", "--records", "6"]) == 0
    out = capsys.readouterr().out
    assert "3 of the 5 layers" in out and "6 records" in out
    assert "evenly spread [0, 2, 4]: KL" in out and "the recipe's [0, 1, 4]: KL" in out
    pick = out.strip().splitlines()[-1]
    assert pick.startswith("student.keep_layers=[0, ") and pick.endswith(", 4]")
    assert main(["pick-layers", str(recipe), "--layers", "2", "--records", "2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "student.keep_layers=[0, 4]"
    pretrained = ["student.init=pretrained", f"student.model={tmp_path / 'five'}"]
    assert main(["pick-layers", str(recipe), *pretrained, "--layers", "2", "--records", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "student.init=prune student.keep_layers=[0, 4]"  # the override that prunes
    assert main(["pick-layers", str(recipe), "--layers", "5"]) == 2
    assert "--layers must be 2 to 4" in capsys.readouterr().err
