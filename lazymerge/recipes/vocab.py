"""Token identity from tokenizer files, the union vocabulary, and adding tokens to a tokenizer.

Torch-free and tokenizers-free: we read `tokenizer.json`, `tokenizer.model` (sentencepiece
protobuf), `vocab.json` and `added_tokens.json` directly, because the plan needs only the
token <-> id tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lazymerge.errors import CheckpointError, VocabularyError
from lazymerge.io.checkpoint import Checkpoint

__all__ = ["RowRun", "add_tokens", "load_vocab", "union_rows"]


def load_vocab(ckpt: Checkpoint) -> dict[str, int] | None:
    """token -> id from the checkpoint's tokenizer files, or None when it ships none."""
    vocab: dict[str, int] | None = None
    tok = ckpt.read_json("tokenizer.json")
    if tok is not None:
        vocab = _vocab_from_tokenizer_json(ckpt, tok)
    elif (sp := ckpt.side_file("tokenizer.model")) is not None:
        vocab = {piece: i for i, piece in enumerate(_sentencepiece_pieces(ckpt, sp.read_bytes()))}
    elif (vj := ckpt.read_json("vocab.json")) is not None:
        vocab = {str(k): _token_id(ckpt, "vocab.json", v) for k, v in vj.items()}
    if vocab is None:
        return None
    added = ckpt.read_json("added_tokens.json") or {}
    for token, idx in added.items():
        vocab[token] = _token_id(ckpt, "added_tokens.json", idx)
    return vocab


def _vocab_from_tokenizer_json(ckpt: Checkpoint, tok: dict) -> dict[str, int]:
    model = tok.get("model")
    raw = model.get("vocab") if isinstance(model, dict) else None
    vocab: dict[str, int] = {}
    if isinstance(raw, dict):
        vocab = {token: _token_id(ckpt, "tokenizer.json", idx) for token, idx in raw.items()}
    elif isinstance(raw, list):  # Unigram: [[piece, score], ...], id = position
        for i, entry in enumerate(raw):
            if not (isinstance(entry, list) and entry and isinstance(entry[0], str)):
                raise _malformed(ckpt, "tokenizer.json", f"model.vocab[{i}] is not a [piece, score] pair")
            vocab[entry[0]] = i
    else:
        raise _malformed(ckpt, "tokenizer.json", "it has no model.vocab mapping or list")
    added = tok.get("added_tokens") or []
    if not isinstance(added, list):
        raise _malformed(ckpt, "tokenizer.json", "added_tokens is not a list")
    for entry in added:
        if not (isinstance(entry, dict) and isinstance(entry.get("content"), str)):
            raise _malformed(ckpt, "tokenizer.json", "an added_tokens entry has no content string")
        vocab[entry["content"]] = _token_id(ckpt, "tokenizer.json", entry.get("id"))
    return vocab


def _token_id(ckpt: Checkpoint, file: str, value: object) -> int:
    # bool is an int subclass and int(1.5) is 1: an id must be a JSON integer.
    if type(value) is not int or value < 0:
        raise _malformed(ckpt, file, f"a token id is {str(value)[:40]!r}, not a non-negative integer")
    return value


