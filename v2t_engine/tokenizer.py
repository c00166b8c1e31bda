"""Caption tokenizer: a BERT-style WordPiece tokenizer on the `tokenizers` library.

EasyNLP (EASYNLP.md §5) uses bert-base-chinese with `[PAD]` as both the end token and the padding
token: captions are encoded without [CLS]/[SEP], cut to `text_len`, padded with [PAD]; decoding
stops at the first [PAD]. This module reproduces that contract for any BERT vocabulary the user
has (a `vocab.txt` or a `tokenizer.json`), and can train a small vocabulary from the captions
themselves when none is given. Training and inference share this one class.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import ClassVar, Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .errors import ArtifactError, ConfigError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK)  # trained vocabularies: [PAD] is id 0
PREFIX = "##"  # WordPiece continuation marker
# How `decode` writes a caption: "v2t" (join_tokens) or "easynlp" (easynlp_join, EasyNLP's text).
DECODE_STYLES: tuple[str, ...] = ("v2t", "easynlp")


def is_cjk(ch: str) -> bool:
    """True for CJK ideographs (BERT's `_is_chinese_char` ranges) and CJK/full-width punctuation.

    These are the characters that BERT tokenizes one by one and that Chinese text writes without
    spaces, so the decoder removes any space next to them.
    """
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F
        or 0x3000 <= cp <= 0x303F  # CJK symbols and punctuation: 。、「」《》…
        or 0xFF00 <= cp <= 0xFFEF  # full-width forms: ，！？（）：；
        or 0x2010 <= cp <= 0x2027  # dashes, curly quotes, ellipsis used in Chinese text
    )


# ASCII punctuation that attaches to the previous / next word when joining tokens.
_NO_SPACE_BEFORE = set(".,!?;:%)]}")
_NO_SPACE_AFTER = set("([{")


def join_tokens(tokens: Sequence[str]) -> str:
    """Join WordPiece tokens into text.

    `##` pieces attach to the previous token; no space is put next to a CJK character or CJK
    punctuation; Latin words stay separated by single spaces. (EasyNLP removes *every* space from
    the decoded text, which glues English words together; we keep spaces between Latin words.)
    """
    out: list[str] = []
    for tok in tokens:
        if tok.startswith(PREFIX) and len(tok) > len(PREFIX):
            out.append(tok[len(PREFIX):])  # a continuation piece: glue, even at the start
            continue
        if out:
            prev, first = out[-1][-1], tok[0]
            glue = (is_cjk(prev) or is_cjk(first) or first in _NO_SPACE_BEFORE
                    or prev in _NO_SPACE_AFTER)
            if not glue:
                out.append(" ")
        out.append(tok)
    return "".join(out)


def easynlp_join(tokens: Sequence[str]) -> str:
    """Join tokens as EasyNLP's captions are written (ImageTextBERTTokenizer.decode over its
    BertTokenizer): tokens joined with single spaces, every " ##" removed (so a leading `##piece`
    keeps its `##`), then every whitespace character removed. BERT's clean-up step between the
    two only deletes spaces, so it changes nothing here."""
    return "".join(" ".join(tokens).replace(" " + PREFIX, "").split())


class CaptionTokenizer:
    """WordPiece tokenizer with EasyNLP's caption conventions ([PAD] = end = padding)."""

    files: ClassVar[tuple[str, ...]] = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")

    def __init__(self, tokenizer: Tokenizer):
        # A tokenizer.json written by transformers may carry truncation/padding settings and a
        # [CLS]/[SEP] post-processor; we do our own cutting and padding and never add specials.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        if PAD not in vocab:
            raise ArtifactError(f"the vocabulary has no {PAD} token, which v2t uses as end and padding token")
        self.pad_id: int = vocab[PAD]
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        added_special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        self._special_ids: frozenset[int] = frozenset(
            vocab[t] for t in set(SPECIAL_TOKENS) | added_special if t in vocab)
        self.decode_style = DECODE_STYLES[0]  # what `decode` does when given no style

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dir(cls, path: str | Path) -> "CaptionTokenizer":
        """Load a BERT vocabulary: a directory holding `tokenizer.json` (preferred) or `vocab.txt`,
        or a direct path to either file. `tokenizer_config.json` next to a vocab.txt may set
        `do_lower_case` (default True, as bert-base-chinese)."""
        p = Path(path)
        if p.is_dir():
            candidates = [p / "tokenizer.json", p / "vocab.txt"]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise ArtifactError(f"no tokenizer in {p}: expected tokenizer.json or vocab.txt (a BERT vocabulary)")
            p = found
        elif not p.is_file():
            raise ArtifactError(f"tokenizer path {p} does not exist")
        try:
            if p.suffix == ".json":
                return cls(Tokenizer.from_file(str(p)))
            return cls(cls._from_vocab_txt(p))
        except ArtifactError:
            raise
        except Exception as e:  # tokenizers raises plain Exception subclasses on bad files
            raise ArtifactError(f"cannot load tokenizer from {p}: {e}") from e

    @staticmethod
    def _from_vocab_txt(vocab_file: Path) -> Tokenizer:
        """Build the BERT pipeline around a one-token-per-line vocab.txt (line number = id)."""
        # Split on "\n" only (as BERT's load_vocab does): str.splitlines would also split on
        # characters such as U+0085 that may themselves be tokens.
        lines = vocab_file.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        vocab: dict[str, int] = {}
        for i, tok in enumerate(lines):
            if tok and tok not in vocab:  # the first of duplicate tokens keeps its id
                vocab[tok] = i
        if not vocab:
            raise ArtifactError(f"{vocab_file} is empty")
        lower = True
        config = vocab_file.parent / "tokenizer_config.json"
        if config.is_file():
            try:
                lower = bool(json.loads(config.read_text(encoding="utf-8")).get("do_lower_case", True))
            except json.JSONDecodeError as e:
                raise ArtifactError(f"{config} is not valid JSON: {e}") from e
        return _bert_pipeline(vocab, lowercase=lower)

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int = 8000) -> "CaptionTokenizer":
        """Train a WordPiece vocabulary on captions (used when the user gives no vocabulary).

        Case is preserved and accents kept so captions round-trip exactly; each CJK character is
        its own token; every character seen (and, for non-CJK characters, its `##` continuation
        form) is in the vocabulary even if that exceeds `vocab_size`, so no seen text maps to [UNK].
        """
        tok = _bert_pipeline(None, lowercase=False)
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
        tok.train_from_iterator(captions, trainer=trainer)
        vocab = tok.get_vocab(with_added_tokens=False)
        if len(vocab) <= len(SPECIAL_TOKENS):
            raise ArtifactError("cannot train a tokenizer: no caption text was given")
        # The trainer only adds `##c` for characters it saw inside a word; add the rest so that
        # e.g. "13" encodes even if only "12" was seen (WordPiece maps a whole word to [UNK]
        # when any piece is missing).
        for ch in [t for t in vocab if len(t) == 1 and not is_cjk(t)]:
            vocab.setdefault(PREFIX + ch, len(vocab))
        tok.model = models.WordPiece(vocab=vocab, unk_token=UNK)
        return cls(tok)

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str, text_len: int) -> list[int]:
        """Token ids without [CLS]/[SEP], cut to `text_len` and padded with [PAD] to exactly it."""
        _check_len(text_len)
        ids = self._tok.encode(text, add_special_tokens=False).ids[:text_len]
        return ids + [self.pad_id] * (text_len - len(ids))

    def encode_batch(self, texts: Sequence[str], text_len: int) -> np.ndarray:
        """[N, text_len] int64 array of `encode` rows."""
        _check_len(text_len)
        out = np.full((len(texts), text_len), self.pad_id, dtype=np.int64)
        for row, enc in zip(out, self._tok.encode_batch(list(texts), add_special_tokens=False)):
            ids = enc.ids[:text_len]
            row[: len(ids)] = ids
        return out

    def decode(self, ids: Iterable[int], style: str | None = None) -> str:
        """Text of a generated id sequence, which stops at the first [PAD]; `style` (default: this
        tokenizer's `decode_style`) is one of DECODE_STYLES:

        - "v2t": drops other special tokens and ids outside the vocabulary, joins `##` pieces, and
          writes no space next to CJK characters or CJK punctuation but one between Latin words
          ("一个LED灯", "a red LED"; EasyNLP would write "aredled").
        - "easynlp": EasyNLP's caption text, character for character: [CLS], [SEP], [UNK], [MASK]
          and [unusedN] stay as written, an id outside the vocabulary reads [UNK] (its
          ids_to_tokens fallback), and the tokens are joined by `easynlp_join`.
        """
        easynlp = self._style(style) == "easynlp"
        tokens: list[str] = []
        for i in ids:
            i = int(i)
            if i == self.pad_id:
                break
            if i in self._special_ids and not easynlp:
                continue
            tok = self._tok.id_to_token(i)
            if tok is None and easynlp:
                tok = UNK
            if tok is not None:  # v2t drops ids outside the vocabulary (a bigger model head)
                tokens.append(tok)
        return easynlp_join(tokens) if easynlp else join_tokens(tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], style: str | None = None) -> list[str]:
        return [self.decode(ids, style) for ids in batch]

    def with_decode_style(self, style: str) -> "CaptionTokenizer":
        """A copy (sharing the vocabulary) whose `decode` defaults to `style`: hand it to a
        Captioner to get EasyNLP's caption text everywhere that Captioner decodes."""
        other = copy.copy(self)
        other.decode_style = self._style(style)
        return other

    def _style(self, style: str | None) -> str:
        style = self.decode_style if style is None else style
        if style not in DECODE_STYLES:
            raise ConfigError(f"decode style must be one of {', '.join(DECODE_STYLES)}, got {style!r}")
        return style

    def tokens(self, text: str) -> list[str]:
        """WordPiece tokens of `text` (for inspection and tests)."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    # ---------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> Path:
        """Write `files` into `directory`: tokenizer.json (the full pipeline, what `from_dir`
        prefers), vocab.txt (ids in order, what EasyNLP checkpoints carry) and
        tokenizer_config.json (do_lower_case, so a vocab.txt-only reader normalizes the same)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(d / "tokenizer.json"))
        tokens = [self._tok.id_to_token(i) for i in range(self.vocab_size)]
        if any(t is None for t in tokens):
            raise ArtifactError("the vocabulary has gaps in its ids; cannot write vocab.txt")
        (d / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
        norm = json.loads(self._tok.to_str()).get("normalizer") or {}
        config = {"do_lower_case": bool(norm.get("lowercase", False)), "pad_token": PAD,
                  "unk_token": UNK, "tokenize_chinese_chars": True}
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return d


def _check_len(text_len: int) -> None:
    if text_len < 1:
        raise ConfigError(f"text_len must be at least 1, got {text_len}")


def _bert_pipeline(vocab: dict[str, int] | None, *, lowercase: bool) -> Tokenizer:
    """The bert-base-chinese pipeline: BertNormalizer (CJK chars split apart), BertPreTokenizer,
    WordPiece. Accents are stripped only when lower-casing, as BERT does."""
    model = models.WordPiece(vocab=vocab, unk_token=UNK) if vocab else models.WordPiece(unk_token=UNK)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None if lowercase else False,
        lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # Stored for other readers of tokenizer.json; `decode` joins tokens itself (join_tokens)
    # because this decoder puts spaces between CJK characters.
    tok.decoder = decoders.WordPiece(prefix=PREFIX, cleanup=False)
    if vocab:
        # Mark the specials present as special, as transformers does, so they never split.
        tok.add_special_tokens([t for t in SPECIAL_TOKENS if t in vocab])
    return tok
