"""mergekit's `tokenizer_source` / `tokenizer:` and `chat_template`: the output vocabulary, each
model's embedding rows, and the output tokenizer files.

Semantics are mergekit 0.1.5's (`mergekit/tokenizer/build.py`, `embed.py`, `merge.py`):
- the output tokenizer is the base model's (`base`), a named model's, or the `union` (the base
  tokenizer plus every other model's tokens, added tokens last); `tokenizer.tokens` adds tokens;
- each model gets a row for every output token before the method runs, for `embed_tokens` and
  `lm_head`: its own row; else the token's configured `source` (a model's row, `model_token`, or
  `zero`); else, when only one model has the token, that model's row; when the base model has
  it, the base's row; else the mean of the rows of the models that have it (none: zero).
  `force: true` gives every model the configured row, even a model that has the token;
- `config.json`'s `vocab_size` is the output vocabulary's size; the tokenizer files are written
  by transformers' `save_pretrained`, as mergekit writes them, with `chat_template` set.

The rows stay streamed: a row taken from a model is a plain byte range (runs of consecutive rows
are one segment), a zero or mean row is a derived Source (`lazymerge.derived`). The tokenizers
are read with transformers (`pip install 'lazymerge[tokenizer]'`), as mergekit reads them.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lazymerge.constants import TOKENIZER_FILES
from lazymerge.errors import RecipeError
from lazymerge.io.checkpoint import Checkpoint, TensorRef
from lazymerge.plan import Segment, Source

__all__ = ["VocabularyPlan", "resolve_chat_template"]

# Tensors with a vocabulary axis (axis 0), as mergekit's architecture files list them.
_VOCAB_TENSOR = re.compile(r"(?:^|\.)(?:embed_tokens|lm_head|wte|embed_out|word_embeddings|tok_embeddings)\.weight$")
_TOKEN_KEYS = {"source", "force"}


class _TokenConfig:
    def __init__(self, kind: str, model: str | None = None, token_id: int | None = None, token: str | None = None):
        self.kind, self.model, self.token_id, self.token = kind, model, token_id, token


class VocabularyPlan:
    """How vocabulary-shaped tensors are laid out in the output, and the output tokenizer."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.tokenizer: Any = None  # the transformers tokenizer to save (None: carried files)
        self.vocab: dict[str, int] = {}
        self.permutations: dict[int, dict[int, int]] = {}  # checkpoint -> new id -> old id or -1
        self.original: dict[int, dict[str, int]] = {}
        self.tokens: dict[str, tuple[_TokenConfig | None, bool]] = {}
        self.base: int | None = None
        self.chat_template: str | None = None

    @classmethod
    def from_recipe(
        cls, spec: dict, checkpoints: list[Checkpoint], index: Callable[[str], int], slices: list[Any]
    ) -> VocabularyPlan:
        """Read `tokenizer_source`, `tokenizer` and `chat_template`; build the output tokenizer."""
        plan = cls()
        source = spec.get("tokenizer_source")
        block = spec.get("tokenizer")
        if source is not None and block is not None:
            raise RecipeError("give `tokenizer_source` or a `tokenizer:` block, not both")
        token_cfg: dict[str, dict] = {}
        if block is not None:
            if not isinstance(block, dict):
                raise RecipeError("`tokenizer` must be a mapping with `source` and `tokens`")
            bad = sorted(set(block) - {"source", "tokens", "pad_to_multiple_of"})
            if bad:
                raise RecipeError(f"`tokenizer` has unsupported key(s): {', '.join(bad)}")
            if block.get("pad_to_multiple_of") is not None:
                raise RecipeError(
                    "tokenizer.pad_to_multiple_of is not supported",
                    hint="remove it (mergekit fills the padding rows with the mean of every row)",
                )
            source = block.get("source", "union")
            token_cfg = block.get("tokens") or {}
            if not isinstance(token_cfg, dict):
                raise RecipeError("tokenizer.tokens must map each token to its settings")
        template = spec.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise RecipeError("`chat_template` must be `auto`, a template name or a Jinja string")
        base = spec.get("base_model")
        referenced = []
        for m in ([base] if isinstance(base, str) else []) + [s.model for sl in slices for s in sl.sources]:
            if index(m) not in referenced:
                referenced.append(index(m))
        donor = referenced[0]
        if source is None:
            if template is not None:
                plan.tokenizer = _load(checkpoints[donor])
                plan.chat_template = resolve_chat_template(template, [checkpoints[i] for i in referenced])
            return plan
        if not isinstance(source, str):
            raise RecipeError("`tokenizer_source` must be `union`, `base` or a model")
        plan.base = index(base) if isinstance(base, str) else None
        plan.tokens = {str(tok): _token_config(tok, cfg, index) for tok, cfg in token_cfg.items()}
        plan._build(source, checkpoints, referenced, index)
        if template is not None:
            plan.chat_template = resolve_chat_template(template, [checkpoints[i] for i in referenced])
        return plan

    # -- the output vocabulary (mergekit's build_tokenizer) -------------------------------------------
    def _build(self, source: str, checkpoints: list[Checkpoint], referenced: list[int], index: Callable) -> None:
        base = referenced[0] if self.base is None else self.base
        tokenizers = {base: _load(checkpoints[base], strip=True)}
        for i in referenced:
            if i not in tokenizers:
                tokenizers[i] = _load(checkpoints[i])
        if source == "base":
            out = tokenizers[base]
        elif source == "union":
            out = _union(tokenizers[base], tokenizers, checkpoints)
        else:
            out = _load(checkpoints[index(source)])
        existing = set(out.get_vocab())
        for tok in self.tokens:
            if tok not in existing:
                out.add_tokens(tok)
                existing.add(tok)
        self.tokenizer = out
        self.vocab = out.get_vocab()
        for i in referenced:
            model_vocab = tokenizers[i].get_vocab()
            size = _vocab_size(checkpoints[i]) or len(model_vocab)
            p = {}
            for tok, new in self.vocab.items():
                old = model_vocab.get(tok, -1)
                p[new] = old if old < size else -1
            self.permutations[i] = p
        self.original = {i: t.get_vocab() for i, t in tokenizers.items()}

    # -- rows -----------------------------------------------------------------------------------------
    def rows_for(self, name: str, checkpoints: list[int], refs: list[TensorRef]) -> _Rows | None:
        """The row plan of a vocabulary tensor (None: not one, or no tokenizer merge)."""
        if not self.permutations or not _VOCAB_TENSOR.search(name) or len(refs[0].shape) != 2:
            return None
        width = refs[0].shape[1]
        for ref in refs:
            if len(ref.shape) != 2 or ref.shape[1] != width:
                raise RecipeError(f"{name} has shape {list(ref.shape)} in one model, width {width} in another")
        return _Rows(self, name, checkpoints, refs)

    def config_updates(self) -> dict:
        return {"vocab_size": len(self.vocab)} if self.vocab else {}

    def tokenizer_files(self) -> dict[str, bytes] | None:
        """The output tokenizer's files as `save_pretrained` writes them (None: keep the carried ones)."""
        if self.tokenizer is None:
            return None
        if self.chat_template is not None:
            self.tokenizer.chat_template = self.chat_template
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save_pretrained(tmp, safe_serialization=True)
            return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


