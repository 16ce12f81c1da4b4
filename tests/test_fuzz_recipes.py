"""Generated recipes (hypothesis, 500 per run): each one, through ``distill run RECIPE --dry-run``, either resolves
to a plan or fails with exactly one ``error:`` line and exit code 2 (no traceback), and the dry run writes nothing.
The recipes mix well-typed stage, export, benchmark and gate entries (with references to earlier, later, missing
and duplicate stage names) with junk values, unknown keys, wrong kinds and wrong shapes."""

from __future__ import annotations

import itertools

import yaml
from fuzz import FUZZ, JUNK, check_outcome, config_fields, yaml_safe
from hypothesis import given
from hypothesis import strategies as st

from distill.app.gates import GATE_KINDS
from distill.app.recipe import EXPORT_KINDS, STAGE_KINDS
from distill.app.stages.bench import BenchConfig, ModelEntry
from distill.app.stages.train import TeacherConfig

NAMES = ["pd", "cd", "dmd", "hy", "fp32", "int8"]
MODELS = ["teacher", "mnist", "mnist-1step", "mnist-cd", "missing.safetensors", "runs/none", ""]
REFS = st.one_of(st.sampled_from(NAMES + MODELS), st.text(max_size=5))
REF = st.sampled_from(NAMES + ["teacher", "teacher", "mnist", "mnist-1step", "mnist-cd"])  # mostly resolvable
SMALL = st.integers(1, 400)


def _opt(**fields) -> dict:
    return fields


# -- well-formed entries: each kind's usual fields with in-range values (references may still be unresolvable) --
GOOD_STAGE = st.one_of(
    st.fixed_dictionaries(
        {"name": st.sampled_from(NAMES), "kind": st.just("progressive"), "teacher": REF},
        optional=_opt(start_steps=st.sampled_from([4, 8, 16, 64, 6]), target_steps=st.sampled_from([1, 2, 4]),
                      round_steps=st.lists(SMALL, min_size=1, max_size=4), lr=st.floats(1e-6, 1e-2),
                      batch_size=st.integers(1, 256), first_map=st.sampled_from(["ddim", "dpmpp_2m"]),
                      guidance_range=st.sampled_from([[0.0, 2.0], [0.0, 4.0]]), precision=st.just("fp32"))),
    st.fixed_dictionaries(
        {"name": st.sampled_from(NAMES), "kind": st.just("consistency"), "teacher": REF},
        optional=_opt(mode=st.sampled_from(["cd", "ct"]), steps=SMALL, scales=st.integers(2, 200),
                      max_steps=st.integers(1, 16), search_samples=st.integers(0, 500),
                      noise_sampling=st.sampled_from(["uniform", "lognormal", "ect"]),
                      target_decay=st.floats(0, 0.99), from_scratch=st.booleans())),
    st.fixed_dictionaries(
        {"name": st.sampled_from(NAMES), "kind": st.just("dmd"), "teacher": REF},
        optional=_opt(init=REF, steps=SMALL, gen_steps=st.integers(1, 4), fake_updates=st.integers(1, 8),
                      gan_weight=st.floats(0, 1), t_min=st.floats(0.01, 0.2), t_max=st.floats(0.5, 1.0))),
    st.fixed_dictionaries(
        {"name": st.sampled_from(NAMES), "kind": st.just("chain"), "models": st.lists(REF, min_size=1, max_size=3)},
        optional=_opt(times=st.lists(st.floats(0.05, 0.95), max_size=2), search_seeds=st.integers(50, 1000))),
)
GOOD_EXPORT = st.one_of(
    st.fixed_dictionaries(
        {"name": st.sampled_from(NAMES), "model": REF},
        optional=_opt(precision=st.sampled_from(["fp32", "fp16", "int8"]), fused=st.booleans(),
                      steps=st.integers(1, 8), calib_samples=st.integers(1, 64),
                      int8_target=st.sampled_from(["cpu", "tensorrt"]))),
    st.fixed_dictionaries(
        {"name": st.sampled_from(NAMES), "kind": st.just("tensorrt"), "source": REF},
        optional=_opt(dry_run=st.just(True), max_batch=st.integers(1, 512), min_batch=st.integers(1, 8))),
    st.fixed_dictionaries({"name": st.sampled_from(NAMES), "kind": st.just("diffusers"), "model": REF},
                          optional=_opt(steps=st.integers(1, 8))),
)
GOOD_BENCH = st.fixed_dictionaries(
    {"models": st.lists(st.one_of(REF, st.fixed_dictionaries(
        {"model": REF}, optional=_opt(samplers=st.just(["dpmpp_2m"]), steps=st.lists(st.integers(1, 20), max_size=2)))),
        min_size=1, max_size=3)},
    optional=_opt(backends=st.lists(st.sampled_from(["eager", "onnxruntime", "compile"]), max_size=2, unique=True),
                  precisions=st.lists(st.sampled_from(["fp32", "int8", "bf16", "fp16"]), max_size=2, unique=True),
                  batches=st.lists(st.sampled_from([1, 8, 64]), min_size=1, max_size=2, unique=True),
                  samples=st.integers(1, 2500), metrics=st.just(["fd", "acc"]), report_batch=st.sampled_from([1, 64])))
