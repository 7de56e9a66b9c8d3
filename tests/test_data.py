"""Datasets, table I/O and the input schema check: every problem names file, column, row."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore.rows import validation
from batchscore.rows.errors import InputError
from batchscore.rows.validation import to_feature_frame
from batchscore.storage import tables
from batchscore.storage.tables import iter_frames, read_frame
from batchscore.training.datasets import load_dataset


def _write(path: Path, frame: pd.DataFrame) -> str:
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return str(path)


def _table(n: int = 12) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "x1": rng.normal(size=n),
            "x2": rng.normal(size=n) * 100,
            "x3": np.arange(n, dtype="float64"),
            "label": ["yes" if i % 3 == 0 else "no" for i in range(n)],
        }
    )


# ------------------------------------------------------------------------ datasets


def test_breast_cancer_malignant_is_positive():
    dataset = load_dataset("breast_cancer")
    assert dataset.features.shape == (569, 30)
    assert dataset.labels.shape == (569,)
    assert set(np.unique(dataset.labels)) == {0, 1}
    assert int(dataset.labels.sum()) == 212  # malignant cases
    assert dataset.classes == ("benign", "malignant")
    assert dataset.positive_class == "malignant"
    assert (dataset.features.dtypes == "float64").all()
    assert dataset.features.columns[0] == "mean radius"
    assert dataset.name == "breast_cancer"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_file_dataset(tmp_path, suffix):
    table = _table()
    source = _write(tmp_path / f"my data{suffix}", table)
    dataset = load_dataset(source, target="label")
    assert list(dataset.features.columns) == ["x1", "x2", "x3"]
    assert dataset.features.shape == (12, 3)
    # Classes sort as text: "no" < "yes", so "yes" is positive by default.
    assert dataset.classes == ("no", "yes")
    np.testing.assert_array_equal(dataset.labels, (table["label"] == "yes").astype(int))
    np.testing.assert_array_equal(dataset.features.to_numpy(), table[["x1", "x2", "x3"]])
    assert dataset.name == "my_data"


def test_positive_class_option(tmp_path):
    source = _write(tmp_path / "d.csv", _table())
    dataset = load_dataset(source, target="label", positive_class="no")
    assert dataset.classes == ("yes", "no")
    assert dataset.positive_class == "no"
    assert int(dataset.labels.sum()) == 8
    with pytest.raises(InputError, match="'maybe'"):
        load_dataset(source, target="label", positive_class="maybe")


def test_numeric_labels_put_one_positive(tmp_path):
    table = _table().assign(label=[i % 2 for i in range(12)])
    dataset = load_dataset(_write(tmp_path / "d.csv", table), target="label")
    assert dataset.classes == ("0", "1")
    np.testing.assert_array_equal(dataset.labels, table["label"])


def test_non_binary_label_names_the_column(tmp_path):
    table = _table().assign(label=[str(i % 3) for i in range(12)])
    source = _write(tmp_path / "d.csv", table)
    with pytest.raises(InputError, match="'label'.*exactly two classes") as info:
        load_dataset(source, target="label")
    assert source in str(info.value)


def test_missing_label_value_names_the_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("x,y\n1,a\n2,b\n3,\n")
    with pytest.raises(InputError, match=r"column 'y', row 3"):
        load_dataset(str(path), target="y")


def test_target_is_required_and_must_exist(tmp_path):
    source = _write(tmp_path / "d.csv", _table())
    with pytest.raises(InputError, match="--target"):
        load_dataset(source)
    with pytest.raises(InputError, match="'diagnosis'") as info:
        load_dataset(source, target="diagnosis")
    assert source in str(info.value)


# ------------------------------------------------------------------------ table I/O


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_iter_frames_batches(tmp_path, suffix):
    table = _table(25).drop(columns=["label"])
    source = _write(tmp_path / f"t{suffix}", table)
    frames = list(iter_frames(source, batch_rows=10, numeric_columns=["x1", "x2", "x3"]))
    assert [len(f) for f in frames] == [10, 10, 5]
    pd.testing.assert_frame_equal(pd.concat(frames, ignore_index=True), table)
    assert [len(f) for f in iter_frames(source, batch_rows=25)] == [25]
    assert [len(f) for f in iter_frames(source, batch_rows=100)] == [25]


def test_parquet_batches_cut_across_row_groups(tmp_path):
    # Row groups of 7 regrouped into batches of 10 (and one larger than the file): every
    # row once, in order, whatever the two sizes.
    table = pa.table({"x1": np.arange(25.0), "x2": np.arange(25.0) * 2})
    path = tmp_path / "groups.parquet"
    pq.write_table(table, path, row_group_size=7)
    for batch_rows, sizes in ((10, [10, 10, 5]), (7, [7, 7, 7, 4]), (100, [25])):
        batches = list(tables.iter_tables(str(path), batch_rows=batch_rows))
        assert [b.num_rows for b in batches] == sizes
        assert pa.concat_tables(batches).equals(table)


def test_csv_batches_across_read_blocks(tmp_path, monkeypatch):
    # Small read blocks: batches are cut from many Arrow batches, none lost or repeated.
    monkeypatch.setattr(tables, "READ_BLOCK_BYTES", 256)
    path = tmp_path / "t.csv"
    path.write_text("a,b\n" + "".join(f"{i},{i * 0.5}\n" for i in range(1000)))
    frames = list(iter_frames(str(path), batch_rows=300, numeric_columns=["a", "b"]))
    assert [len(f) for f in frames] == [300, 300, 300, 100]
    whole = pd.concat(frames, ignore_index=True)
    assert whole["a"].tolist() == [float(i) for i in range(1000)]


def test_csv_floats_parse_bit_for_bit_like_python(tmp_path):
    rng = random.Random(7)
    texts = [
        "0.1",
        "0.30000000000000004",
        "0.12345678901234567",
        "2.2250738585072011e-308",
        "4.9e-324",
        "1.7976931348623157e308",
        "9007199254740993",
        "1e23",
        "-0.0",
        "122.8",
        "17.99",
    ]
    texts += [repr(rng.random()) for _ in range(2000)]
    texts += [f"{rng.uniform(-1e6, 1e6):.17g}" for _ in range(2000)]
    texts += [f"{rng.random():.25f}" for _ in range(500)]  # more digits than a double holds
    path = tmp_path / "floats.csv"
    path.write_text("x\n" + "\n".join(texts) + "\n")
    parsed = pd.concat(iter_frames(str(path), numeric_columns=["x"]))["x"].tolist()
    assert len(parsed) == len(texts)
    mismatched = [
        (text, value)
        for text, value in zip(texts, parsed, strict=True)
        if struct.pack("<d", float(text)) != struct.pack("<d", value)
    ]
    assert mismatched == []


def test_read_frame_concatenates(tmp_path):
    table = _table(7)
    assert read_frame(_write(tmp_path / "t.parquet", table)).equals(table)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(InputError, match="empty") as info:
        read_frame(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_header_only_file(tmp_path, suffix):
    source = _write(tmp_path / f"header{suffix}", _table().iloc[:0])
    with pytest.raises(InputError, match="header but no rows") as info:
        read_frame(source)
    assert source in str(info.value)
    with pytest.raises(InputError, match="header but no rows"):
        load_dataset(source, target="label")


def test_missing_path(tmp_path):
    source = str(tmp_path / "nowhere.csv")
    with pytest.raises(InputError, match="no such file") as info:
        read_frame(source)
    assert source in str(info.value)
    with pytest.raises(InputError, match="no such file"):
        list(iter_frames(Path(source).as_uri()))


def test_not_a_table(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(InputError, match="not a readable Parquet file") as info:
        read_frame(str(path))
    assert str(path) in str(info.value)


def test_file_url_and_s3_sources(tmp_path, s3_env, settings_for):
    table = _table(5)
    source = _write(tmp_path / "t.parquet", table)
    assert read_frame(Path(source).as_uri()).equals(table)

    from batchscore.storage.object_store import ObjectStore

    settings = settings_for(s3_env)
    store = ObjectStore.from_url(s3_env["BATCHSCORE_STORE_URL"], settings)
    uri = store.put_file("data/t.csv", Path(_write(tmp_path / "t.csv", table)))
    assert read_frame(uri, settings)["x3"].tolist() == table["x3"].tolist()
    with pytest.raises(InputError, match="data/absent.csv"):
        read_frame(store.uri("data/absent.csv"), settings)


# --------------------------------------------------------------------- schema check

COLUMNS = ["a", "b", "c"]


def test_feature_frame_reorders_and_ignores_extra():
    frame = pd.DataFrame({"c": [3.0, 6.0], "extra": ["x", "y"], "a": [1, 4], "b": [2.0, 5.0]})
    features = to_feature_frame(frame, COLUMNS, "rows.csv")
    assert list(features.columns) == COLUMNS
    assert features.to_numpy().tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert (features.dtypes == "float64").all()


def test_feature_frame_missing_column_is_named():
    frame = pd.DataFrame({"a": [1.0], "c": [3.0]})
    with pytest.raises(InputError, match=r"rows.csv: missing feature column\(s\) \['b'\]"):
        to_feature_frame(frame, COLUMNS, "rows.csv")


def test_feature_frame_non_numeric_names_column_and_row():
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": ["1.5", "2.5", "abc"], "c": [0.0] * 3})
    with pytest.raises(InputError, match=r"rows.csv: column 'b', row 3: 'abc' is not a number"):
        to_feature_frame(frame, COLUMNS, "rows.csv")
    # Rows count from `first_row` when the frame is a later batch of a bigger table.
    with pytest.raises(InputError, match=r"column 'b', row 103"):
        to_feature_frame(frame, COLUMNS, "rows.csv", first_row=101)


def test_numeric_text_is_accepted():
    frame = pd.DataFrame({"a": ["1.5", "2"], "b": [1, 2], "c": [0.5, 0.25]})
    assert to_feature_frame(frame, COLUMNS, "x").to_numpy().tolist() == [
        [1.5, 1.0, 0.5],
        [2.0, 2.0, 0.25],
    ]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, None])
def test_feature_frame_rejects_nan_and_inf(bad):
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": [1.0, 2.0], "c": [1.0, 2.0]}, dtype=object)
    frame.loc[1, "c"] = bad
    with pytest.raises(InputError, match=r"rows.csv: column 'c', row 2: .*not a finite number"):
        to_feature_frame(frame, COLUMNS, "rows.csv")


def test_csv_reader_non_numeric_names_column_and_row(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,b,c\n1,2,3\n4,5,6\n7,oops,9\n")
    with pytest.raises(InputError) as info:
        list(iter_frames(str(path), numeric_columns=COLUMNS))
    message = str(info.value)
    assert str(path) in message
    assert "column 'b'" in message
    assert "row 3" in message


def test_csv_reader_bad_value_in_a_later_block(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "READ_BLOCK_BYTES", 512)
    path = tmp_path / "rows.csv"
    lines = [f"{i},{i}.5" for i in range(1, 1001)]
    lines[876] = "877,n/a?"  # data row 877
    path.write_text("a,b\n" + "\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"column 'b', row 877"):
        list(iter_frames(str(path), batch_rows=100, numeric_columns=["a", "b"]))


def test_csv_reader_empty_cell_is_rejected_with_its_row(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,b\n1,2\n3,\n")
    frames = list(iter_frames(str(path), numeric_columns=["a", "b"]))
    with pytest.raises(InputError, match=r"column 'b', row 2"):
        to_feature_frame(frames[0], ["a", "b"], str(path))


@pytest.fixture
def http_folder(tmp_path):
    """A real HTTP server over a folder, for dataset URLs."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    folder = tmp_path / "www"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_sources(http_folder):
    folder, base = http_folder
    table = _table(9)
    _write(folder / "train.parquet", table)
    _write(folder / "train.csv", table)
    assert load_dataset(f"{base}/train.parquet", target="label").features.shape == (9, 3)
    assert load_dataset(f"{base}/train.csv", target="label").name == "train"
    with pytest.raises(InputError, match="cannot download") as info:
        read_frame(f"{base}/absent.csv")
    assert f"{base}/absent.csv" in str(info.value)