class _Rows:
    """Each model's row for every output token, as plan segments (mergekit's PermutedVocabulary)."""

    def __init__(self, vocab: VocabularyPlan, name: str, checkpoints: list[int], refs: list[TensorRef]) -> None:
        self.n = len(vocab.vocab)
        self.width = math.prod(refs[0].shape[1:])
        self.dtype = refs[0].dtype if len({r.dtype for r in refs}) == 1 else "F32"
        self.refs = dict(zip(checkpoints, refs, strict=True))
        models = list(checkpoints)
        perms = [vocab.permutations[ci] for ci in models]
        # Per token: None (every model has its own row) or the default row, as (kind, parts).
        defaults: dict[int, tuple[str, tuple[tuple[int, int], ...]]] = {}
        self.force: set[int] = set()
        for token, tid in vocab.vocab.items():
            cfg, force = vocab.tokens.get(token, (None, False))
            if force:
                self.force.add(tid)
            has = [p[tid] >= 0 for p in perms]
            if not force and all(has):
                continue
            if cfg is not None:
                defaults[tid] = self._configured(vocab, name, token, tid, cfg)
            elif token in vocab.tokens:
                continue  # configured without a source: mergekit leaves zeros
            elif sum(has) == 1:
                ci = models[has.index(True)]
                defaults[tid] = ("row", ((ci, vocab.permutations[ci][tid]),))
            elif not any(has):
                defaults[tid] = ("zero", ())
            elif vocab.base in models and vocab.permutations[vocab.base][tid] >= 0:
                defaults[tid] = ("row", ((vocab.base, vocab.permutations[vocab.base][tid]),))
            else:
                defaults[tid] = (
                    "mean",
                    tuple((ci, p[tid]) for ci, p in zip(models, perms, strict=True) if p[tid] >= 0),
                )
        self.defaults = defaults
        self.vocab = vocab

    def _configured(
        self, vocab: VocabularyPlan, name: str, token: str, tid: int, cfg: _TokenConfig
    ) -> tuple[str, tuple[tuple[int, int], ...]]:
        if cfg.kind == "zero":
            return ("zero", ())
        ci = cfg.model
        if ci not in self.refs:
            raise RecipeError(f"token {token!r} takes its row from a model that has no {name} here")
        if cfg.kind == "model_token":
            row = cfg.token_id
            if row is None:
                row = vocab.original.get(ci, {}).get(cfg.token, -1)
                if row < 0:
                    raise RecipeError(f"token {cfg.token!r} is not in the tokenizer of the model it is taken from")
            if not 0 <= row < self.refs[ci].shape[0]:
                raise RecipeError(f"token id {row} is out of range for {name} of the model it is taken from")
            return ("row", ((ci, row),))
        row = vocab.permutations[ci][tid]
        if row < 0:
            raise RecipeError(f"token {token!r} takes its row from a model that does not have it")
        return ("row", ((ci, row),))

    def shape(self, ref0: TensorRef) -> tuple[int, ...]:
        return (self.n, *ref0.shape[1:])

    def _plain(self, ci: int, row: int, weight: float) -> Source:
        ref = self.refs[ci]
        return Source(ci, ref.file, ref.offset + row * self.width * ref.itemsize, ref.dtype, weight)

    def _row(self, k: int, ci: int, tid: int, weight: float) -> tuple[Source, tuple]:
        """Model `ci`'s source for output row `tid`, and a key telling whether it continues a run."""
        p = self.vocab.permutations[ci]
        if p[tid] >= 0 and tid not in self.force:
            return self._plain(ci, p[tid], weight), ("row", ci, p[tid])
        kind, parts = self.defaults.get(tid, ("zero", ()))
        if kind == "row":
            ((src_ci, row),) = parts
            return self._plain(src_ci, row, weight), ("row", src_ci, row)
        if kind == "zero":
            return Source(-1, "", 0, self.dtype, weight, "zero"), ("derived",)
        leaves = tuple(self._plain(c, r, 1.0) for c, r in parts)
        return Source(-1, "", 0, self.dtype, weight, "mean", leaves), ("derived",)

    def segments(self, refs: list[tuple[int, TensorRef]], weights: list[float]) -> tuple[Segment, ...]:
        """One segment per run of rows that every model reads from consecutive rows."""
        segments: list[Segment] = []
        run_start, run_keys, run_sources = -1, None, None
        for tid in range(self.n):
            pairs = [self._row(k, ci, tid, w) for k, ((ci, _), w) in enumerate(zip(refs, weights, strict=True))]
            keys = [key for _, key in pairs]
            follows = (
                run_keys is not None
                and all(k[0] == "row" for k in keys)
                and all(
                    p[0] == "row" and k[1] == p[1] and k[2] == p[2] + (tid - run_start)
                    for k, p in zip(keys, run_keys, strict=True)
                )
            )
            if follows:
                continue
            if run_sources is not None:
                segments.append(Segment(run_start * self.width, (tid - run_start) * self.width, run_sources))
            run_start, run_sources = tid, tuple(s for s, _ in pairs)
            run_keys = keys if all(k[0] == "row" for k in keys) else None
        if run_sources is not None:
            segments.append(Segment(run_start * self.width, (self.n - run_start) * self.width, run_sources))
        return tuple(segments)


