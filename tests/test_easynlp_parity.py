"""v2t against EasyNLP's video2text_generation where EasyNLP's behaviour is asked for: caption text
(CaptionTokenizer.decode style "easynlp"), the sampling distribution (search.token_probabilities)
and the predict output line (--output_format easynlp).

The references below are written from EasyNLP's source (alibaba/EasyNLP):
- appzoo/video2text_generation/model.py: `decode_to_text` cuts each row at the first end token
  ([PAD]); `generate` samples `logits[:, -1, :] / temperature`, `top_k_logits`, softmax,
  `torch.multinomial`, always with its defaults top_k=100, temperature=1.0.
- appzoo/video2text_generation/tokenizer.py: `ImageTextBERTTokenizer.decode` is
  `"".join(bert.decode(ids).split())`; unknown ids read as its unk token.
- modelzoo/models/bert/tokenization_bert.py (the slow BertTokenizer AutoTokenizer returns, since
  EasyNLP's use_fast defaults to False): `convert_tokens_to_string` joins with spaces and removes
  " ##"; the base class's decode (skip_special_tokens=False) then cleans up tokenization spaces.
- core/predictor.py: SimplePredictorManager writes `str(output_dict[col])` joined by tabs.
"""
import ast
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_SCHEMA, run_cli
from v2t_engine.errors import ConfigError
from v2t_engine.inputs.frames import FrameSource, row_frames_or_error
from v2t_engine.inputs.tables import InputSchema, read_table
from v2t_engine.jobs.predict import PredictOptions, format_gen_text
from v2t_engine.runtime.search import SearchOptions, select_tokens, token_probabilities
from v2t_engine.tokenizer import CaptionTokenizer

# bert-base-chinese's layout in small: [PAD] 0, [unusedN], then [UNK] [CLS] [SEP] [MASK].
VOCAB = ["[PAD]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "红", "色", "的", "圆", "形",
         "一", "个", "led", "##s", "a", "red", "blink", "##ing", "##色", "，", "。", "3", "'", ".", "x"]


# ------------------------------------------------------------------------------- caption text
def easynlp_caption(vocab: list[str], ids) -> str:
    """EasyNLP's caption of one generated row, step by step as its code runs."""
    ids = [int(i) for i in ids]
    end = vocab.index("[PAD]")  # end_token_id, looked up by its string
    if end in ids:
        ids = ids[:ids.index(end)]
    tokens = [vocab[i] if 0 <= i < len(vocab) else "[UNK]" for i in ids]  # ids_to_tokens.get
    text = " ".join(tokens).replace(" ##", "").strip()  # BertTokenizer.convert_tokens_to_string
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)  # clean_up_tokenization
    return "".join(text.split())  # ImageTextBERTTokenizer.decode


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> CaptionTokenizer:
    d = tmp_path_factory.mktemp("bert")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return CaptionTokenizer.from_dir(d)


def ids_of(*tokens: str) -> list[int]:
    return [VOCAB.index(t) for t in tokens]


@pytest.mark.parametrize("tokens, text", [
    (("红", "色", "的", "圆", "形"), "红色的圆形"),
    (("a", "red", "led", "##s", "blink", "##ing"), "aredledsblinking"),  # Latin words glued
    (("##s", "red"), "##sred"),  # a leading ## piece keeps its ##
    (("红", "##色", "x"), "红色x"),  # a ## piece in the middle glues
    (("[CLS]", "##色"), "[CLS]色"),  # ... to a special token too
    (("[SEP]", "红", "[MASK]", "[unused1]", "[UNK]", "[CLS]"), "[SEP]红[MASK][unused1][UNK][CLS]"),
    (("一", "个", "led", "[PAD]", "色"), "一个led"),  # cut at the first [PAD]
    (("[PAD]", "红"), ""),  # a first [PAD] gives an empty caption
    ((), ""),
    (("3", "个", "red", "，", "x", "'", "##s", ".", "。"), "3个red，x's.。"),
])
def test_decode_easynlp_matches_easynlp(bert, tokens, text):
    ids = ids_of(*tokens)
    assert easynlp_caption(VOCAB, ids) == text
    assert bert.decode(ids, style="easynlp") == text
    assert bert.decode(np.array(ids + [0, 0], np.int64), style="easynlp") == text