def test_csv_with_bom_and_crlf(tmp_path):
    # What spreadsheet programs on Windows write.
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfa,b\r\n1.5,2\r\n3,4\r\n")
    frame = read_frame(str(path))
    assert list(frame.columns) == ["a", "b"]
    assert to_feature_frame(frame, ["a", "b"], str(path)).to_numpy().tolist() == [
        [1.5, 2.0],
        [3.0, 4.0],
    ]


# to_feature_table: the Arrow twin that plan_shards uses, held to the same contract.


def test_feature_table_matches_feature_frame():
    frame = pd.DataFrame({"c": [3.0, -0.0], "extra": ["x", "y"], "a": [1, 4], "b": [2.0, 5.0]})
    table = validation.to_feature_table(pa.Table.from_pandas(frame), COLUMNS, "rows.parquet")
    assert table.column_names == COLUMNS
    assert all(t == pa.float64() for t in table.schema.types)
    expected = to_feature_frame(frame, COLUMNS, "rows.parquet")
    np.testing.assert_array_equal(table.to_pandas().to_numpy(), expected.to_numpy())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, None])
def test_feature_table_names_the_first_bad_row_and_column(bad):
    columns = {"a": [1.0, 2.0, 3.0], "b": [1.0, 2.0, 3.0], "c": [1.0, 2.0, 3.0]}
    columns["c"][1] = bad  # row 2, column c ...
    columns["a"][2] = np.nan  # ... comes before row 3, column a
    table = pa.table(columns)
    with pytest.raises(InputError, match=r"rows.parquet: column 'c', row 12: .*not a finite"):
        validation.to_feature_table(table, COLUMNS, "rows.parquet", first_row=11)


