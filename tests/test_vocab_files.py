"""Malformed tokenizer files of the DogeRM inputs (lazymerge/recipes/vocab.py): one error naming
the file, never an internal error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_model

import lazymerge
from lazymerge.errors import CheckpointError

WORDS = [f"w{i}" for i in range(8)]


def _tensors(rows: int, *, head: bool) -> dict[str, torch.Tensor]:
    t = {"model.embed_tokens.weight": torch.ones(rows, 4), "model.norm.weight": torch.ones(4)}
    t["score.weight" if head else "lm_head.weight"] = torch.ones(1 if head else rows, 4)
    return t


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    rm = write_model(tmp_path / "rm", _tensors(8, head=True), vocab=WORDS, config={"vocab_size": 8})
    (rm / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {}}))
    sft = write_model(tmp_path / "sft", _tensors(9, head=False), vocab=[*WORDS, "[PAD]"])
    return rm, sft


def _edit(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


SFT_TOKENIZER_EDITS = {
    "model is a list": lambda t: t.update(model=[]),
    "vocab id a string": lambda t: t["model"]["vocab"].update({"w1": "x"}),
    "vocab id null": lambda t: t["model"]["vocab"].update({"w1": None}),
    "vocab id a float": lambda t: t["model"]["vocab"].update({"w1": 1.5}),
    "vocab id true": lambda t: t["model"]["vocab"].update({"w1": True}),
    "unigram entries not pairs": lambda t: t["model"].update(vocab=[1, 2]),
    "unigram entry empty": lambda t: t["model"].update(vocab=[[]]),
    "added_tokens a number": lambda t: t.update(added_tokens=5),
    "added_tokens entry without content": lambda t: t.update(added_tokens=[{"id": 3}]),
}


@pytest.mark.parametrize("case", list(SFT_TOKENIZER_EDITS))
def test_malformed_sft_tokenizer_json_is_one_error_naming_the_file(tmp_path: Path, case: str) -> None:
    rm, sft = _pair(tmp_path)
    _edit(sft / "tokenizer.json", SFT_TOKENIZER_EDITS[case])
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is malformed"):
        lazymerge.dogerm(rm, sft, 0.3, tmp_path / "out", dry_run=True)


def test_malformed_tokenizer_config_of_either_model(tmp_path: Path) -> None:
    rm, sft = _pair(tmp_path)
    lazymerge.dogerm(rm, sft, 0.3, tmp_path / "ok", dry_run=True)  # the pair itself is fine
    (sft / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": []}))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json is malformed"):
        lazymerge.dogerm(rm, sft, 0.3, tmp_path / "out", dry_run=True)
    (sft / "tokenizer_config.json").unlink()
    (rm / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": 7}))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json is malformed"):
        lazymerge.dogerm(rm, sft, 0.3, tmp_path / "out", dry_run=True)


def test_replanning_an_opened_pair_reuses_its_vocabulary_and_plans_the_same(tmp_path: Path, monkeypatch) -> None:
    # A weight search re-plans the same opened pair for every weight: the vocabulary union and
    # the output's tokenizer files are derived once (they do not depend on lambda), and every
    # plan equals one made from freshly opened checkpoints.
    from lazymerge.io.checkpoint import open_checkpoint
    from lazymerge.recipes import dogerm as dogerm_recipe

    rm, sft = _pair(tmp_path)
    reads = []
    real = dogerm_recipe.load_vocab
    monkeypatch.setattr(dogerm_recipe, "load_vocab", lambda ckpt: reads.append(ckpt.label) or real(ckpt))
    opened = open_checkpoint(rm), open_checkpoint(sft)
    for weight in (0.3, 0.7, 0.3):
        again = dogerm_recipe.plan_dogerm(*opened, weight, tmp_path / "out")
        fresh = dogerm_recipe.plan_dogerm(open_checkpoint(rm), open_checkpoint(sft), weight, tmp_path / "out")
        assert again.tensors == fresh.tensors and again.side_files == fresh.side_files
        assert again.shards == fresh.shards and again.recipe == fresh.recipe
    # 2 reads (RM, SFT) for the opened pair, 2 for each of the 3 fresh pairs
    assert len(reads) == 8
    # the row added for the SFT-only token is in the reused tokenizer files
    assert b"[PAD]" in again.side_files["tokenizer.json"]
    # what was derived stays with this process: a checkpoint sent to a Ray task carries none of it
    import pickle

    assert opened[0].derived and not pickle.loads(pickle.dumps(opened[0])).derived
