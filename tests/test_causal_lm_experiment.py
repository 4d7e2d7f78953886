"""experiments/causal_lm.py end to end on a tiny scale: tokenizer, random Llama, pretraining
and prose adaptation through `jlora finetune` with the committed configs, generations, and
the report."""

from __future__ import annotations

import json
import shutil

import pytest

from experiments import causal_lm as E


def test_splits_are_disjoint_and_seeded():
    train, held = E.prose_split(0, E.FULL)
    assert train and held and not set(train) & set(held)
    assert E.prose_split(0, E.FULL) == (train, held)
    assert E.prose_split(1, E.FULL) != (train, held)
    code_train, code_held = E.code_split(0, E.TINY)
    assert code_train and code_held and not set(code_train) & set(code_held)
    assert not any("pydoc_data" in t[:200] for t in code_train)  # the prose is not pretrained


def test_configs_parse_and_differ_only_where_meant():
    from jlora.cli.parse import parse

    names = ["causal_lm_pretrain", "causal_lm_prose_full",
             *(f"causal_lm_prose_lora_r{r}" for r in E.FULL.ranks)]
    cfgs = {n: parse(["finetune", "--config", str(E.CONFIGS / f"{n}.yaml"), "--model", "m",
                      "--out", "o"]) for n in names}
    assert cfgs["causal_lm_pretrain"].full and cfgs["causal_lm_prose_full"].full
    lora = [cfgs[f"causal_lm_prose_lora_r{r}"] for r in E.FULL.ranks]
    assert [c.lora.rank for c in lora] == list(E.FULL.ranks)
    assert all((c.optim, c.train, c.data, c.lora.alpha) ==
               (lora[0].optim, lora[0].train, lora[0].data, lora[0].lora.alpha) for c in lora)
    assert lora[0].train == cfgs["causal_lm_prose_full"].train
    assert all(not c.full and c.lora.to_config().targets == "all-linear" for c in lora)
    for f in E.CONFIGS.glob("causal_lm*.yaml"):  # every committed config is one of them
        assert f.stem in names, f


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("causal_lm")
    report = E.run(tmp / "work", seed=0, scale=E.TINY, jlora=E.inprocess_jlora,
                   results=tmp / "results")
    return report, tmp


@pytest.mark.slow
def test_tiny_pipeline(tiny):
    report, tmp = tiny
    assert set(report["adapt"]) == {"full", "lora_r4"}
    full, lora = report["adapt"]["full"], report["adapt"]["lora_r4"]
    assert full["trainable"] == report["data"]["params"] > lora["trainable"] > 0
    assert report["configs"]["lora_r4"]["lora"]["rank"] == 4
    assert report["configs"]["pretrain"]["full"] and report["pretrain"]["steps"] == 2
    for a in (report["pretrain"], full, lora):
        assert a["ppl_best"] <= a["ppl_before"] and a["step_s"] > 0
    assert full["code_ppl_after"] > 0 and lora["code_ppl_after"] > 0
    assert set(report["generations"]) == {"pretrained", "full", "lora_r4"}
    assert all(len(g) == len(E.PROMPTS) for g in report["generations"].values())
    assert report["data"]["chars_per_token"]["prose_eval"] > 1.0
    written = json.loads((tmp / "results" / "causal_lm.json").read_text())
    assert written["adapt"]["lora_r4"]["trainable"] == lora["trainable"]
    md = (tmp / "results" / "causal_lm.md").read_text()
    assert "LoRA r=4" in md and "full fine-tuning" in md and "Generations" in md
    assert (tmp / "results" / "causal_lm.png").stat().st_size > 10_000


@pytest.mark.slow
def test_resume_keeps_finished_runs_and_rebuilds_the_same_base(tiny):
    report, tmp = tiny
    work = tmp / "work"
    before = {f: (work / "base" / f).read_bytes() for f in ("tokenizer.json",
                                                            "model.safetensors")}
    shutil.rmtree(work / "runs" / "prose_lora_r4")  # as if it had failed
    calls = []

    def jlora(argv):
        calls.append(argv[0])
        return E.inprocess_jlora(argv)

    with pytest.raises(SystemExit, match="seed 0"):
        E.run(work, seed=1, scale=E.TINY, jlora=jlora, results=None, resume=True)
    again = E.run(work, seed=0, scale=E.TINY, jlora=jlora, results=None, resume=True)
    assert calls.count("finetune") == 1  # only the missing run
    assert {f: (work / "base" / f).read_bytes() for f in before} == before  # same seed, same
    assert again["resumed"] and again["pretrain"] == report["pretrain"]
    assert again["adapt"]["full"]["ppl_best"] == report["adapt"]["full"]["ppl_best"]
    assert again["adapt"]["lora_r4"]["ppl_best"] == pytest.approx(
        report["adapt"]["lora_r4"]["ppl_best"], rel=1e-5)  # the rerun: same seed, same run


def test_work_directory_of_other_files_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit, match="did not write"):
        E.prepare(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep"
