"""The model card (README.md) written next to a merged model."""

from __future__ import annotations

import json
import re

__all__ = ["hub_base_models", "model_card"]

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


def model_card(recipe: dict, inputs: list[str], base_models: list[str] | None = None) -> str:
    """A README.md with YAML front matter (base_model, tags, library_name) and the recipe.

    `inputs` are listed in the body as they were named; `base_models` (Hub repo ids only; default:
    the inputs that are written `owner/name[@revision]`) go to the front matter, which has no
    `base_model` key when there are none."""
    from lazymerge._version import __version__

    if base_models is None:
        base_models = [m.split("@", 1)[0] for m in inputs if _HUB_ID.fullmatch(m.split("@", 1)[0])]
    lines = ["---"]
    if base_models:
        lines += ["base_model:"] + [f"- {json.dumps(m)}" for m in base_models]
    lines += ["library_name: transformers", "tags:", "- merge", "- lazymerge"]
    if recipe.get("merge_method") == "dogerm":
        lines.append("- dogerm")
    lines += ["---", "", "# Merged model", ""]
    lines.append(f"Made with [lazymerge](https://pypi.org/project/lazymerge/) {__version__} from:")
    lines += [""] + [f"- `{m}`" for m in inputs] + [""]
    if recipe.get("merge_method") == "dogerm":
        lines += [_DOGERM_TEXT.format(weight=recipe.get("weight", 0.0))]
    lines += ["## Recipe", "", "```json", json.dumps(recipe, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)
