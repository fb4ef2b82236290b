"""Property-based tests (hypothesis) of the CelebA label parsers and of --attr / --set parsing."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoo.data.celeba import ATTR_FILE, PARTITION_FILE, read_labels
from zoo.errors import ZooError
from zoo.latent import parse_assignment_list, parse_assignments

ATTRIBUTE = st.from_regex(r"[A-Z][a-z]{0,6}(_[A-Z][a-z]{0,6})?", fullmatch=True)


@st.composite
def label_files(draw):
    """A random but valid pair of CelebA label files, in any official-compatible spelling."""
    names = draw(st.lists(ATTRIBUTE, min_size=1, max_size=6, unique=True))
    count = draw(st.integers(0, 12))
    files = [f"{i + 1:06d}.jpg" for i in range(count)]
    signs = np.array(
        draw(
            st.lists(
                st.lists(st.sampled_from([1, -1]), min_size=len(names), max_size=len(names)),
                min_size=count,
                max_size=count,
            )
        ),
        dtype=np.int8,
    ).reshape(count, len(names))
    partition = draw(st.lists(st.integers(0, 2), min_size=count, max_size=count))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    gap = draw(st.sampled_from([" ", "  ", "\t", " \t "]))
    count_line = draw(st.booleans())  # one public copy of the file lacks the count line
    header = gap.join(names) + draw(st.sampled_from(["", " "]))
    rows = [
        name + "".join(f"{gap}{int(v):2d}" for v in row)
        for name, row in zip(files, signs, strict=True)
    ]
    attr_lines = ([str(count)] if count_line else []) + [header, *rows]
    part_lines = [f"{name}{gap}{code}" for name, code in zip(files, partition, strict=True)]
    ending = draw(st.sampled_from(["", newline]))
    return {
        "names": names, "files": files, "signs": signs, "partition": partition,
        "attr": newline.join(attr_lines) + ending, "part": newline.join(part_lines) + ending,
    }  # fmt: skip


def write(root: Path, attr: str, part: str) -> Path:
    (root / "img_align_celeba").mkdir(exist_ok=True)
    (root / ATTR_FILE).write_bytes(attr.encode())
    (root / PARTITION_FILE).write_bytes(part.encode())
    return root


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label_files())
def test_valid_label_files_parse_exactly(files):
    with tempfile.TemporaryDirectory() as folder:
        labels = read_labels(write(Path(folder), files["attr"], files["part"]))
    assert labels.attr_names == files["names"]
    assert labels.filenames == files["files"]
    assert np.array_equal(labels.signs, files["signs"])
    assert labels.partition.tolist() == files["partition"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label_files().filter(lambda f: len(f["files"]) > 0), st.data())
def test_a_damaged_row_is_a_one_line_error_naming_the_file_and_line(files, data):
    lines = files["attr"].splitlines()
    first_row = len(lines) - len(files["files"])
    row = data.draw(st.integers(first_row, len(lines) - 1))
    damage = data.draw(st.sampled_from(["drop a value", "add a value", "bad value"]))
    fields = lines[row].split()
    if damage == "drop a value":
        fields = fields[:-1]
    elif damage == "add a value":
        fields = [*fields, "1"]
    else:
        column = data.draw(st.integers(1, len(fields) - 1))
        fields[column] = data.draw(st.sampled_from(["0", "2", "yes", "1.0", "--1"]))
    lines[row] = " ".join(fields)
    with tempfile.TemporaryDirectory() as folder, pytest.raises(ZooError) as error:
        read_labels(write(Path(folder), "\n".join(lines) + "\n", files["part"]))
    message = str(error.value)
    assert "\n" not in message and ATTR_FILE in message and f"line {row + 1}" in message


@settings(max_examples=100, deadline=None)
@given(label_files().filter(lambda f: len(f["files"]) > 0), st.data())
def test_a_partition_entry_for_an_unknown_image_is_named(files, data):
    lines = files["part"].splitlines()
    row = data.draw(st.integers(0, len(lines) - 1))
    lines[row] = "999999.jpg " + lines[row].split()[-1]
    with tempfile.TemporaryDirectory() as folder, pytest.raises(ZooError, match=r"999999\.jpg"):
        read_labels(write(Path(folder), files["attr"], "\n".join(lines) + "\n"))


NAMES = ["Smiling", "Male", "Eyeglasses", "Wearing_Hat", "0", "7"]


@given(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(["0", "1"]), st.booleans())))
def test_assignments_round_trip(pairs):
    texts = [
        f"{name}={value}" if explicit or value == "0" else name for name, value, explicit in pairs
    ]
    parsed = parse_assignment_list(texts, NAMES)
    assert parsed == [(name, float(value)) for name, value, _ in pairs]
    assert parse_assignments(texts, NAMES) == dict(parsed)


@given(st.lists(st.text(max_size=20), max_size=4))
def test_any_text_is_parsed_or_refused_in_one_line(texts):
    try:
        parsed = parse_assignments(texts, NAMES)
    except ZooError as error:
        assert "\n" not in str(error)
    else:
        assert set(parsed) <= set(NAMES) and set(parsed.values()) <= {0.0, 1.0}
