"""CaptionTokenizer: EasyNLP's [PAD]-terminated caption encoding on a BERT WordPiece vocabulary."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from v2t_engine.errors import ArtifactError, ConfigError
from v2t_engine.tokenizer import CaptionTokenizer, easynlp_join, join_tokens

CAPTIONS = [
    "红色的圆形从左向右移动",
    "3个蓝色方块",
    "一个LED灯在闪烁",
    "一个绿色的三角形逐渐变大",
    "12个黄色的星形，向上移动。",
    "a red LED blinks",
]

# A hand-written bert-base-chinese style vocabulary: specials, CJK chars, English wordpieces.
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "红", "色", "的", "圆", "形",
              "，", "。", "the", "red", "led", "##s", "blink", "light", "##ing", "3", "个"]


@pytest.fixture(scope="module")
def trained() -> CaptionTokenizer:
    return CaptionTokenizer.train(CAPTIONS * 3, vocab_size=200)


@pytest.fixture()
def bert_dir(tmp_path: Path) -> Path:
    d = tmp_path / "bert"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    return d


def test_trained_round_trip_is_exact(trained: CaptionTokenizer) -> None:
    assert trained.pad_id == 0
    for text in CAPTIONS:
        ids = trained.encode(text, 32)
        assert trained.decode(ids) == text
    assert trained.tokens("一个LED灯")[:2] == ["一", "个"]  # each CJK char is its own token


def test_trained_vocab_covers_seen_characters(trained: CaptionTokenizer) -> None:
    unk = trained.encode("[UNK]", 1)[0]
    # "21" was never seen as a word, but both characters were: it must not become [UNK].
    ids = trained.encode("21个LED", 8)
    assert unk not in ids
    assert trained.decode(ids) == "21个LED"


def test_encode_pads_and_cuts(trained: CaptionTokenizer) -> None:
    ids = trained.encode("红色的圆形", 8)
    assert len(ids) == 8 and ids[5:] == [trained.pad_id] * 3
    cut = trained.encode("红色的圆形从左向右移动", 4)
    assert len(cut) == 4 and trained.decode(cut) == "红色的圆"
    batch = trained.encode_batch(["红色", "红色的圆形从左向右移动"], 6)
    assert batch.dtype == np.int64 and batch.shape == (2, 6)
    assert batch[0].tolist() == trained.encode("红色", 6)
    assert batch[1].tolist() == trained.encode("红色的圆形从左向右移动", 6)
    assert trained.encode("", 3) == [trained.pad_id] * 3


def test_decode_stops_at_first_pad_and_drops_specials(trained: CaptionTokenizer) -> None:
    red, circle = trained.encode("红色", 2), trained.encode("圆形", 2)
    cls = trained.encode("[CLS]", 1)
    ids = cls + red + [trained.pad_id] + circle
    assert trained.decode(ids) == "红色"
    assert trained.decode([trained.pad_id] + red) == ""
    assert trained.decode_batch([red, circle + [0, 0]]) == ["红色", "圆形"]
    assert trained.decode(np.array(red, dtype=np.int64)) == "红色"


def test_save_load_identical(trained: CaptionTokenizer, tmp_path: Path) -> None:
    out = trained.save(tmp_path / "tok")
    assert sorted(p.name for p in out.iterdir()) == sorted(CaptionTokenizer.files)
    again = CaptionTokenizer.from_dir(out)
    assert again.vocab_size == trained.vocab_size and again.pad_id == trained.pad_id
    texts = CAPTIONS + ["Red LED", "未见过的字"]
    assert (again.encode_batch(texts, 16) == trained.encode_batch(texts, 16)).all()
    # vocab.txt alone (an EasyNLP checkpoint's file) keeps ids and, via tokenizer_config.json, case.
    (out / "tokenizer.json").unlink()
    from_txt = CaptionTokenizer.from_dir(out)
    assert (from_txt.encode_batch(texts, 16) == trained.encode_batch(texts, 16)).all()
    lines = (out / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "[PAD]" and len(lines) - 1 == trained.vocab_size


def test_bert_vocab_txt_directory(bert_dir: Path) -> None:
    tok = CaptionTokenizer.from_dir(bert_dir)
    assert tok.vocab_size == len(BERT_VOCAB) and tok.pad_id == 0
    ids = tok.encode("The Red LEDs 红色的圆形", 10)
    assert tok.tokens("The Red LEDs 红色的圆形") == ["the", "red", "led", "##s", "红", "色", "的", "圆", "形"]
    assert tok.decode(ids) == "the red leds红色的圆形"
    assert tok.decode(tok.encode("红色的 圆形 ，3 个", 10)) == "红色的圆形，3个"
    assert tok.decode(tok.encode("blinking light", 10)) == "blinking light"
    assert tok.encode("紫", 2)[0] == BERT_VOCAB.index("[UNK]")
    # direct file path works too
    assert CaptionTokenizer.from_dir(bert_dir / "vocab.txt").encode("红色", 4) == tok.encode("红色", 4)


def test_bert_vocab_honours_do_lower_case(bert_dir: Path) -> None:
    (bert_dir / "tokenizer_config.json").write_text('{"do_lower_case": false}', encoding="utf-8")
    tok = CaptionTokenizer.from_dir(bert_dir)
    assert tok.tokens("Red red") == ["[UNK]", "red"]


def test_transformers_tokenizer_json_loads(bert_dir: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    # transformers 5 ignores vocab_file= (STACK-NOTES): pass vocab= explicitly.
    hf = transformers.BertTokenizerFast(vocab=str(bert_dir / "vocab.txt"))
    hf.save_pretrained(str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    tok = CaptionTokenizer.from_dir(tmp_path / "hf")
    text = "The Red LEDs 红色的圆形"
    expected = hf(text, add_special_tokens=False)["input_ids"]
    assert tok.encode(text, 12)[: len(expected)] == expected  # no [CLS]/[SEP] added
    assert tok.decode(tok.encode(text, 12)) == "the red leds红色的圆形"
    assert CaptionTokenizer.from_dir(tmp_path / "hf" / "tokenizer.json").vocab_size == len(BERT_VOCAB)


def test_missing_or_bad_vocabulary_is_an_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="tokenizer.json or vocab.txt"):
        CaptionTokenizer.from_dir(tmp_path)
    with pytest.raises(ArtifactError, match="does not exist"):
        CaptionTokenizer.from_dir(tmp_path / "nope")
    (tmp_path / "vocab.txt").write_text("[UNK]\n红\n", encoding="utf-8")
    with pytest.raises(ArtifactError, match=r"\[PAD\]"):
        CaptionTokenizer.from_dir(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ArtifactError, match="cannot load"):
        CaptionTokenizer.from_dir(bad)


def test_join_tokens_spacing() -> None:
    assert join_tokens(["一", "个", "LED", "灯"]) == "一个LED灯"
    assert join_tokens(["a", "red", "l", "##ed", ",", "ok", "。"]) == "a red led, ok。"
    assert join_tokens(["##ed", "x"]) == "ed x"


def test_easynlp_join() -> None:
    # EasyNLP's text: " ".join, " ##" removed, then every whitespace character removed.
    assert easynlp_join(["a", "red", "l", "##ed", "[SEP]", "灯"]) == "aredled[SEP]灯"
    assert easynlp_join(["##ed", "x", "[CLS]", "##s"]) == "##edx[CLS]s"
    assert easynlp_join([]) == ""


def test_decode_styles(bert_dir: Path) -> None:
    tok = CaptionTokenizer.from_dir(bert_dir)
    ids = [BERT_VOCAB.index(t) for t in ("the", "red", "led", "##s", "[SEP]", "红")] + [tok.pad_id, 5]
    assert tok.decode(ids) == tok.decode(ids, style="v2t") == "the red leds红"
    assert tok.decode(ids, style="easynlp") == "theredleds[SEP]红"
    easy = tok.with_decode_style("easynlp")  # a copy whose default is EasyNLP's text
    assert easy.decode(ids) == easy.decode_batch([ids])[0] == "theredleds[SEP]红"
    assert easy.decode(ids, style="v2t") == tok.decode(ids) == "the red leds红"  # the original keeps its style
    with pytest.raises(ConfigError, match="easynlp"):
        tok.decode(ids, style="EasyNLP")
    with pytest.raises(ConfigError, match="easynlp"):
        tok.with_decode_style("json")
