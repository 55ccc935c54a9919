"""Input readers: every format, exact range reads, picklable specs, job-level input errors."""

import itertools
import os
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_llm import INPUT_FORMATS, sample_rows, write_input

from raas_batch.data.reader import ROW_ERROR, InputError, detect_input, open_reader


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.parametrize("fmt", INPUT_FORMATS)
def test_every_format_reads_exact_ranges(tmp_path, fmt):
    rows = sample_rows(11)
    spec = detect_input(write_input(tmp_path, fmt, rows)).with_columns(["prompt", "id", "absent"])
    reader = open_reader(pickle.loads(pickle.dumps(spec)))  # a worker elsewhere opens it from the spec
    assert reader.num_rows == 11
    assert {"id", "prompt", "answer"} <= set(reader.column_names)
    whole = reader.read(0, 11)
    assert [r["id"] for r in whole] == [r["id"] for r in rows]
    assert [r["prompt"] for r in whole] == [r["prompt"] for r in rows]
    assert all(set(r) == {"prompt", "id", "absent"} and r["absent"] is None for r in whole)
    # Ranges that cross row-group / record-batch / file boundaries give the same rows.
    for cuts in ([0, 1, 11], [0, 3, 4, 7, 11], [0, 5, 6, 10, 11]):
        pieces = [row for a, b in itertools.pairwise(cuts) for row in reader.read(a, b)]
        assert pieces == whole
    assert reader.read(4, 4) == []
    with pytest.raises(IndexError):
        reader.read(5, 12)


def test_identity_tracks_content_not_path(tmp_path):
    rows = sample_rows(6)
    a = write_input(tmp_path / "a", "jsonl", rows)
    b = write_input(tmp_path / "b", "jsonl", rows)
    c = write_input(tmp_path / "c", "jsonl", rows[:5])
    ident = [open_reader(detect_input(p)).identity() for p in (a, b, c)]
    assert ident[0] == ident[1]
    assert ident[0] != ident[2]


def test_jsonl_blank_and_bad_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "a"}\n\n   \nnot json\n[1, 2]\n{"prompt": "b", "extra": 1}\n')
    reader = open_reader(detect_input(str(path)).with_columns(["prompt"]))
    assert reader.num_rows == 4  # blank lines are not rows
    rows = reader.read(0, 4)
    assert rows[0] == {"prompt": "a"}
    assert "line 4" in rows[1][ROW_ERROR] and "not valid JSON" in rows[1][ROW_ERROR]
    assert "line 5" in rows[2][ROW_ERROR] and "not an object" in rows[2][ROW_ERROR]
    assert rows[3] == {"prompt": "b"}


def test_messages_column_round_trips_as_dicts(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "system", "content": "s"},
                                                                              {"role": "user", "content": "q"}]}]
    for fmt in ("parquet", "jsonl", "arrow"):
        reader = open_reader(detect_input(write_input(tmp_path / fmt, fmt, rows)).with_columns(["messages"]))
        assert [r["messages"] for r in reader.read(0, 2)] == [r["messages"] for r in rows]


def test_job_level_input_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        detect_input(str(tmp_path / "missing.parquet"))
    (tmp_path / "data.csv").write_text("prompt\nhi\n")
    with pytest.raises(InputError, match="unknown format"):
        detect_input(str(tmp_path / "data.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .parquet files"):
        detect_input(str(tmp_path / "empty"))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        open_reader(detect_input(str(bad)))
    badarrow = tmp_path / "bad.arrow"
    badarrow.write_bytes(b"nope")
    with pytest.raises(InputError, match="not a readable Arrow IPC file"):
        open_reader(detect_input(str(badarrow)))
    with pytest.raises(InputError, match="hf:NAME"):
        detect_input("hf:")


def test_truncated_parquet_is_refused(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt": ["a"] * 100}), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a readable Parquet file"):
        open_reader(detect_input(str(path)))


def test_dataset_dict_folder_names_the_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(sample_rows(2)),
                               "test": datasets.Dataset.from_list(sample_rows(1))})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match="pass one split's folder"):
        detect_input(str(tmp_path / "dd"))
    reader = open_reader(detect_input(str(tmp_path / "dd" / "test")).with_columns(["id"]))
    assert reader.num_rows == 1


def test_hf_spec_parsing():
    assert detect_input("hf:org/name").split == "train"
    s = detect_input("hf:org/name:test")
    assert (s.path, s.config_name, s.split) == ("org/name", None, "test")
    s = detect_input("hf:openai/gsm8k:main:test")
    assert (s.path, s.config_name, s.split) == ("openai/gsm8k", "main", "test")


def test_hf_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="could not be loaded"):
        open_reader(detect_input(f"hf:{os.path.join(str(tmp_path), 'nothing-here')}"))
