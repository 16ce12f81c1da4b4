"""Hybrid few-step sampling (distill chain) on the tiny 8x8 digits teacher: the chain samples each member at its
level exactly as written out by hand; the level search; integrity of the copied members; one graph when exported;
the mistakes, one line each."""

import json

import torch

from distill.chain import load_chain
from distill.checkpoint import load_denoiser
from distill.denoiser import Cond
from distill.samplers import PerSampleGenerator, alpha_sigma_at, prior_sample


def test_a_chain_runs_each_member_at_its_level(tmp_path, teacher_file, distill_main):
    out = tmp_path / "chain"
    code, stdout, err = distill_main("chain", teacher_file, teacher_file, "--times", "0.5", "--out", out)
    assert code == 0 and "2 steps from t = 1, 0.5" in stdout, err
    record = json.loads((out / "chain.json").read_text())
    assert [m["file"] for m in record["members"]] == ["members/0.safetensors"]  # one copy of a repeated model
    card = record["metadata"]["card"]
    assert card["method"] == "chain" and card["timesteps"] == [1.0, 0.5, 0.0] and card["steps"] == 2
    assert [s["t"] for s in card["chain"]] == [1.0, 0.5] and card["search"] == []
    # by hand: the teacher's clean estimate from the prior at t = 1, noised afresh to t = 0.5, estimated again
    den, chain = load_denoiser(teacher_file), load_chain(out)
    seeds, labels = [3, 5, 7], torch.tensor([1, 2, 3])
    gen = PerSampleGenerator(seeds)
    x = prior_sample(den.schedule, gen, den.image_shape, 1.0)
    with torch.no_grad():
        x0 = den(x, 1.0, Cond(labels))
        a, s = alpha_sigma_at(den.schedule, 0.5)
        expected = den(a * x0 + s * gen.randn(den.image_shape), 0.5, Cond(labels))
    assert torch.allclose(chain.sample(seeds, Cond(labels)), expected, atol=1e-6)
    code, _, err = distill_main("sample", out, "--seeds", "0-9", "--out", tmp_path / "s")
    assert code == 0 and (tmp_path / "s" / "grid.png").is_file(), err
    # another runtime is the fused graph's job; the chain's member copies are checked on loading
    code, _, err = distill_main("sample", out, "--backend", "onnxruntime", "--out", tmp_path / "s2")
    assert code == 2 and "--fused" in err and len(err.strip().splitlines()) == 1
    member = out / "members" / "0.safetensors"
    data = bytearray(member.read_bytes())
    data[-3] ^= 0xFF
    member.write_bytes(bytes(data))
    code, _, err = distill_main("sample", out, "--out", tmp_path / "s3")
    assert code == 2 and "sha256" in err and len(err.strip().splitlines()) == 1


def test_the_search_keeps_the_level_with_the_lowest_fd(tmp_path, teacher_file, distill_main):
    out = tmp_path / "searched"
    code, stdout, err = distill_main("chain", teacher_file, teacher_file, "--levels", "0.3,0.7", "--search-seeds",
                                     "50", "--data", "digits", "--out", out)
    assert code == 0, err
    card = json.loads((out / "chain.json").read_text())["metadata"]["card"]
    rows = card["search"]
    assert [r["t"] for r in rows] == [0.3, 0.7] and all(r["ref"] == "B" and r["n"] == 50 for r in rows)
    assert card["timesteps"][1] == min(rows, key=lambda r: r["fd"])["t"]


def test_a_chain_exports_as_one_graph(tmp_path, teacher_file, distill_main):
    out = tmp_path / "chain"
    assert distill_main("chain", teacher_file, teacher_file, "--times", "0.4", "--out", out).returncode == 0
    code, _, err = distill_main("export", "onnx", out, "--out", tmp_path / "per-step")
    assert code == 2 and "--fused" in err
    code, _, err = distill_main("export", "onnx", out, "--fused", "--out", tmp_path / "graph")
    assert code == 0, err
    manifest = json.loads((tmp_path / "graph" / "manifest.json").read_text())
    assert manifest["kind"] == "sampler" and manifest["timesteps"] == [1.0, 0.4, 0.0]
    assert manifest["noise_slots"] == 1 and manifest["parity"]["max_rel_err"] <= 1e-4
    code, _, err = distill_main("sample", tmp_path / "graph", "--seeds", "0-3", "--out", tmp_path / "s")
    assert code == 0, err


