"""Caption metrics: table readers, BLEU/CIDEr/exact match, missing predictions."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from v2t_engine.errors import RowError, TableError
from v2t_engine.errors import MissingDependencyError
from v2t_engine.jobs.metrics import (caption_metrics, format_metrics,
                                read_predictions, read_references)

needs_eval = pytest.mark.skipif(
    not (importlib.util.find_spec("sacrebleu") and importlib.util.find_spec("pycocoevalcap")),
    reason="needs the eval extras: pip install 'v2t[eval]'")

REFS = {
    "v1": ["一个红色的圆形从左向右移动"],
    "v2": ["一个蓝色的正方形向上移动"],
    "v3": ["一个黄色的星形逐渐变大", "一个黄色的星形慢慢变大"],
    "v4": ["一个绿色的三角形保持不动"],
}


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


@needs_eval
def test_perfect_predictions() -> None:
    preds = {k: v[0] for k, v in REFS.items()}
    m = caption_metrics(preds, REFS)
    assert m["exact_match"] == 1.0
    assert m["bleu4"] == pytest.approx(100.0)
    assert m["cider_d"] > 0
    assert m["n_missing"] == 0 and m["missing"] == [] and m["n_predictions"] == 4
    assert "BLEU-4" in format_metrics(m) and "100.0%" in format_metrics(m)


@needs_eval
def test_partial_predictions_match_sacrebleu() -> None:
    import sacrebleu

    preds = {"v1": "一个红色的圆形从左向右移动", "v2": "一个蓝色的正方形向下移动",
             "v3": "一个黄色的星形 慢慢变大", "v4": "一个紫色的星形"}
    m = caption_metrics(preds, REFS)
    assert m["exact_match"] == 0.5  # v1 and v3 (second reference, whitespace ignored)
    hyps = [preds[k] for k in sorted(REFS)]
    streams = [[REFS[k][0] for k in sorted(REFS)], [None, None, REFS["v3"][1], None]]
    assert m["bleu4"] == pytest.approx(sacrebleu.corpus_bleu(hyps, streams, tokenize="zh").score)
    assert 0 < m["bleu4"] < 100
    perfect = caption_metrics({k: v[0] for k, v in REFS.items()}, REFS)
    assert 0 < m["cider_d"] < perfect["cider_d"]


@needs_eval
def test_missing_predictions_are_counted_and_wrong() -> None:
    preds = {"v1": REFS["v1"][0], "v2": REFS["v2"][0], "other": "无关"}
    m = caption_metrics(preds, REFS)
    assert m["missing"] == ["v3", "v4"] and m["n_missing"] == 2
    assert m["exact_match"] == 0.5 and m["n_extra"] == 1 and m["n_predictions"] == 3
    assert m["bleu4"] < 100
    assert "v3, v4" in format_metrics(m)


def test_read_predictions_formats(tmp_path: Path) -> None:
    text = (
        'v1\t["一个红色的圆形", "第二个"]\n'            # v2t: JSON array, first candidate
        "v2\t['一个蓝色的正方形', 'x']\n"               # EasyNLP: Python repr of a list
        "v3\t一个黄色的星形\n"                           # plain string
        "\n"
        "v4\t[]\tappended\n"                             # empty list; extra columns ignored
    )
    preds = read_predictions(_write(tmp_path / "p.txt", text))
    assert preds == {"v1": "一个红色的圆形", "v2": "一个蓝色的正方形", "v3": "一个黄色的星形", "v4": ""}


def test_malformed_prediction_lines_name_the_line(tmp_path: Path) -> None:
    p = _write(tmp_path / "p.txt", "v1\t['ok']\nv2 no tab here\n")
    with pytest.raises(RowError, match="line 2") as e:
        read_predictions(p)
    assert e.value.line_no == 2
    p = _write(tmp_path / "q.txt", "v1\t['ok']\nv2\t['unclosed\n")
    with pytest.raises(RowError, match=r"line 2 \(idx 'v2'\)"):
        read_predictions(p)
    p = _write(tmp_path / "r.txt", "v1\t[1, 2]\n")
    with pytest.raises(RowError, match="list of strings"):
        read_predictions(p)
    p = _write(tmp_path / "s.txt", "v1\ta\nv1\tb\n")
    with pytest.raises(RowError, match="duplicate"):
        read_predictions(p)
    with pytest.raises(TableError, match="does not exist"):
        read_predictions(tmp_path / "none.txt")


def test_read_references_bom_crlf_and_multiple(tmp_path: Path) -> None:
    p = _write(tmp_path / "refs.txt", "\ufeffv1\t红色\r\nv1\t红的\r\nv2\t蓝色\r\n")
    assert read_references(p) == {"v1": ["红色", "红的"], "v2": ["蓝色"]}
    table = _write(tmp_path / "val.txt", 'v1\t["AAAA"]\t一个红色的圆形\n')
    assert read_references(table) == {"v1": ["一个红色的圆形"]}
    with pytest.raises(RowError, match="line 1"):
        read_references(_write(tmp_path / "bad.txt", "v1 红色\n"))


def test_missing_eval_extras_tell_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # makes `import sacrebleu` fail
    with pytest.raises(MissingDependencyError, match=r"v2t\[eval\]"):
        caption_metrics({"v1": "x"}, {"v1": ["x"]})
