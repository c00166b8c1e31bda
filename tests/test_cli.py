"""The command line's boundary: bad option values name the option, domain errors read as one
clean line (no traceback) for every command, and commands from other stages are found by name."""
import pytest

from conftest import TEST_SCHEMA, run_cli


def predict(tmp_path, model_dir, **options):
    """`v2t predict` on a one-row table; options override or add to the defaults."""
    table = tmp_path / "t.txt"
    table.write_text("a\t[]\n", encoding="utf-8")
    args = {"--tables": table, "--outputs": tmp_path / "out.txt", "--checkpoint_dir": model_dir,
            "--input_schema": TEST_SCHEMA, **options}
    return ["predict", *(x for pair in args.items() for x in pair)]


@pytest.mark.parametrize("option, value, message", [
    ("--input_schema", "idx:str", "Invalid value for '--input_schema'"),
    ("--user_defined_parameters", "fram_num=4", "unknown key 'fram_num'"),
    ("--user_defined_parameters", "frame_num", "expected key=value"),
    ("--sampling", "fps:0", "Invalid value for '--sampling'"),
    ("--tables", " , ", "Invalid value for '--tables'"),
])
def test_bad_option_values_name_the_option(tmp_path, option, value, message):
    result = run_cli(predict(tmp_path, tmp_path, **{option: value}), expect_code=2)
    assert message in result.output and "Traceback" not in result.output


def test_domain_errors_are_one_clean_line(tmp_path, random_export):
    cases = [
        (predict(tmp_path, tmp_path / "nowhere"), "is not a directory"),
        (predict(tmp_path, random_export, **{"--user_defined_parameters": "img_size=32"}),
         "img_size=32 but the model was built with img_size=64"),
        (predict(tmp_path, random_export, **{"--output_schema": "idx,nope"}), "output column 'nope'"),
        (["eval", "--predictions", random_export / "manifest.json", "--references", random_export / "manifest.json"],
         "line 1"),
    ]
    for args, message in cases:
        result = run_cli(args, expect_code=1)
        assert result.output.startswith("Error: ") and message in result.output, result.output


def test_stage_commands_are_registered_by_name():
    result = run_cli(["--help"])
    for name in ("train", "export", "predict", "make-table", "eval", "synth"):
        assert f"  {name} " in result.output
    assert "--optimizer" in run_cli(["train", "--help"]).output
    assert "--precision" in run_cli(["export", "--help"]).output
