"""Learning curves (nanorlhf.plots) and the optional TensorBoard logging of Metrics."""

import glob
import sys

import pytest

from nanorlhf import plots
from nanorlhf.args import BaseArgs, parse_args
from nanorlhf.errors import UserError
from nanorlhf.metrics import Metrics

PNG = b"\x89PNG\r\n\x1a\n"


def log_run(out, rows, **kwargs):
    metrics = Metrics(str(out), **kwargs)
    for step, values in rows:
        metrics.log(step, **values)
    metrics.close()
    return metrics


def test_close_draws_the_curves(tmp_path):
    pytest.importorskip("matplotlib")
    log_run(tmp_path, [(1, {"loss": 2.0, "lr": 1e-3}), (2, {"loss": 1.5, "lr": 1e-3})])
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG)
    assert not glob.glob(str(tmp_path / ".tmp-*"))


def test_close_without_matplotlib_skips_the_plot_silently(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    log_run(tmp_path, [(1, {"loss": 2.0})])
    assert not (tmp_path / "curves.png").exists()
    assert (tmp_path / "metrics.jsonl").exists()


def test_nothing_to_draw_writes_no_file(tmp_path):
    pytest.importorskip("matplotlib")
    log_run(tmp_path, [(1, {"lr": 1e-3})])  # no curve we plot
    assert not (tmp_path / "curves.png").exists()


def test_report_to_tensorboard_logs_every_scalar(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_run(tmp_path, [(1, {"objective/scores": 0.5, "note": "text"}), (2, {"objective/scores": 0.75})],
            report_to="tensorboard")
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert events.Tags()["scalars"] == ["objective/scores"]
    assert [(e.step, e.value) for e in events.Scalars("objective/scores")] == [(1, 0.5), (2, 0.75)]


def test_report_to_tensorboard_without_it_installed_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match="pip install tensorboard"):
        parse_args(BaseArgs, ["--report_to", "tensorboard"])


def test_report_to_accepts_only_known_loggers():
    assert parse_args(BaseArgs, []).report_to == "none"
    with pytest.raises(UserError, match=r"^argument --report_to: invalid choice: 'wandb'"):
        parse_args(BaseArgs, ["--report_to", "wandb"])


def test_cli_overlays_several_runs(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    for name, score in [("a", 0.1), ("b", 0.2)]:
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            f.write(f'{{"step": 1, "objective/scores": {score}, "objective/kl": 0.0}}\n')
    out = tmp_path / "both.png"
    monkeypatch.setattr(sys, "argv", ["plots", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out)])
    plots.main()
    assert out.read_bytes().startswith(PNG)


def test_cli_names_a_run_without_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["plots", str(tmp_path)])
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plots.main()


def test_runs_are_named_by_the_fewest_path_parts_that_tell_them_apart():
    assert plots.short_names(["runs/a/seed-1", "runs/b/seed-1"]) == ["a/seed-1", "b/seed-1"]
    assert plots.short_names(["runs/ppo", "other/ppo2"]) == ["ppo", "ppo2"]