def test_feature_table_finds_the_first_bad_row_in_a_later_chunk():
    # Columns in several chunks (a Parquet file's row groups): the row is counted across
    # chunks, and the earliest bad row wins over a bad cell in an earlier column.
    a = pa.chunked_array([[1.0, 2.0], [3.0, np.nan]])
    b = pa.chunked_array([[1.0], [2.0, np.inf, 4.0]])
    c = pa.chunked_array([[0.0, 0.0, 0.0, 0.0]])
    with pytest.raises(InputError, match=r"column 'b', row 3: inf"):
        validation.to_feature_table(pa.table({"a": a, "b": b, "c": c}), COLUMNS, "rows.parquet")


def test_feature_table_reads_sliced_chunks_in_place():
    # A chunk that is a slice of a larger buffer (offset > 0): values before the slice are
    # not the table's, and a null is caught whatever its slot in the data buffer holds.
    a = pa.chunked_array([pa.array([np.nan, 1.0, 2.0]).slice(1)])
    b = pa.chunked_array([pa.array([np.inf, 1.0, None]).slice(1)])
    c = pa.chunked_array([[0.0, 0.0]])
    with pytest.raises(InputError, match=r"column 'b', row 2: nan is not a finite"):
        validation.to_feature_table(pa.table({"a": a, "b": b, "c": c}), COLUMNS, "rows.parquet")
    good = validation.to_feature_table(pa.table({"a": a, "b": a, "c": c}), COLUMNS, "rows.parquet")
    assert good.column("b").to_pylist() == [1.0, 2.0]


