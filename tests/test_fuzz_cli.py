"""Generated command lines (hypothesis, 500 per run) over every ``distill`` command, built from the commands' own
click parameters: option values well-typed, out of range or junk; models, exports and folders drawn from a pool of
good, corrupt, truncated, empty, foreign and missing files; output folders new, non-empty, a file, unwritable.

Each invocation works or ends with exactly one ``error:`` line and exit code 2, never a traceback; a failed one
leaves no output folder behind and the files already in an existing folder intact. To keep the suite fast, the
expensive work is cut off where it starts (the first network evaluation, a trainer's loop): an invocation that
gets that far has passed every check that can fail on its input, which counts as "works"."""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import click
import pytest
import torch
from fuzz import FUZZ, JUNK, check_outcome
from hypothesis import given
from hypothesis import strategies as st


class Reached(BaseException):
    """Raised where the real work starts (BaseException: no ``except Exception`` in the toolkit swallows it)."""


@pytest.fixture(scope="module")
def pool(teacher_file, tmp_path_factory):
    """Absolute paths of the inputs the generated command lines draw from."""
    from export.onnx import ExportOptions, export_onnx

    root = tmp_path_factory.mktemp("pool")
    good = root / "tiny.safetensors"
    shutil.copy(teacher_file, good)
    data = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF  # a byte inside the tensor data
    (root / "flipped.safetensors").write_bytes(bytes(flipped))
    (root / "random.safetensors").write_bytes(os.urandom(4096))
    (root / "empty.safetensors").write_bytes(b"")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(root / "bare.safetensors"))  # no metadata
    (root / "text.yaml").write_text("steps: [unclosed\n")
    (root / "empty_dir").mkdir()
    export = root / "export"
    export_onnx(str(good), export, ExportOptions(), log=lambda *a: None)
    for name, damage in (("export_badonnx", "onnx"), ("export_badmanifest", "manifest"),
                         ("export_nomanifest", "none")):
        shutil.copytree(export, root / name)
        if damage == "onnx":
            graph = root / name / "model.onnx"
            graph.write_bytes(graph.read_bytes()[:1000])
        elif damage == "manifest":
            (root / name / "manifest.json").write_text('{"format": "distill.export/1", "graph": ')
        else:
            (root / name / "manifest.json").unlink()
    (root / "results").mkdir()
    (root / "results" / "speed.jsonl").write_text('{"id": "x"}\nnot json\n')
    return root


MODEL_NAMES = ["tiny.safetensors", "truncated.safetensors", "flipped.safetensors", "random.safetensors",
               "empty.safetensors", "bare.safetensors", "text.yaml", "empty_dir", "export", "export_badonnx",
               "export_badmanifest", "export_nomanifest", "results"]
OTHER_MODELS = ["mnist", "mnist-1step", "mnist-cd", "mnist-4step-guided", "missing.safetensors", "nope/", "",
                "factory:", "factory:no_such_module:build", "diffusers:", "-"]
OUTS = ["new_out", "existing", "a_file.txt", "/proc/distill_fuzz", "new_out/deeper", ""]

# string options: values by what the option holds
LISTS = st.sampled_from(["1", "2", "4", "1,2", "0", "-1", "8,4", "1,,2", "a", "", "1e9", "0.3", "0.3,0.6", "2.0",
                         "nan", "inf", "1-3", "fp32", "eager", "1,1"])
