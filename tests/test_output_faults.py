"""Output faults: one writer per output, and a failed write is one line naming the file, with the
finished rows kept."""
import errno

from conftest import TEST_SCHEMA, run_cli
from v2t_engine.inputs.writer import AtomicTableWriter, TableOutput, TableReport


def predict(synth_data, model_dir, outputs, expect_code=0, *extra):
    return run_cli(["predict", "--tables", synth_data["test"], "--outputs", outputs, "--checkpoint_dir", model_dir,
                    "--input_schema", TEST_SCHEMA, "--micro_batch_size", 4, *extra], expect_code=expect_code)


def test_a_second_writer_of_the_same_outputs_is_refused(random_export, synth_data, tmp_path):
    out = tmp_path / "out.txt"
    with TableOutput(TableReport(str(out))):  # a job in progress on out.txt
        result = predict(synth_data, random_export, out, expect_code=1)
    assert "another v2t job is writing" in result.output and "Traceback" not in result.output
    # A lock file left behind by a killed job holds no lock: the next job runs, and cleans it up
    # (the first job's partial output is replaced only when asked to).
    (tmp_path / "out.txt.lock").write_text("")
    predict(synth_data, random_export, out, 0, "--overwrite")
    assert out.is_file() and not (tmp_path / "out.txt.lock").exists()


def test_a_full_disk_is_one_line_and_keeps_the_finished_rows(random_export, synth_data, tmp_path, monkeypatch):
    write_row = AtomicTableWriter.write_row
    written = []

    def fill_up(self, fields):
        if len(written) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        write_row(self, fields)
        self.flush()
        written.append(fields)

    monkeypatch.setattr(AtomicTableWriter, "write_row", fill_up)
    out = tmp_path / "out.txt"
    result = predict(synth_data, random_export, out, expect_code=1)
    assert result.output.startswith("Error: cannot write") and "No space left on device" in result.output
    assert "out.txt.partial" in result.output and "Traceback" not in result.output
    kept = (tmp_path / "out.txt.partial").read_text(encoding="utf-8").splitlines()
    assert len(kept) == 5 and not out.exists()