def test_feature_table_text_columns_get_the_frame_checks():
    table = pa.table({"a": [1.0, 2.0, 3.0], "b": ["1.5", "2.5", "abc"], "c": [0.0] * 3})
    with pytest.raises(InputError, match=r"rows.csv: column 'b', row 3: 'abc' is not a number"):
        validation.to_feature_table(table, COLUMNS, "rows.csv")
    good = pa.table({"a": ["1.5", "2"], "b": [1, 2], "c": [0.5, 0.25]})
    assert validation.to_feature_table(good, COLUMNS, "x").to_pandas().to_numpy().tolist() == [
        [1.5, 1.0, 0.5],
        [2.0, 2.0, 0.25],
    ]


def test_feature_table_missing_column_is_named():
    with pytest.raises(InputError, match=r"missing feature column\(s\) \['b'\]"):
        validation.to_feature_table(pa.table({"a": [1.0], "c": [3.0]}), COLUMNS, "rows.csv")


# ------------------------------------------------------------ positive class rules


def _labels(tmp_path, values, **kwargs):
    table = pd.DataFrame({"x": np.arange(len(values), dtype="float64"), "y": values})
    return load_dataset(_write(tmp_path / "d.csv", table), target="y", **kwargs)


@pytest.mark.parametrize(
    ("values", "positive"),
    [
        ([0, 1, 0, 1], "1"),
        ([-1, 1, -1, 1], "1"),
        ([1, 2, 1, 2], "1"),  # 1 is positive even when it is the smaller label
        ([2, 4, 2, 4], "4"),  # no 1: the larger number
        ([True, False, True, False], "True"),
        (["yes", "no", "no", "yes"], "yes"),
        (["N", "Y", "N", "Y"], "Y"),
        (["no", "YES", "YES", "no"], "YES"),
        (["Negative", "Positive", "Negative", "Positive"], "Positive"),
    ],
)
def test_default_positive_class(tmp_path, values, positive):
    dataset = _labels(tmp_path, values)
    assert dataset.positive_class == positive
    expected = [str(v) == positive for v in pd.Series(values).astype(str)]
    np.testing.assert_array_equal(dataset.labels, np.array(expected, dtype=np.int8))