GOOD_GATE = st.one_of(
    st.fixed_dictionaries({"kind": st.just("quality"), "model": REF, "max_ratio": st.floats(1.0, 10.0)}),
    st.fixed_dictionaries({"kind": st.just("speedup"), "model": REF, "min": st.floats(0.5, 100.0)},
                          optional=_opt(batch=st.sampled_from([1, 64]))),
    st.fixed_dictionaries({"kind": st.just("parity"), "export": REF}),
    st.fixed_dictionaries({"kind": st.just("int8_drop"), "model": REF, "max_ratio": st.floats(1.0, 4.0)}),
    st.fixed_dictionaries({"kind": st.just("pick")}, optional=_opt(max_ratio=st.floats(1.0, 4.0))),
)
GOOD_TEACHER = st.one_of(st.sampled_from(["mnist", "mnist", "mnist-4step"]), st.fixed_dictionaries(
    {"data": st.just("digits")}, optional=_opt(channels=st.sampled_from([8, 16]), steps=SMALL,
                                               channel_mult=st.just([1, 2]), attn=st.just([]))))
GOOD = st.fixed_dictionaries({"name": st.just("fuzz"), "teacher": GOOD_TEACHER}, optional=_opt(
    stages=st.lists(GOOD_STAGE, max_size=4), exports=st.lists(GOOD_EXPORT, max_size=3), benchmark=GOOD_BENCH,
    gates=st.lists(GOOD_GATE, max_size=3), precision=st.sampled_from(["auto", "fp32"]), threads=st.integers(1, 2)))


# -- anything a config field allows by type, and junk: entries of a (maybe wrong) kind with random fields --
def _entry(kinds: dict, kind_key: str | None = "kind") -> st.SearchStrategy:
    """A stage or export entry: a name (maybe repeated), a kind (maybe wrong), fields of that kind's config."""
    def build(kind):
        cls = kinds.get(kind) or next(iter(kinds.values()))
        head = {"name": st.one_of(st.sampled_from(NAMES), JUNK)}
        if kind_key:
            head[kind_key] = st.just(kind)
        head = st.fixed_dictionaries({}, optional=head)
        return st.tuples(head, config_fields(cls, REFS, skip=("name", "kind"))).map(lambda p: {**p[0], **p[1]})

    return st.one_of(st.sampled_from(list(kinds)), st.text(max_size=6)).flatmap(build)


STAGE = _entry(STAGE_KINDS)
EXPORT = _entry(EXPORT_KINDS)
GATE = st.sampled_from(list(GATE_KINDS) + ["qualty"]).flatmap(
    lambda kind: config_fields(GATE_KINDS.get(kind, GATE_KINDS["quality"]), REFS, skip=("kind",)).map(
        lambda fields: {"kind": kind, **fields}))