def test_chain_mistakes_are_one_line(tmp_path, teacher_file, distill_main):
    for args, needle in [(["--times", "0.5,0.2"], "one per model after the first"),
                         (["--times", "1.5"], "(0, 1]"),
                         (["--levels", "0.5,2"], "(0, 1)")]:
        code, _, err = distill_main("chain", teacher_file, teacher_file, *args, "--out", tmp_path / "c")
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / "c").exists()


def test_a_recipe_chain_stage_chains_earlier_stages(tmp_path, teacher_file, distill_main):
    """kind: chain names earlier stages (or models); its folder is a model for the stages after it (an export, the
    benchmark), it gets a card, and a second run finds it complete."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: chain-test
teacher: {teacher_file}
stages:
  - {{name: pd, kind: progressive, start_steps: 2, target_steps: 1, round_steps: 2}}
  - {{name: hybrid, kind: chain, models: [pd, teacher], times: [0.4]}}
exports:
  - {{name: hybrid-onnx, model: hybrid, fused: true}}
""")
    runs = tmp_path / "runs"
    code, _, err = distill_main("run", recipe, "--out", runs, "--no-progress")
    assert code == 0, err
    card = json.loads((runs / "hybrid" / "chain.json").read_text())["metadata"]["card"]
    assert [s["t"] for s in card["chain"]] == [1.0, 0.4]
    assert card["chain"][0]["model"].endswith("steps-1/model.safetensors")
    assert "a chain of students" in (runs / "hybrid" / "MODEL_CARD.md").read_text()
    assert (runs / "hybrid-onnx" / "model.onnx").is_file()
    assert json.loads((runs / "hybrid" / "stage.json").read_text())["record"]["steps"] == 2
    code, stdout, err = distill_main("run", recipe, "--out", runs, "--no-progress")
    assert code == 0 and "0 ran, 3 cached" in stdout and "hybrid (chain): done earlier, cached" in err, err


def test_a_recipe_chain_without_models_is_one_line(tmp_path, teacher_file, distill_main):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"teacher: {teacher_file}\nstages:\n  - {{name: c, kind: chain, times: [0.4]}}\n")
    code, _, err = distill_main("run", recipe, "--out", tmp_path / "runs", "--dry-run")
    assert code == 2 and "stages[0].models" in err and len(err.strip().splitlines()) == 1, err


def test_the_shipped_chain_names_the_shipped_members_and_checks_them(tmp_path, distill_main, monkeypatch):
    """``mnist-2nfe`` resolves by name anywhere, holds no copies of its members, and is measured by the benchmark
    under the digest of its chain.json (which records the members' sha256)."""
    from benchmarks.bench.grid import model_sha256
    from distill.chain import CHAIN_FILE, chain_dir, is_chain, read_chain
    from distill.checkpoint import SHIPPED_DIR, file_sha256

    monkeypatch.chdir(tmp_path)
    assert is_chain("mnist-2nfe") and chain_dir("mnist-2nfe") == SHIPPED_DIR / "mnist-2nfe"
    record = read_chain("mnist-2nfe")
    assert [n for _, _, n in record["files"]] == ["mnist-dmd", "mnist-cd"]
    for path, digest, name in record["files"]:
        assert path.resolve() == (SHIPPED_DIR / f"{name}.safetensors").resolve() and file_sha256(path) == digest
    assert sorted(p.name for p in (SHIPPED_DIR / "mnist-2nfe").iterdir()) == [CHAIN_FILE]
    assert model_sha256("mnist-2nfe") == file_sha256(SHIPPED_DIR / "mnist-2nfe" / CHAIN_FILE)
    chain = load_chain("mnist-2nfe")
    assert chain.plan == [(0, 1.0), (1, 0.3)]
    r = distill_main("sample", "mnist-2nfe", "--seeds", "0-1", "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr
    r = distill_main("card", "mnist-2nfe", "--dest", tmp_path / "cards")
    assert r.returncode == 0 and "mnist-dmd" in (tmp_path / "cards" / "mnist-2nfe.md").read_text()


def test_a_grid_runs_a_chain_eagerly_or_fused_and_lists_what_it_leaves_out():
    from benchmarks.bench.grid import build_grid

    grid = build_grid({"models": ["mnist-2nfe"], "batches": [1],
                       "paths": ["eager-fp32", "compile-bf16", "onnxruntime-fp32", "onnxruntime-fused-fp32"]})
    assert sorted(c.backend for c in grid.configs) == ["eager", "onnxruntime-fused"]
    assert sorted(p for p, _ in grid.skipped) == ["compile-bf16 of mnist-2nfe consistency-2",
                                                  "onnxruntime-fp32 of mnist-2nfe consistency-2"]
