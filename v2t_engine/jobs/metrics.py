"""Caption metrics for a predictions table against reference captions.

- BLEU-4: sacrebleu `corpus_bleu(tokenize="zh")` (each CJK character a token), 0-100 scale.
- CIDEr-D: pycocoevalcap's `Cider` on character tokens (whitespace removed, characters joined by
  spaces), on its usual scale (0-10; papers often print it x100). Its IDF comes from the evaluated
  set, so a single-video corpus scores 0.
- Exact match: the prediction equals any reference once all whitespace is removed.
A reference idx without a prediction counts as wrong for exact match and as an empty string for
BLEU/CIDEr; it is reported. Predictions for idx not in the references are ignored and counted.
sacrebleu and pycocoevalcap are optional (`pip install 'v2t[eval]'`) and imported lazily.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Iterator

from ..errors import RowError, TableError, import_optional

EVAL_INSTALL = "pip install 'v2t[eval]'"


def _lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 table, tolerating a BOM and CRLF; blank lines skipped."""
    p = Path(path)
    if not p.is_file():
        raise TableError(f"{p} does not exist")
    with open(p, encoding="utf-8-sig") as f:  # universal newlines turn CRLF into "\n"
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield n, line


def _first_candidate(field: str) -> str:
    """gen_text as v2t writes it (a JSON array of strings), as EasyNLP writes it (a Python repr of
    a list), or a plain string. Returns the first candidate; raises ValueError when malformed."""
    s = field.strip()
    if not s.startswith("["):
        return s
    try:
        value = json.loads(s)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(s)  # literals only: never runs code
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"gen_text starts with '[' but is neither a JSON nor a Python list: {s[:60]!r}") from e
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"gen_text must be a list of strings, got {s[:60]!r}")
    return value[0] if value else ""


def read_predictions(path: str | Path) -> dict[str, str]:
    """`idx \\t gen_text` rows -> {idx: first candidate}. A duplicate idx is an error."""
    out: dict[str, str] = {}
    for n, line in _lines(path):
        idx, sep, gen = line.partition("\t")
        if not sep:
            raise RowError(n, None, f"{path}: expected 'idx<TAB>gen_text', found no tab")
        try:
            text = _first_candidate(gen.split("\t")[0])  # extra (appended) columns are ignored
        except ValueError as e:
            raise RowError(n, idx, f"{path}: {e}") from e
        if idx in out:
            raise RowError(n, idx, f"{path}: duplicate idx")
        out[idx] = text
    return out


def read_references(path: str | Path) -> dict[str, list[str]]:
    """`idx \\t text` rows -> {idx: [texts]}; repeated idx lines add references. A table with more
    columns (a training table `idx, frames, text`) uses its last column."""
    out: dict[str, list[str]] = {}
    for n, line in _lines(path):
        fields = line.split("\t")
        if len(fields) < 2:
            raise RowError(n, None, f"{path}: expected 'idx<TAB>text', found no tab")
        out.setdefault(fields[0], []).append(fields[-1].strip())
    return out


def _squash(text: str) -> str:
    return "".join(text.split())


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """BLEU-4, CIDEr-D and exact match of `predictions` over the idx of `references`.

    Returns bleu4, cider_d, exact_match, n_references (videos scored), n_predictions (given),
    n_missing and missing (reference idx without a prediction), n_extra (predictions without
    references).
    """
    if not references:
        raise TableError("no references to score against")
    sacrebleu = import_optional("sacrebleu", "caption metrics", EVAL_INSTALL)
    Cider = import_optional("pycocoevalcap.cider.cider", "caption metrics", EVAL_INSTALL).Cider

    ids = sorted(references)
    missing = [i for i in ids if i not in predictions]
    hyps = [predictions.get(i, "").strip() for i in ids]
    refs = [list(references[i]) for i in ids]
    if any(not r for r in refs):
        raise TableError("every reference idx needs at least one reference text")

    # sacrebleu wants one stream per reference position; videos with fewer references get None.
    n_streams = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(n_streams)]
    bleu = sacrebleu.corpus_bleu(hyps, streams, tokenize="zh")

    # CIDEr-D on characters: pycocoevalcap splits on spaces, so space-separate the characters.
    def chars(t: str) -> str:
        return " ".join(_squash(t))
    cider, _ = Cider().compute_score({i: [chars(t) for t in refs[k]] for k, i in enumerate(ids)},
                                     {i: [chars(hyps[k])] for k, i in enumerate(ids)})

    missing_set = set(missing)
    exact = sum(i not in missing_set and _squash(h) in {_squash(t) for t in r}
                for i, h, r in zip(ids, hyps, refs))
    return {
        "bleu4": float(bleu.score),
        "cider_d": float(cider),
        "exact_match": exact / len(ids),
        "n_references": len(ids),
        "n_predictions": len(predictions),
        "n_missing": len(missing),
        "missing": missing,
        "n_extra": sum(1 for i in predictions if i not in references),
    }


def format_metrics(m: dict) -> str:
    """A short table for the terminal."""
    rows = [
        ("BLEU-4 (zh)", f"{m['bleu4']:.2f}"),
        ("CIDEr-D", f"{m['cider_d']:.3f}"),
        ("exact match", f"{100 * m['exact_match']:.1f}%"),
        ("videos scored", str(m["n_references"])),
        ("predictions", str(m["n_predictions"])),
        ("missing predictions", str(m["n_missing"])),
    ]
    if m.get("n_extra"):
        rows.append(("predictions without reference", str(m["n_extra"])))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if m.get("missing"):
        shown = ", ".join(m["missing"][:5]) + (" ..." if len(m["missing"]) > 5 else "")
        lines.append(f"missing idx: {shown}")
    return "\n".join(lines)