MODEL_ENTRY = st.one_of(st.sampled_from(NAMES + MODELS),
                        st.tuples(st.sampled_from(NAMES + MODELS), config_fields(ModelEntry, REFS, skip=("model",)))
                        .map(lambda p: {"model": p[0], **p[1]}))
BENCH = st.tuples(st.lists(MODEL_ENTRY, max_size=3), config_fields(BenchConfig, REFS, skip=("models",))).map(
    lambda p: {"models": p[0], **p[1]})
TEACHER = st.one_of(st.sampled_from(["mnist", "mnist-4step", "missing.safetensors", "runs/none"]), JUNK,
                    st.tuples(st.sampled_from(["digits", "mnist", "nodata"]), config_fields(TeacherConfig, REFS))
                    .map(lambda p: {"data": p[0], **p[1]}))
SECTIONS = {"teacher": TEACHER, "stages": st.one_of(st.lists(STAGE, max_size=3), JUNK),
            "exports": st.one_of(st.lists(EXPORT, max_size=3), JUNK), "benchmark": st.one_of(BENCH, JUNK),
            "gates": st.one_of(st.lists(GATE, max_size=3), JUNK), "precision": JUNK, "threads": JUNK, "seed": JUNK,
            "name": JUNK, "extra": JUNK}


@st.composite
def mutated(draw) -> dict:
    """A well-formed recipe with one to three sections, entries or values replaced by generated ones."""
    recipe = draw(GOOD)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["section", "entry", "value", "drop"]))
        lists = [k for k in ("stages", "exports", "gates") if isinstance(recipe.get(k), list) and recipe[k]]
        if where == "section" or not lists:
            key = draw(st.sampled_from(sorted(SECTIONS)))
            recipe[key] = draw(SECTIONS[key])
            continue
        key = draw(st.sampled_from(lists))
        entries = recipe[key]
        i = draw(st.integers(0, len(entries) - 1))
        if where == "entry":
            entries[i] = draw({"stages": STAGE, "exports": EXPORT, "gates": GATE}[key])
        elif where == "drop" and isinstance(entries[i], dict) and entries[i]:
            entries[i].pop(draw(st.sampled_from(sorted(entries[i]))))
        elif isinstance(entries[i], dict):
            entries[i][draw(st.sampled_from(sorted(entries[i]) + ["extra_key"]))] = draw(JUNK.map(yaml_safe))
    return recipe


RECIPE = st.one_of(GOOD, mutated(), mutated())

_count = itertools.count()
SEEN = {"ok": 0, "error": 0}


@FUZZ
@given(recipe=RECIPE, as_json=st.booleans())
def test_a_generated_recipe_plans_or_fails_in_one_line(tmp_path, distill_main, monkeypatch, recipe, as_json):
    folder = tmp_path / str(next(_count))
    folder.mkdir()
    monkeypatch.chdir(folder)  # relative names in the recipe resolve here, whatever an earlier test left
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = folder / "out"
    r = distill_main("run", path, "--dry-run", "--out", out, *(["--json"] if as_json else []))
    SEEN[check_outcome(r.returncode, r.stdout, r.stderr, '"plan"' if as_json else "# plan:")] += 1
    assert not out.exists(), f"a dry run wrote {sorted(p.name for p in out.iterdir())}"


def test_the_generated_recipes_reach_both_outcomes():
    """The generator is not degenerate: in the run above, recipes both planned and failed (this module's tests run
    in order in one worker, tests/conftest.py)."""
    if sum(SEEN.values()) == 0:
        import pytest

        pytest.skip("the generated-recipe test did not run in this process")
    n = sum(SEEN.values())
    print(f"outcomes of {n} generated cases: {SEEN}")  # shown with pytest -rP
    assert SEEN["ok"] >= n / 10 and SEEN["error"] >= n / 10, SEEN