def test_decode_easynlp_reads_unknown_ids_as_unk(bert):
    ids = [VOCAB.index("红"), len(VOCAB) + 7, VOCAB.index("色")]
    assert bert.decode(ids, style="easynlp") == easynlp_caption(VOCAB, ids) == "红[UNK]色"
    assert bert.decode(ids) == "红色"  # v2t's own text drops them


@pytest.mark.parametrize("source", ["bert", "trained"])
def test_decode_easynlp_on_random_sequences(bert, source, tmp_path):
    if source == "bert":
        tok, vocab = bert, VOCAB
    else:
        tok = CaptionTokenizer.train(["红色的圆形从左向右移动", "a red LED blinks", "12个黄色的星形，向上移动。"] * 3,
                                     vocab_size=120)
        vocab = (tok.save(tmp_path / "tok") / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    rng = np.random.default_rng(0)
    for _ in range(500):
        ids = rng.integers(0, len(vocab) + 2, size=rng.integers(0, 12))  # pads, specials, unknown ids
        assert tok.decode(ids, style="easynlp") == easynlp_caption(vocab, ids), ids.tolist()


# ------------------------------------------------------------------------------- sampling
def easynlp_probabilities(logits: np.ndarray, top_k: int, temperature: float, dtype) -> np.ndarray:
    """One step of EasyNLP's `generate`, from its code, in torch. torch.topk raises for k > V, so
    EasyNLP itself cannot run there: the reference takes k = V (no filtering)."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    x = torch.tensor(logits, dtype=dtype)[:, None, :]  # (B, steps=1, V)
    x = x[:, -1, :] / temperature
    v, _ = torch.topk(x, min(top_k, x.shape[-1]))
    out = x.clone()
    out[out < v[..., [-1]]] = -float("Inf")  # top_k_logits
    return F.softmax(out, dim=-1).double().numpy()


def tied_logits() -> np.ndarray:
    """Rows whose k-th largest value (k = 5) is shared by tokens on both sides of position k."""
    row = np.full(40, -2.0)
    row[[7, 3]] = [6.0, 4.5]
    row[[1, 9, 17, 30, 33]] = 3.0  # ranks 3 to 7 tie: k = 5 keeps all five, 7 tokens in all
    return np.stack([row, row[::-1]]).astype(np.float32)


@pytest.mark.parametrize("case", ["normal", "ties", "k_over_vocab", "k_equals_vocab", "large", "temperature"])
def test_token_probabilities_are_easynlps(case):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    logits, k, t = (rng.normal(0, 3, (8, 300)).astype(np.float32), 100, 1.0)  # EasyNLP's top_k, temperature
    if case == "ties":
        logits, k = tied_logits(), 5
    elif case == "k_over_vocab":
        logits = logits[:, :60]
    elif case == "k_equals_vocab":
        logits = logits[:, :100]
    elif case == "large":
        logits = logits * 3000
    elif case == "temperature":
        t = 0.7
    ours = token_probabilities(logits, SearchOptions(do_sample=True, top_k=k, temperature=t))
    want = easynlp_probabilities(logits, k, t, torch.float64)
    assert np.allclose(ours, want, rtol=1e-12, atol=1e-15)
    assert ((ours > 0) == (want > 0)).all()  # the same tokens survive the filter
    # EasyNLP computes in float32: the same distribution to float32 precision.
    assert np.allclose(ours, easynlp_probabilities(logits, k, t, torch.float32), rtol=1e-5, atol=1e-7)
    if case == "ties":
        assert ((ours > 0).sum(axis=-1) == 7).all()
    if case == "k_over_vocab":
        assert (ours > 0).all()


def test_sampled_frequencies_follow_easynlps_distribution():
    """select_tokens (inverse-CDF) draws with the frequencies of EasyNLP's distribution: ties at
    the k-th value kept, filtered tokens never drawn."""
    torch = pytest.importorskip("torch")
    logits = tied_logits()[:1]
    logits[0, [2, 5]] = [5.0, 3.5]  # 9 tokens survive k = 5 now: 6.0 5.0 4.5 3.5 and five 3.0s
    opts = SearchOptions(do_sample=True, top_k=5)
    p = easynlp_probabilities(logits, 5, 1.0, torch.float64)[0]
    n, rng = 200_000, np.random.default_rng(2)
    counts = np.bincount(select_tokens(np.repeat(logits, n, axis=0), opts, rng), minlength=p.size)
    kept = p > 0
    assert kept.sum() == 9 and counts[~kept].sum() == 0
    expected = n * p[kept]
    chi2 = float((((counts[kept] - expected) ** 2) / expected).sum())
    df = kept.sum() - 1
    z = 5.0  # Wilson-Hilferty: the chi-square quantile at about 3e-7 upper tail
    limit = df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3
    assert chi2 < limit, f"chi-square {chi2:.1f} over {limit:.1f} ({df} degrees of freedom)"
    assert np.abs(counts / n - p).max() < 5 * np.sqrt(p * (1 - p) / n).max()


# ------------------------------------------------------------------------------- output line
@pytest.mark.parametrize("captions, field", [
    (["红色的圆形"], "['红色的圆形']"),
    (["a", "b's"], "['a', \"b's\"]"),  # Python repr: double quotes only around a caption with '
    (["", "x"], "['', 'x']"),
])
def test_gen_text_formats(captions, field):
    assert format_gen_text(captions, "easynlp") == field == str(captions)
    assert ast.literal_eval(field) == captions
    assert json.loads(format_gen_text(captions, "json")) == captions


def test_output_format_is_checked():
    with pytest.raises(ConfigError, match="output_format"):
        PredictOptions(tables=("t",), outputs="o", input_schema=InputSchema.parse(TEST_SCHEMA),
                       first_sequence="imgbase64", output_format="tsv")


def predict_lines(export, table, out, *extra) -> list[str]:
    run_cli(["predict", "--tables", table, "--outputs", out, "--checkpoint_dir", export,
             "--input_schema", TEST_SCHEMA, "--first_sequence", "imgbase64", *extra])
    return Path(out).read_text(encoding="utf-8").splitlines()


def test_predict_writes_easynlps_lines(random_export, synth_data, tmp_path):
    """Both formats on one model and seed: the same token ids, decoded and written each way. A hot
    temperature makes the untrained model write special tokens, where the two texts differ."""
    from v2t_engine.jobs.predict import row_search
    from v2t_engine.runtime.captioner import Captioner
    from v2t_engine.runtime.generator import stream_captions

    sampling = ["--do_sample", "--temperature", "3", "--seed", "5", "--user_defined_parameters", "max_generated_num=2"]
    lines = {fmt: predict_lines(random_export, synth_data["test"], tmp_path / fmt, "--output_format", fmt, *sampling)
             for fmt in ("json", "easynlp")}
    cap = Captioner.load(random_export)
    rows = list(read_table(synth_data["test"], InputSchema.parse(TEST_SCHEMA)))
    pixels = [row_frames_or_error(r, "imgbase64", cap.config.frame_num, cap.config.img_size, FrameSource())[0]
              for r in rows]
    opts = SearchOptions(do_sample=True, temperature=3.0, num_return=2, seed=5)
    # predict keys each row's sampling streams by the seed and the row's line (resume, shards).
    videos = [(n, p, row_search(opts, row.line_no - 1)) for n, (row, p) in enumerate(zip(rows, pixels))]
    ids = dict(stream_captions(cap.backend, videos, opts, cap.max_new_tokens(None)))
    assert len(lines["json"]) == len(lines["easynlp"]) == len(rows) == len(ids)
    differ = 0
    for n, (row, js, easy) in enumerate(zip(rows, lines["json"], lines["easynlp"])):
        want = [cap.tokenizer.decode(c, style="easynlp") for c in ids[n]]
        assert easy == f"{row.idx}\t{want!s}"
        ours = [cap.tokenizer.decode(c) for c in ids[n]]
        assert js == f"{row.idx}\t{json.dumps(ours, ensure_ascii=False)}"
        differ += want != ["".join(c.split()) for c in ours]
    assert differ, "no caption where EasyNLP's text differs from v2t's: the test checks nothing"


def test_greedy_predict_writes_max_generated_num_captions(random_export, synth_data, tmp_path):
    lines = predict_lines(random_export, synth_data["test"], tmp_path / "out.txt", "--output_format", "easynlp",
                          "--user_defined_parameters", "max_generated_num=3")
    for line in lines:
        captions = ast.literal_eval(line.split("\t")[1])
        assert len(captions) == 3 and len(set(captions)) == 1  # greedy: three identical captions


def test_bad_output_format_is_a_usage_error(tmp_path):
    result = run_cli(["predict", "--tables", tmp_path / "t.txt", "--outputs", tmp_path / "o.txt",
                      "--checkpoint_dir", tmp_path, "--output_format", "xml"], expect_code=2)
    assert "output_format" in result.output and "easynlp" in result.output
    assert not (tmp_path / "o.txt").exists()