def _token_config(token: Any, cfg: Any, index: Callable[[str], int]) -> tuple[_TokenConfig | None, bool]:
    where = f"tokenizer.tokens[{token!r}]"
    if not isinstance(cfg, dict) or set(cfg) - _TOKEN_KEYS:
        raise RecipeError(f"{where} must be a mapping with `source` and `force`")
    force = cfg.get("force", False)
    if not isinstance(force, bool):
        raise RecipeError(f"{where}.force must be true or false")
    src = cfg.get("source")
    if src is None:
        return None, force
    if isinstance(src, str):
        return _TokenConfig("model", index(src)), force
    if isinstance(src, dict) and src.get("kind") == "zero" and set(src) == {"kind"}:
        return _TokenConfig("zero"), force
    if isinstance(src, dict) and src.get("kind") == "model_token" and isinstance(src.get("model"), str):
        bad = set(src) - {"kind", "model", "token_id", "token"}
        has_id, has_tok = src.get("token_id") is not None, src.get("token") is not None
        if bad or has_id == has_tok:
            raise RecipeError(f"{where}.source of kind model_token needs `model` and one of `token_id`, `token`")
        if has_id and type(src["token_id"]) is not int:
            raise RecipeError(f"{where}.source.token_id must be an integer")
        return _TokenConfig("model_token", index(src["model"]), src.get("token_id"), src.get("token")), force
    raise RecipeError(f"{where}.source must be a model, {{kind: zero}} or {{kind: model_token, ...}}")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise RecipeError(
            "tokenizer_source, tokenizer and chat_template need transformers",
            hint="pip install 'lazymerge[tokenizer]'",
        ) from None
    transformers.logging.set_verbosity_error()
    return transformers