def _mapping(ckpt: Checkpoint, file: str, value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise _malformed(ckpt, file, f"{what} is not a JSON object")
    return value


def _malformed(ckpt: Checkpoint, file: str, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{ckpt.label}: {file} is malformed: {problem}",
        hint="the tokenizer files are damaged; download the model again",
    )


def _sentencepiece_pieces(ckpt: Checkpoint, data: bytes) -> list[str]:
    # ModelProto field 1 is `repeated SentencePiece pieces`; SentencePiece field 1 is `piece`.
    pieces: list[str] = []
    try:
        for field_no, value in _proto_fields(data):
            if field_no == 1 and isinstance(value, bytes):
                piece = next((v for f, v in _proto_fields(value) if f == 1 and isinstance(v, bytes)), b"")
                pieces.append(piece.decode("utf-8"))
    except (IndexError, ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{ckpt.label}: tokenizer.model is not a sentencepiece model") from None
    return pieces


def _proto_fields(data: bytes):
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field_no, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated field")
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield field_no, value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


@dataclass(frozen=True)
class RowRun:
    """Output rows [start, start + count) come from `sources` ("rm", "sft" or both).

    The RM rows read are the output rows; the SFT rows start at `sft_start` (default `start`):
    an appended SFT-only token's row sits at another id in the SFT model."""

    start: int
    count: int
    sources: tuple[str, ...]
    sft_start: int | None = None

    @property
    def sft_row(self) -> int:
        return self.start if self.sft_start is None else self.sft_start


def union_rows(
    rm_vocab: dict[str, int] | None,
    sft_vocab: dict[str, int] | None,
    rm_rows: int,
    sft_rows: int,
) -> tuple[list[RowRun], list[tuple[int, str]]]:
    """Decide, row by row, which model(s) each row of the union embedding comes from.

    The union is keyed by token string. A token both tokenizers know must have the same id in
    both (else VocabularyError) and its row is averaged; a token only the RM knows keeps the
    RM's row. A token only the SFT knows keeps its SFT id when the RM leaves that id free, and
    is otherwise (the RM has another token there) appended after the last row, in SFT id
    order, with its SFT row. Rows past both tokenizers (padding rows) follow row i = token i.
    Without both tokenizers, row i is token i throughout.

    Returns:
        The row runs, and the (output id, token) pairs only the SFT model has (to add to the
        tokenizer).
    """
    n = max(rm_rows, sft_rows)
    rows: list[tuple[tuple[str, ...], int]] = []  # per output row: (sources, SFT row)
    sft_only: list[tuple[int, str]] = []
    if rm_vocab is not None and sft_vocab is not None:
        # In id order, so the error names the first conflict, the same one on every run.
        for token in sorted(rm_vocab.keys() & sft_vocab.keys(), key=rm_vocab.__getitem__):
            if rm_vocab[token] != sft_vocab[token]:
                raise VocabularyError(
                    f"token {token!r} has id {rm_vocab[token]} in the reward model but "
                    f"{sft_vocab[token]} in the domain model"
                )
        rm_ids = {i: t for t, i in rm_vocab.items()}
        sft_ids = {i: t for t, i in sft_vocab.items()}
        for ids, count, who in ((rm_ids, rm_rows, "reward"), (sft_ids, sft_rows, "domain")):
            beyond = [i for i in ids if i >= count or i < 0]
            if beyond:
                raise VocabularyError(
                    f"the {who} model's tokenizer has id {max(beyond)} but its embedding has {count} rows"
                )
        appended: list[tuple[int, str]] = []
        for i in range(n):
            t_rm, t_sft = rm_ids.get(i), sft_ids.get(i)
            if t_rm is not None and t_sft is not None and t_rm != t_sft:
                rows.append((("rm",), i))  # the SFT token moves after the last row
                appended.append((i, t_sft))
            elif t_rm is None and t_sft is not None:
                rows.append((("sft",), i))
                sft_only.append((i, t_sft))
            elif t_rm is not None and t_sft is None:
                rows.append((("rm",), i))
            else:
                rows.append((_by_row(i, rm_rows, sft_rows), i))
        for sft_id, token in appended:
            sft_only.append((len(rows), token))
            rows.append((("sft",), sft_id))
    else:
        rows = [(_by_row(i, rm_rows, sft_rows), i) for i in range(n)]
    runs: list[RowRun] = []
    for i, (who, sft_row) in enumerate(rows):
        last = runs[-1] if runs else None
        if last is not None and last.sources == who and last.sft_row + last.count == sft_row:
            runs[-1] = RowRun(last.start, last.count + 1, who, last.sft_start)
        else:
            runs.append(RowRun(i, 1, who, None if sft_row == i else sft_row))
    return runs, sft_only


def _by_row(i: int, rm_rows: int, sft_rows: int) -> tuple[str, ...]:
    return tuple(w for w, rows in (("rm", rm_rows), ("sft", sft_rows)) if i < rows)


def add_tokens(rm: Checkpoint, sft: Checkpoint, tokens: list[tuple[int, str]]) -> dict[str, bytes]:
    """The reward model's tokenizer files with the SFT-only `tokens` added (output ids, SFT flags).

    Updates tokenizer.json's `added_tokens`, tokenizer_config.json's `added_tokens_decoder` and
    added_tokens.json (whichever the reward model ships; added_tokens.json is created for a
    sentencepiece-only tokenizer). Special-token roles (pad, eos...) stay the reward model's.
    """
    from lazymerge.constants import TOKENIZER_FILES

    files = {name: p.read_bytes() for name in TOKENIZER_FILES if (p := rm.side_file(name)) is not None}
    if not tokens:
        return files
    sft_added = (sft.read_json("tokenizer.json") or {}).get("added_tokens") or []
    sft_entries = {e.get("content"): e for e in sft_added if isinstance(e, dict)}
    sft_config = sft.read_json("tokenizer_config.json") or {}
    decoder = sft_config.get("added_tokens_decoder")
    sft_decoder = {} if decoder is None else _mapping(sft, "tokenizer_config.json", decoder, "added_tokens_decoder")

    sft_by_content = {
        _mapping(sft, "tokenizer_config.json", e, f"added_tokens_decoder[{k}]").get("content"): e
        for k, e in sft_decoder.items()
    }

    def entry_for(idx: int, token: str) -> dict:
        # By token string: an appended token has another id in the SFT tokenizer than in the output.
        base = sft_by_content.get(token) or sft_entries.get(token) or {}
        base = _mapping(sft, "tokenizer_config.json", base, f"added_tokens_decoder entry {token!r}")
        return {
            "content": token,
            "lstrip": bool(base.get("lstrip", False)),
            "normalized": bool(base.get("normalized", False)),
            "rstrip": bool(base.get("rstrip", False)),
            "single_word": bool(base.get("single_word", False)),
            "special": bool(base.get("special", True)),
        }

    if "tokenizer.json" in files:
        tok = _mapping(rm, "tokenizer.json", rm.read_json("tokenizer.json"), "the file")
        added = tok.setdefault("added_tokens", [])
        if not isinstance(added, list):
            raise _malformed(rm, "tokenizer.json", "added_tokens is not a list")
        for idx, token in tokens:
            added.append({"id": idx, **entry_for(idx, token)})
        files["tokenizer.json"] = _dump(tok)
    if "tokenizer_config.json" in files:
        cfg = _mapping(rm, "tokenizer_config.json", rm.read_json("tokenizer_config.json"), "the file")
        if cfg.get("added_tokens_decoder") is None:
            cfg["added_tokens_decoder"] = {}
        rm_decoder = _mapping(rm, "tokenizer_config.json", cfg["added_tokens_decoder"], "added_tokens_decoder")
        for idx, token in tokens:
            rm_decoder[str(idx)] = entry_for(idx, token)
        files["tokenizer_config.json"] = _dump(cfg)
    if "added_tokens.json" in files or "tokenizer.model" in files:
        extra = _mapping(rm, "added_tokens.json", rm.read_json("added_tokens.json") or {}, "the file")
        extra.update({token: idx for idx, token in tokens})
        files["added_tokens.json"] = _dump(extra)
    return files


def _dump(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
