"""`make demo` runs end to end (a short version) through the CLI and writes what it says."""

import pytest

from jlora import demo
from jlora.demo_data import split_by_package, stdlib_pairs


def test_pairs_split_by_package():
    pairs = stdlib_pairs()
    train, test = split_by_package(pairs)
    assert len(pairs) > 2000 and 0.1 < len(test) / len(pairs) < 0.25
    assert not {p["package"] for p in train} & {p["package"] for p in test}
    assert all(p["document"].split(".")[0] == p["package"] for p in pairs)
    assert len({p["query"] for p in pairs}) == len(pairs)


@pytest.mark.slow
def test_demo_runs_and_exports(tmp_path, capsys):
    result = demo.main(["--steps", "3", "--batch-size", "16", "--eval-limit", "48",
                        "--out", str(tmp_path)])
    assert result["peft_diff"] < 1e-4
    assert len(result["losses"]) == 3
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_config.json").exists()
    assert (run / "curves.png").exists() and (run / "metrics.jsonl").exists()
    out = capsys.readouterr().out
    assert "trainable params:" in out and "recall@1 " in out and " -> " in out
    again = demo.main(["--steps", "1", "--batch-size", "16", "--eval-limit", "16",
                       "--out", str(tmp_path), "--no-check-peft"])  # replaces its own run
    assert len(again["losses"]) == 1