SEEDS = st.sampled_from(["0-3", "0,1,2", "0,0,1", "3-1", "a-b", "-1", "0-", "", "5", "0-2,2", "1e3", "0-7"])
STRING_VALUES = {
    "seeds": SEEDS, "classes": st.sampled_from(["0-9", "3", "0,0", "10", "-1", "a", "", "0-3"]),
    "data": st.sampled_from(["digits", "mnist", "nodata", "", "digits:8", "folder:/nonexistent", "cifar10"]),
    "device": st.sampled_from(["cpu", "cuda", "cuda:7", "tpu", "", "mps"]),
    "grid": st.sampled_from(["mnist-cpu", "missing.yaml", "", "TEXT"]),
    "metrics": st.sampled_from(["fd", "fd,acc", "fid", "kid,acc", "nope", "", "fd,fd"]),
    "overrides": st.sampled_from(["stages.pd.round_steps=3", "teacher.steps=2", "x", "a=b=c", "=1", "stages=[]",
                                  "stages.0.kind=nope"]),
    "recipe": st.sampled_from(["recipes/quickstart.yaml", "recipes/digits-ci.yaml", "missing.yaml", "TEXT", ""]),
    "name": st.sampled_from(["report", "", "../up", "a/b"]),
    "command_text": st.sampled_from(["distill bench", ""]),
    "channel_mult": st.sampled_from(["1,2", "1", "0", "1,a", "", "1,2,2,2,2,2"]),
    "attn": st.sampled_from(["4", "", "3", "a", "4,8"]),
    "exclude": st.sampled_from(["", "conv_in", "nope", "*"]),
    "use_exports": st.sampled_from(["EXPORT", "missing", ""]),
}
MODEL_ARGS = {"model", "models", "teacher", "source", "run", "path", "init", "results", "compare"}


def _ints(param) -> st.SearchStrategy:
    lo = getattr(param.type, "min", None)
    hi = getattr(param.type, "max", None)
    lo = 0 if lo is None else lo
    inside = st.integers(lo, min(hi if hi is not None else lo + 8, lo + 8))
    return st.one_of(inside, inside, inside, st.integers(-3, 10**7).map(str), st.sampled_from(["x", "", "1.5", "nan"]))


def _value(param, root: Path) -> st.SearchStrategy:
    """A value for one option or argument."""
    t, name = param.type, param.name
    good = st.sampled_from(["tiny.safetensors", "export"]).map(lambda n: str(root / n)) | st.sampled_from(
        ["mnist", "mnist-1step", "mnist-cd"])
    models = st.one_of(good, good, st.sampled_from(MODEL_NAMES).map(lambda n: str(root / n)),
                       st.sampled_from(OTHER_MODELS))
    if name in MODEL_ARGS:
        return models
    if name in ("out", "dest", "exports", "notes_dir", "timing_cache", "bench"):
        return st.one_of(st.just("new_out"), st.just("new_out"),
                         st.sampled_from(OUTS + ([str(root / "results")] if name == "bench" else [])))
    if name == "config":
        return st.sampled_from([str(root / "text.yaml"), "missing.yaml", "recipes/mnist-students.yaml",
                                str(root / "tiny.safetensors")])
    if isinstance(t, click.Choice):
        return st.one_of(*[st.sampled_from(list(t.choices))] * 4, st.just("nope"))
    if isinstance(t, click.types.IntRange) or t is click.INT:
        return _ints(param)
    if name in STRING_VALUES:
        return STRING_VALUES[name]
    if t.name in ("float", "finite") or "Finite" in type(t).__name__:
        return st.one_of(st.floats(0.0, 2.0, allow_nan=False).map(lambda v: f"{v:g}"),
                         st.floats(-1.0, 10.0, allow_nan=False).map(lambda v: f"{v:g}"),
                         st.sampled_from(["nan", "inf", "-inf", "x", "", "0", "1e400"]))
    return st.one_of(LISTS, JUNK.map(str))


def _commands():
    from distill.app.cli import cli

    out = []

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for n, c in sorted(cmd.commands.items()):
                walk(c, [*path, n])
        else:
            out.append((path, cmd))

    walk(cli, [])
    return out


COMMANDS = _commands()