def test_other_text_labels_need_positive_class(tmp_path):
    # Sorted, `legit` would be positive and every metric would describe the wrong class.
    values = ["fraud", "legit", "legit", "legit"]
    with pytest.raises(InputError, match=r"'fraud' and 'legit'.*--positive_class") as info:
        _labels(tmp_path, values)
    assert "d.csv: column 'y'" in str(info.value)
    dataset = _labels(tmp_path, values, positive_class="fraud")
    assert dataset.classes == ("legit", "fraud")
    np.testing.assert_array_equal(dataset.labels, [1, 0, 0, 0])


# -------------------------------------------------------------------- id columns


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_text_columns_keep_leading_zeros(tmp_path, suffix):
    path = tmp_path / f"ids{suffix}"
    if suffix == ".csv":
        path.write_text("customer,x\n007,1.5\n7,2.5\n0042,3.5\n")
    else:
        pd.DataFrame({"customer": ["007", "7", "0042"], "x": [1.5, 2.5, 3.5]}).to_parquet(path)
    (table,) = tables.iter_tables(str(path), numeric_columns=["x"], text_columns=["customer"])
    assert table.column("customer").to_pylist() == ["007", "7", "0042"]
    frame = read_frame(str(path), text_columns=["customer"])
    assert frame["customer"].tolist() == ["007", "7", "0042"]


# ------------------------------------------- shards planned from metadata, read in ranges


def _shard_rows(source: str, settings, shard_rows=None, max_tasks=None, features=("a", "b")):
    """Every shard's checked rows, as the scoring tasks read them: (a, b) tuples."""
    from batchscore.batch.shards import plan_shards, read_shard

    plan = plan_shards(source, list(features), shard_rows, "Flow/1", settings, max_tasks=max_tasks)
    rows = []
    for shard in plan.shards:
        for block in read_shard(shard, settings):
            rows += list(zip(*block.features.to_pydict().values(), strict=True))
    return plan, rows


