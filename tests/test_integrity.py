"""What the toolkit reads back is what it wrote: an export's files against the sha256 its manifest recorded,
benchmark records against their own checksums; and the holes the generated-input suites found (each test here
failed before its fix)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from distill.errors import UsageError


@pytest.fixture(scope="module")
def export_dir(teacher_file, tmp_path_factory):
    from export.onnx import ExportOptions, export_onnx

    out = tmp_path_factory.mktemp("export") / "e"
    export_onnx(str(teacher_file), out, ExportOptions(), log=lambda *a: None)
    return out


def _one_line(r, *needles) -> str:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_an_export_whose_files_differ_from_its_manifest_is_refused_in_one_line(export_dir, tmp_path, distill_main,
                                                                               damage):
    import shutil

    copy = tmp_path / "e"
    shutil.copytree(export_dir, copy)
    graph = copy / "model.onnx"
    data = bytearray(graph.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        graph.write_bytes(bytes(data))
    elif damage == "truncate":
        graph.write_bytes(bytes(data[:1000]))
    else:
        graph.unlink()
    r = distill_main("sample", copy, "--seeds", "0", "--out", tmp_path / "s")
    _one_line(r, "model.onnx", "export again")
    assert not (tmp_path / "s").exists()
    # the intact export still works
    assert distill_main("sample", export_dir, "--seeds", "0", "--out", tmp_path / "ok").returncode == 0


def test_an_export_folder_has_a_folder_s_usual_permissions(export_dir):
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(export_dir.stat().st_mode) == 0o777 & ~umask


def test_a_benchmark_record_that_fails_its_checksum_is_left_out_with_a_note(tmp_path, monkeypatch):
    from benchmarks.bench import speed as bs

    path = tmp_path / "speed.jsonl"
    rows = [{"config": f"c{i}", "quality_id": f"q{i}", "sample_ms": 1.0 + i} for i in range(3)]
    bs.append_jsonl(path, rows)
    assert bs.read_jsonl(path, ("config",)) == rows
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"sample_ms": 2.0', '"sample_ms": 0.2')  # edited by hand, or a flipped bit
    lines.append(json.dumps({"config": "c9", "quality_id": "q9", "sample_ms": 9.0}))  # no checksum
    lines.append(json.dumps({"id": "x", bs.RECORD_SUM: bs.record_sum({"id": "x"})}))  # whole, but no config
    path.write_text("\n".join(lines) + "\n")
    notes = []
    monkeypatch.setattr(bs.LOG, "warning", notes.append)
    kept = bs.read_jsonl(path, ("config",))
    assert kept == [rows[0], rows[2]]
    assert len(notes) == 1 and "3 record(s)" in notes[0] and "measured again" in notes[0]


def test_bench_report_of_records_that_are_not_whole_is_one_line(tmp_path, distill_main):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "speed.jsonl").write_text('{"id": "x"}\nnot json\n')
    _one_line(distill_main("bench", "report", tmp_path / "results", "--dest", tmp_path / "r"), "no speed results")
    assert not (tmp_path / "r").exists()


def test_an_error_about_several_options_names_them_not_the_stage(tmp_path, distill_main):
    line = _one_line(distill_main("export", "tensorrt", tmp_path / "none", "--min-batch", "8", "--max-batch", "2",
                                  "--dry-run", "--out", tmp_path / "o"))
    assert line.startswith("error: --min-batch/--opt-batch/--max-batch: need 1 <= min"), line
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "teacher": "mnist", "exports": [
        {"name": "e", "model": "teacher"}, {"name": "trt", "kind": "tensorrt", "source": "e", "min_batch": 8,
                                            "max_batch": 2}]}))
    line = _one_line(distill_main("run", recipe, "--dry-run"))
    assert "exports[1]: min_batch/opt_batch/max_batch: need 1 <= min" in line, line


def test_a_destination_root_cannot_write_is_refused_before_anything_is_written(tmp_path, distill_main, monkeypatch):
    from distill.preflight import check_output_dir

    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    with pytest.raises(UsageError, match="not writable"):
        check_output_dir(Path("/proc/distill-test"), "--out")  # os.access says yes to root there
    monkeypatch.chdir(tmp_path)
    _one_line(distill_main("card", "mnist", "--dest", "/proc/distill-test"), "--dest", "not writable")
    _one_line(distill_main("run", "quickstart", "--out", "/proc/distill-test"), "--out", "not writable")
    # a bad model among several: no card is written, and no --dest folder made
    _one_line(distill_main("card", "mnist", "missing.safetensors", "--dest", tmp_path / "cards"), "missing")
    assert not (tmp_path / "cards").exists()


@pytest.mark.parametrize("command", ["quality", "speed"])
def test_a_second_benchmark_on_the_same_folder_is_one_line(teacher_file, tmp_path, distill_main, command):
    """Two benchmark processes on one folder would interleave their records and (speed) skew each other's
    timings: the second is refused while the first holds the folder."""
    from distill.rundir import run_lock

    out = tmp_path / "b"
    args = ["bench", command, "--models", teacher_file, "--samplers", "ddim", "--steps", "2", "--backends", "eager",
            "--precisions", "fp32", "--out", out]
    args += ["--samples", "40", "--data", "digits", "--metrics", "fd"] if command == "quality" else \
        ["--repeats", "3", "--max-seconds", "0.1", "--rounds", "1"]
    with run_lock(out):
        _one_line(distill_main(*args), str(out), "another distill run")
    assert not (out / f"{command}.jsonl").exists()
