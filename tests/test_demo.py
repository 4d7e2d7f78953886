"""`make demo` runs end to end (a short version) and writes what it says."""

import pytest

from jlora import demo


@pytest.mark.slow
def test_demo_runs_and_exports(tmp_path, capsys):
    result = demo.main(["--steps", "3", "--batch", "8", "--out", str(tmp_path)])
    assert result["merge_diff"] < 1e-5
    assert len(result["losses"]) == 3 and all(loss == loss for loss in result["losses"])
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "merged" / "config.json").exists()
    assert (tmp_path / "loss.png").exists()
    out = capsys.readouterr().out
    assert "trainable params:" in out and "held-out top-1 retrieval" in out
