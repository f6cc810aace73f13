"""The model card (README.md) written next to a merged model.

Its front matter is what the Hub indexes: the licence of the inputs (Llama-2 derivatives must
keep it), `base_model` with `base_model_relation: merge` (the Hub then lists the merge under each
input), a `pipeline_tag` (`text-classification` for a reward model) and tags. Hub inputs are named
at the commit they resolved to, so the recipe reproduces the merge.
"""

from __future__ import annotations

import json
import re

__all__ = ["card_metadata", "hub_base_models", "input_card", "model_card", "pinned_name"]

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")

_DOGERM_TEXT = """\
This is a **DogeRM** merge (Lin, Li, Lee and Chen, *DogeRM: Equipping Reward Models with Domain
Knowledge through Model Merging*, EMNLP 2024): a general reward model and a domain SFT model
fine-tuned from the same base are merged parameter-wise,
`theta = (1 - lambda) * theta_RM + lambda * theta_SFT`, with lambda = {weight:g}. The reward head
comes from the reward model, the SFT language-model head is dropped, and the token embedding
covers the union of both vocabularies (shared tokens averaged; a token only one model has keeps
that model's row: unlike the paper's script, a reward-model-only row is kept, not re-initialised).

```bibtex
@inproceedings{{lin-etal-2024-dogerm,
  title = "{{D}}oge{{RM}}: Equipping Reward Models with Domain Knowledge through Model Merging",
  author = "Lin, Tzu-Han and Li, Chen-An and Lee, Hung-yi and Chen, Yun-Nung",
  booktitle = "Proceedings of the 2024 Conference on Empirical Methods in Natural Language Processing",
  year = "2024",
  url = "https://arxiv.org/abs/2407.01470"
}}
```
"""


def hub_base_models(checkpoints: list) -> list[str]:
    """The inputs' Hub repo ids for `base_model`: the repo of a Hub input; for a local folder its
    config.json `_name_or_path` when that is a repo id; local-only inputs are left out."""
    ids: list[str] = []
    for ckpt in checkpoints:
        repo = getattr(ckpt, "repo_id", None)
        if repo is None:
            try:
                config = ckpt.read_json("config.json") or {}
            except Exception:  # a broken config only costs the card its base_model entry
                config = {}
            name = config.get("_name_or_path")
            repo = name if isinstance(name, str) and _HUB_ID.fullmatch(name) and "--" not in name else None
        if repo is not None and repo not in ids:
            ids.append(repo)
    return ids


def pinned_name(ckpt: object) -> str:
    """How a recipe records an input: a Hub input as `owner/name@<commit>` (the commit its
    revision resolved to, so the recipe reproduces the merge), a local one by its label."""
    repo, commit = getattr(ckpt, "repo_id", None), getattr(ckpt, "commit", None)
    if isinstance(repo, str) and isinstance(commit, str) and commit:
        return f"{repo}@{commit}"
    return str(getattr(ckpt, "label", ckpt))


def input_card(ckpt: object) -> dict:
    """The front matter of an input's own README.md (its licence...), or {} when it has none."""
    side_file = getattr(ckpt, "side_file", None)
    try:
        path = side_file("README.md") if side_file is not None else None
        if path is None:
            return {}
        from huggingface_hub import metadata_load

        meta = metadata_load(path)
    except Exception:  # a broken input card only costs the output card its licence
        return {}
    return meta if isinstance(meta, dict) else {}


def _architectures(ckpt: object) -> list[str]:
    try:
        config = ckpt.read_json("config.json") or {}  # type: ignore[attr-defined]
    except Exception:
        return []
    archs = config.get("architectures")
    return [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []


def card_metadata(recipe: dict, checkpoints: list) -> dict:
    """The card's front matter, built with huggingface_hub's ModelCardData: licence (the first
    input card that names one), base_model with base_model_relation `merge`, pipeline_tag
    (`text-classification` for a reward model) and tags."""
    from huggingface_hub import ModelCardData

    dogerm = recipe.get("merge_method") == "dogerm"
    licence: dict = {}
    for ckpt in checkpoints:
        meta = input_card(ckpt)
        if isinstance(meta.get("license"), str):
            licence = {k: meta[k] for k in ("license", "license_name", "license_link") if isinstance(meta.get(k), str)}
            break
    archs = _architectures(checkpoints[0]) if checkpoints else []
    pipeline = None
    if dogerm or any("ForSequenceClassification" in a for a in archs):
        pipeline = "text-classification"
    elif any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        pipeline = "text-generation"
    tags = ["merge", "lazymerge"]
    if dogerm:
        tags += ["dogerm", "reward-model"]
    elif isinstance(recipe.get("merge_method"), str):
        tags.append(recipe["merge_method"])
    base = hub_base_models(checkpoints)
    data = ModelCardData(
        base_model=base or None,
        base_model_relation="merge" if base else None,
        library_name="transformers",
        pipeline_tag=pipeline,
        tags=tags,
        **licence,
    )
    return data.to_dict()


def model_card(
    recipe: dict,
    inputs: list[str],
    base_models: list[str] | None = None,
    *,
    checkpoints: list | None = None,
    max_shard_size: int | None = None,
) -> str:
    """A README.md with YAML front matter (licence, base_model, pipeline_tag, tags) and the recipe.

    `inputs` are listed in the body as they were named. With `checkpoints`, the front matter is
    `card_metadata`; without, `base_models` (Hub repo ids only; default: the inputs that are written
    `owner/name[@revision]`) go to it, which has no `base_model` key when there are none."""
    import yaml

    from lazymerge._version import __version__

    if checkpoints is not None:
        front = card_metadata(recipe, checkpoints)
    else:
        if base_models is None:
            base_models = [m.split("@", 1)[0] for m in inputs if _HUB_ID.fullmatch(m.split("@", 1)[0])]
        tags = ["merge", "lazymerge"] + (["dogerm"] if recipe.get("merge_method") == "dogerm" else [])
        front = {"library_name": "transformers", "tags": tags}
        if base_models:
            front = {"base_model": base_models, "base_model_relation": "merge", **front}
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip("\n"), "---", ""]
    lines += ["# Merged model", ""]
    lines.append(f"Made with [lazymerge](https://pypi.org/project/lazymerge/) {__version__} from:")
    lines += [""] + [f"- `{m}`" for m in inputs] + [""]
    if recipe.get("merge_method") == "dogerm":
        lines += [_DOGERM_TEXT.format(weight=recipe.get("weight", 0.0))]
    lines += ["## Recipe", "", "```json", json.dumps(recipe, indent=2, sort_keys=True), "```", ""]
    if max_shard_size is not None:
        lines += [f"Written in shards of at most {max_shard_size} bytes (`--max-shard-size {max_shard_size}`).", ""]
    return "\n".join(lines)