def _load(ckpt: Checkpoint, strip: bool = False) -> Any:
    """The checkpoint's tokenizer, loaded by transformers from a copy of its tokenizer files."""
    transformers = _transformers()
    with tempfile.TemporaryDirectory() as tmp:
        for name in (*TOKENIZER_FILES, "config.json", "chat_template.jinja", "chat_template.json"):
            path = ckpt.side_file(name)
            if path is not None:
                shutil.copyfile(path, Path(tmp) / name)
        try:
            tok = transformers.AutoTokenizer.from_pretrained(tmp, use_fast=True)
        except Exception as exc:  # transformers raises many kinds; the message says which file
            raise RecipeError(f"{ckpt.label}: its tokenizer cannot be loaded ({str(exc)[:200]})") from None
    if strip:
        size = _vocab_size(ckpt) or len(tok.get_vocab())
        if any(i >= size for i in tok.get_vocab().values()):
            raise RecipeError(
                f"{ckpt.label}: its tokenizer has ids past the embedding's {size} rows",
                hint="a base tokenizer with unused tokens is not supported; use another base_model",
            )
    return tok


def _vocab_size(ckpt: Checkpoint) -> int | None:
    size = (ckpt.read_json("config.json") or {}).get("vocab_size")
    return size if isinstance(size, int) else None


def _union(base_tok: Any, tokenizers: dict[int, Any], checkpoints: list[Checkpoint]) -> Any:
    """mergekit's build_union_tokenizer: the base tokenizer plus every model's other tokens."""
    transformers = _transformers()
    out_added: dict[str, Any] = {}
    out_vocab: dict[str, int] = {}
    for i, tok in tokenizers.items():
        size = _vocab_size(checkpoints[i]) or tok.vocab_size
        added = tok.added_tokens_decoder
        added_text = {info.content for info in added.values()}
        for t, idx in tok.get_vocab().items():
            if idx >= size or t in added_text:
                continue
            out_vocab.setdefault(t, len(out_vocab))
        for idx, info in added.items():
            if idx < size and info.content not in out_added:
                out_added[info.content] = info
    with tempfile.TemporaryDirectory() as tmp:
        base_tok.save_pretrained(tmp, legacy_format=False, safe_serialization=True)
        res = transformers.AutoTokenizer.from_pretrained(tmp, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res


def resolve_chat_template(template: str, models: list[Checkpoint]) -> str | None:
    """mergekit's `chat_template`: `auto` (the most common template of the inputs), a template name
    (mergekit's bundled chatml, llama3, mistral, alpaca, exaone: read from mergekit), or Jinja."""
    if template == "auto":
        found = []
        for ckpt in models:
            tmpl = _load(ckpt).chat_template
            if isinstance(tmpl, dict):
                tmpl = tmpl.get("default")
            if tmpl:
                found.append(tmpl.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if len(template) < 256 and "\n" not in template and "{" not in template:
        try:
            from importlib.resources import files

            path = files("mergekit._data.chat_templates").joinpath(template + ".jinja")
            if path.is_file():
                return path.read_text()
        except ImportError:
            raise RecipeError(
                f"chat_template {template!r} names one of mergekit's templates",
                hint="pip install mergekit, or give the Jinja template itself",
            ) from None
    if len(template) < 20 or "{" not in template:
        raise RecipeError(
            f"chat_template {template[:40]!r} is neither `auto`, a known template name nor a Jinja template",
            hint="use auto, chatml, llama3, mistral, alpaca, exaone, or the Jinja string",
        )
    return template