@pytest.mark.parametrize(("rows", "tasks"), [(1_000, 1), (120_000, 3), (400_000, 4)])
def test_locally_a_task_per_core_but_none_for_less_than_a_block(
    tmp_path, settings_for, monkeypatch, rows, tasks
):
    # Each task pays ~1.3 s of CPU to start: a small input is not spread over every core.
    from batchscore.batch.shards import BLOCK_ROWS, plan_shards

    monkeypatch.setattr("batchscore.batch.shards.machine_cores", lambda: 4)
    monkeypatch.delenv("METAFLOW_KUBERNETES_WORKLOAD", raising=False)
    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")})
    path = tmp_path / "rows.parquet"
    values = np.arange(rows, dtype="float64")
    pq.write_table(pa.table({"a": values, "b": values}), path, row_group_size=10_000)
    plan = plan_shards(str(path), ["a", "b"], None, "Flow/1", settings)
    assert len(plan.shards) == tasks == min(4, -(-rows // BLOCK_ROWS))
    assert sum(p.end - p.start for s in plan.shards for p in s.pieces) == rows


@pytest.mark.parametrize("shard_rows", [1_000, 50, 33, 14, 3])
def test_csv_ranges_cover_every_line_once_wherever_they_cut(tmp_path, settings_for, shard_rows):
    # Lines of uneven length, so range edges fall mid-line, on a line start, and on a
    # line break; CRLF endings and a last line without a newline.
    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")})
    lines = [f"{n},{n * 1.5:.{n % 7}f}" for n in range(1, 101)]
    path = tmp_path / "rows.csv"
    path.write_bytes(("a,b\r\n" + "\r\n".join(lines)).encode())
    plan, rows = _shard_rows(str(path), settings, shard_rows=shard_rows, max_tasks=50)
    assert len(plan.shards) == 1 if shard_rows > 100 else len(plan.shards) >= 100 // shard_rows
    assert [a for a, _ in rows] == [float(n) for n in range(1, 101)]


def test_csv_blocks_start_after_the_offset_and_read_through_the_line_crossing_the_end():
    import io

    from batchscore.storage.tables import csv_blocks

    data = b"h\n1111\n22\n333\n4\n"  # lines start at 2, 7, 10, 14

    def lines(start, end, block=3):
        return b"".join(b for _, b in csv_blocks(io.BytesIO(data), start, end, 2, block))

    assert lines(0, 7) == b"1111\n"  # the header is not data
    assert lines(7, 8) == b"22\n"  # a range opening on a line start takes that line
    assert lines(3, 11) == b"22\n333\n"  # mid-line: from the next line, through the crossing one
    assert lines(8, 10) == b""  # no line starts in [8, 10)
    assert lines(14, 99) == b"4\n"


def test_a_quoted_line_break_is_refused_clearly(tmp_path, settings_for):
    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")})
    path = tmp_path / "notes.csv"
    path.write_text('a,b,note\n1,2,"one\nline break"\n3,4,ok\n')
    with pytest.raises(InputError, match=r"notes.csv: a quoted value holds a line break .*byte"):
        _shard_rows(str(path), settings)


def test_a_header_only_file_is_refused_at_planning(tmp_path, settings_for):
    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")})
    path = tmp_path / "empty.csv"
    path.write_text("a,b\n\n")
    with pytest.raises(InputError, match=r"empty.csv: the table has a header but no rows"):
        _shard_rows(str(path), settings)


def test_a_directory_of_parquet_and_hive_folders_is_one_input(tmp_path, settings_for):
    # Spark's layout: part files under Hive-style partition folders, with _SUCCESS and
    # .crc files beside them; planned across files and row groups, read once each.
    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")})
    out = tmp_path / "table"
    expected = []
    for day, start in (("2026-12-01", 0), ("2026-12-02", 50)):
        folder = out / f"date={day}"
        folder.mkdir(parents=True)
        for part in range(2):
            first = start + 25 * part
            table = pa.table({"a": [float(n) for n in range(first, first + 25)], "b": [1.0] * 25})
            pq.write_table(table, folder / f"part-{part:05d}.parquet", row_group_size=10)
            expected += [(float(n), 1.0) for n in range(first, first + 25)]
        (folder / ".part-00000.parquet.crc").write_bytes(b"crc")
    (out / "_SUCCESS").write_bytes(b"")
    plan, rows = _shard_rows(str(out), settings, max_tasks=3)
    assert plan.files == 4 and len(plan.shards) == 3
    assert rows == expected
    _, globbed = _shard_rows(str(out / "*" / "part-*.parquet"), settings)
    assert globbed == expected


def test_files_of_one_input_whose_columns_differ_are_refused_naming_the_file(
    tmp_path, settings_for
):
    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")})
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "part-0.csv").write_text("a,b\n1,2\n")
    (tmp_path / "in" / "part-1.csv").write_text("a,b,extra\n1,2,3\n")
    with pytest.raises(InputError, match=r"part-1.csv: its columns differ from .*part-0.csv"):
        _shard_rows(str(tmp_path / "in"), settings)


def test_an_s3_prefix_is_read_in_ranges_never_whole(tmp_path, settings_for, s3_env):
    import boto3

    from batchscore.batch.shards import plan_shards, read_shard

    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home"), **s3_env})
    bucket = s3_env["BATCHSCORE_STORE_URL"].removeprefix("s3://")
    client = boto3.client(
        "s3",
        endpoint_url=s3_env["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    text = "a,b\n" + "".join(f"{n},{n % 3}\n" for n in range(2_000))
    client.put_object(Bucket=bucket, Key="incoming/part-0.csv", Body=text.encode())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"a": [5000.0, 5001.0], "b": [0.0, 1.0]}), sink)
    client.put_object(
        Bucket=bucket, Key="incoming/part-1.parquet", Body=sink.getvalue().to_pybytes()
    )
    plan = plan_shards(f"s3://{bucket}/incoming/", ["a", "b"], 500, "Flow/1", settings, max_tasks=8)
    assert plan.files == 2 and len(plan.shards) >= 4
    seen = [
        a
        for shard in plan.shards
        for block in read_shard(shard, settings)
        for a in block.features.column("a").to_pylist()
    ]
    assert seen == [float(n) for n in range(2_000)] + [5000.0, 5001.0]
    first = plan.shards[0].pieces[0]
    assert first.end - first.start < len(text) // 3  # a shard's range, not the file


@pytest.mark.parametrize("bad_rows", ["reject", "quarantine"])
def test_a_parquet_boolean_column_scores_as_one_or_zero(tmp_path, settings_for, bad_rows):
    from batchscore.batch.shards import plan_shards, read_shard

    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")})
    path = tmp_path / "flags.parquet"
    pq.write_table(pa.table({"a": [True, False], "b": [2.0, 3.0]}), path)
    plan = plan_shards(str(path), ["a", "b"], None, "Flow/1", settings, bad_rows)
    blocks = [b.features for shard in plan.shards for b in read_shard(shard, settings)]
    assert pa.concat_tables(blocks).to_pydict() == {"a": [1.0, 0.0], "b": [2.0, 3.0]}


# ------------------------------------------------ http(s) inputs: basic auth, masking, timeouts