def invocation(root: Path) -> st.SearchStrategy:
    """``[*command path, *arguments, *options]`` for one command, options in random order."""
    def for_command(entry):
        path, cmd = entry
        args = [p for p in cmd.params if isinstance(p, click.Argument)]
        opts = [p for p in cmd.params if isinstance(p, click.Option) and p.name != "help"]
        required = [p for p in opts if p.required]
        optional = [p for p in opts if not p.required]

        def option(p):
            if p.is_flag:
                return st.sampled_from([p.opts[0], *p.secondary_opts]).map(lambda f: [f])
            return _value(p, root).map(lambda v, p=p: [p.opts[0], str(v)])

        parts = [st.lists(_value(a, root).map(str), min_size=1, max_size=2) if a.nargs == -1
                 else _value(a, root).map(lambda v: [str(v)]) for a in args]
        # a required option left out now and then (click's own message)
        parts += [st.one_of(option(p), option(p), option(p), st.just([])) for p in required]
        chosen = st.lists(st.sampled_from(optional), max_size=min(4, len(optional)), unique_by=lambda p: p.name) \
            if optional else st.just([])
        tail = chosen.flatmap(lambda ps: st.tuples(*(option(p) for p in ps)) if ps else st.just(()))
        return st.tuples(st.tuples(*parts) if parts else st.just(()), tail).map(
            lambda pt: path + [x for part in pt[0] for x in part] + [x for part in pt[1] for x in part])

    return st.sampled_from(COMMANDS).flatmap(for_command)


@pytest.fixture
def cut_off_work(monkeypatch):
    """Raise :class:`Reached` at the first network evaluation and at a trainer's loop."""
    import distill.denoiser
    import distill.training

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(distill.denoiser.Denoiser, "forward", reached)
    monkeypatch.setattr(distill.training.Trainer, "fit", reached)
    import onnxruntime

    import benchmarks.bench.speed
    import benchmarks.metrics

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", reached)
    monkeypatch.setattr(benchmarks.bench.speed, "isolated", reached)  # the timed calls run in a fresh process
    monkeypatch.setattr(benchmarks.metrics.Quality, "prepare", reached)  # the reference features


_count = itertools.count()
SEEN = {"ok": 0, "error": 0, "reached": 0}
ROOT = Path(__file__).resolve().parents[1]


@FUZZ
@given(data=st.data())
def test_a_generated_command_line_works_or_fails_in_one_line(pool, tmp_path, distill_main, cut_off_work, data):
    argv = data.draw(invocation(pool))
    here = tmp_path / str(next(_count))
    (here / "existing").mkdir(parents=True)
    (here / "existing" / "keep.txt").write_text("keep")
    (here / "a_file.txt").write_text("a file")
    (here / "recipes").symlink_to(ROOT / "recipes")
    argv = [{"TEXT": str(pool / "text.yaml"), "EXPORT": str(pool / "export")}.get(a, a) for a in argv]
    threads = torch.get_num_threads()
    os.chdir(here)
    try:
        r = distill_main(*argv)
    except Reached:
        SEEN["reached"] += 1
        return
    finally:
        os.chdir(tmp_path)
        torch.set_num_threads(threads)
        assert (here / "existing" / "keep.txt").read_text() == "keep", argv
        assert (here / "a_file.txt").read_text() == "a file", argv
    outcome = check_outcome(r.returncode, r.stdout, r.stderr)
    SEEN[outcome] += 1
    if outcome == "error":
        assert not (here / "new_out").exists(), (argv, r.stderr)


def test_the_generated_command_lines_reach_every_outcome():
    """Not degenerate: the run above had command lines that worked, reached the work, and failed (this module's
    tests run in order in one worker)."""
    if sum(SEEN.values()) == 0:
        pytest.skip("the generated command-line test did not run in this process")
    n = sum(SEEN.values())
    print(f"outcomes of {n} generated cases: {SEEN}")  # shown with pytest -rP
    assert SEEN["error"] >= n / 10 and SEEN["reached"] + SEEN["ok"] >= n / 10, SEEN