@pytest.fixture
def http_table(tmp_path):
    """A local HTTP server for one CSV, behind basic auth, answering range requests; a
    path `/slow.csv` that never answers in time."""
    import base64
    import http.server
    import threading
    import time

    body = ("a,b\n" + "".join(f"{n},{n % 5}\n" for n in range(300))).encode()
    token = base64.b64encode(b"reader:s3cr%t").decode()
    served: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/slow"):
                time.sleep(3)
            if self.headers.get("Authorization") != f"Basic {token}":
                self.send_response(401)
                self.end_headers()
                return
            start, end = 0, len(body) - 1
            asked = self.headers.get("Range")
            if asked:
                first, last = asked.removeprefix("bytes=").split("-")
                start, end = int(first), min(int(last), len(body) - 1)
            served.append(f"{start}-{end}")
            self.send_response(206 if asked else 200)
            if asked:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            self.wfile.write(body[start : end + 1])

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # the stalled request's client has gone: nothing to report

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_port}", served
    server.shutdown()


def test_a_basic_auth_http_input_is_read_in_ranges_and_its_secret_never_shown(
    http_table, tmp_path, settings_for
):
    from batchscore.batch.shards import plan_shards, read_shard

    address, served = http_table
    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")})
    url = f"http://reader:s3cr%25t@{address}/rows.csv?X-Amz-Signature=abc123"
    plan = plan_shards(url, ["a", "b"], 100, "Flow/1", settings)
    rows = [
        a
        for shard in plan.shards
        for block in read_shard(shard, settings)
        for a in block.features.column("a").to_pylist()
    ]
    assert rows == [float(n) for n in range(300)]
    assert len(plan.shards) == 3 and served  # each read a range request
    shown = plan.shards[0].pieces[0].file.shown
    assert shown == f"http://***@{address}/rows.csv?***"

    wrong = f"http://reader:wrong-pass@{address}/rows.csv?X-Amz-Signature=abc123"
    with pytest.raises(InputError) as error:
        plan_shards(wrong, ["a", "b"], 100, "Flow/1", settings)
    assert "401" in str(error.value)
    assert "wrong-pass" not in str(error.value) and "abc123" not in str(error.value)


def test_a_stalled_http_input_fails_within_the_timeout(
    http_table, tmp_path, settings_for, monkeypatch
):
    import time

    from batchscore.batch.shards import plan_shards

    address, _ = http_table
    monkeypatch.setattr("batchscore.storage.sources.HTTP_TIMEOUT_SECONDS", 1)
    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")})
    started = time.perf_counter()
    with pytest.raises(InputError, match=r"slow.csv: cannot download: .*timed out"):
        plan_shards(f"http://reader:s3cr%25t@{address}/slow.csv", ["a"], 100, "Flow/1", settings)
    assert time.perf_counter() - started < 2.5


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("https://user:pa55@host/x.csv", "https://***@host/x.csv"),
        ("https://host/x.csv?X-Amz-Signature=abc&X-Amz-Credential=k", "https://host/x.csv?***"),
        ("s3://bucket/rows.parquet", "s3://bucket/rows.parquet"),
        ("/data/rows.csv", "/data/rows.csv"),
        ("file:///data/rows.csv", "file:///data/rows.csv"),
    ],
)
def test_input_uris_are_shown_without_user_info_or_query(uri, shown):
    from batchscore.storage.sources import masked

    assert masked(uri) == shown


# ------------------------------------- credentials named as `${NAME}`: out of every record


def test_variables_in_an_input_are_expanded_by_resolve_alone(monkeypatch):
    from batchscore.storage.sources import masked, resolve

    monkeypatch.setenv("SRC_USER", "reader")
    monkeypatch.setenv("SRC_PASSWORD", "p@ss:w/rd%")
    monkeypatch.setenv("SIGNED_URL", "https://host/x.csv?X-Amz-Signature=abc")
    template = "https://${SRC_USER}:${SRC_PASSWORD}@host/${SRC_USER}.csv"
    # In the user info a value is percent-encoded (the request decodes it); elsewhere not.
    assert resolve(template) == "https://reader:p%40ss%3Aw%2Frd%25@host/reader.csv"
    assert resolve("${SIGNED_URL}") == "https://host/x.csv?X-Amz-Signature=abc"
    assert resolve("/data/$HOME/${not a name}.csv") == "/data/$HOME/${not a name}.csv"
    # What is shown and recorded keeps the template: it holds no secret.
    assert masked(template) == template
    assert masked("https://host/x.csv?sig=${SIG}") == "https://host/x.csv?sig=${SIG}"
    assert masked("https://host/x.csv?sig=${SIG}&sv=2") == "https://host/x.csv?***"  # any value
    assert masked("https://${U}:pa55@host/x.csv?sig=abc") == "https://***@host/x.csv?***"
    monkeypatch.delenv("SRC_PASSWORD")
    with pytest.raises(InputError, match=r"environment variable SRC_PASSWORD is not set"):
        resolve(template)


class _Half:
    """A model whose probability is always one half."""

    classes_ = np.array([0, 1])

    def predict_proba(self, features):
        return np.full((len(features), 2), 0.5)


@pytest.mark.services
def test_an_input_naming_its_credentials_is_read_and_recorded_as_the_template(
    http_table, tmp_path, settings_for, redis_url, redis_prefix, monkeypatch
):
    import pickle

    from batchscore.batch.bundle import ModelBundle
    from batchscore.batch.predictions import LoadedModel
    from batchscore.batch.publishing import publish, stage
    from batchscore.batch.scoring import score_shard
    from batchscore.batch.shards import plan_shards, read_shard
    from batchscore.online.store import OnlineStore
    from batchscore.storage.sources import masked
    from batchscore.storage.tracking import Tracker

    address, served = http_table
    monkeypatch.setenv("SRC_USER", "reader")
    monkeypatch.setenv("SRC_PASSWORD", "s3cr%t")  # as it is: no URL encoding to think of
    settings = settings_for(
        {
            "BATCHSCORE_HOME": str(tmp_path / "home"),
            "BATCHSCORE_REDIS_URL": redis_url,
            "BATCHSCORE_REDIS_PREFIX": redis_prefix,
        }
    )
    template = f"http://${{SRC_USER}}:${{SRC_PASSWORD}}@{address}/rows.csv"
    plan = plan_shards(template, ["a", "b"], 100, "Flow/1", settings)
    rows = [a for s in plan.shards for b in read_shard(s, settings) for a in b.features["a"]]
    assert len(rows) == 300 and served
    # The plan is a Metaflow artifact: it holds the template, never the password.
    assert {p.file.uri for s in plan.shards for p in s.pieces} == {template}
    assert b"s3cr" not in pickle.dumps(plan)

    bundle = ModelBundle("t", [LoadedModel("half", _Half(), "ab" * 32)], ["a", "b"], ("n", "y"))
    version = "v-template"
    stage(version, "Flow/1", masked(template), bundle, settings)
    results = [score_shard(s.index, s, bundle, version, settings) for s in plan.shards]
    assert publish("Flow/1", version, results, masked(template), bundle, settings).published
    assert OnlineStore.from_settings(settings).manifest_field(version, "input") == template
    with Tracker(settings.resolved_database_url) as tracker:
        assert tracker.batch_history(1)[0]["input_uri"] == template

    # A whole presigned URL in one variable, and a wrong password named as a variable.
    signed = f"http://reader:s3cr%25t@{address}/rows.csv?X-Amz-Signature=abc123"
    monkeypatch.setenv("SIGNED_URL", signed)
    plan = plan_shards("${SIGNED_URL}", ["a", "b"], 100, "Flow/2", settings)
    assert {p.file.uri for s in plan.shards for p in s.pieces} == {"${SIGNED_URL}"}
    assert sum(b.rows for s in plan.shards for b in read_shard(s, settings)) == 300
    monkeypatch.setenv("SRC_PASSWORD", "wrong-pass")
    with pytest.raises(InputError) as error:
        plan_shards(template, ["a", "b"], 100, "Flow/3", settings)
    assert "401" in str(error.value) and template in str(error.value)
    assert "wrong-pass" not in str(error.value)


def test_a_folder_named_by_a_variable_keeps_the_template_in_the_plan(
    tmp_path, settings_for, monkeypatch
):
    from batchscore.batch.shards import plan_shards

    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")})
    folder = tmp_path / "private-folder"
    folder.mkdir()
    for name in ("a", "b"):
        pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]}).to_parquet(folder / f"{name}.parquet")
    monkeypatch.setenv("INPUT_DIR", str(folder))
    for given in ("${INPUT_DIR}", "${INPUT_DIR}/*.parquet"):
        plan = plan_shards(given, ["a", "b"], None, "Flow/1", settings)
        uris = [p.file.uri for s in plan.shards for p in s.pieces]
        assert uris == ["${INPUT_DIR}/a.parquet", "${INPUT_DIR}/b.parquet"], given
