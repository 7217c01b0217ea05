"""`ibscope run` config validation, stage skipping, and CLI error paths."""

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ibscope.cli.main import app
from ibscope.errors import UsageError
from ibscope.pipeline import (PACKAGED_CONFIGS, RunConfig, Stage, StageRunner, deep_merge, describe_schema,
                              load_config, parse_overrides)

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"factory": "ibscope.demo.models:ib_net"}, "data": {"task": "twelve-bit"}, "train": {"epochs": 5}}


def write(tmp_path, cfg, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg) if not isinstance(cfg, str) else cfg)
    return p


# ---------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["demo-tanh", "demo-relu", "digits"])
def test_packaged_configs_validate_and_match_repo_copies(name):
    repo, pkg = ROOT / "configs" / f"{name}.yaml", PACKAGED_CONFIGS / f"{name}.yaml"
    assert repo.read_text() == pkg.read_text()  # ibscope/configs/ is the installed copy of configs/
    cfg, base, _ = load_config(repo)
    assert base == repo.parent and cfg.name == {"demo-tanh": "tanh", "demo-relu": "relu"}.get(name, name)
    quick, _, _ = load_config(name, quick=True)  # by packaged name, with the quick overrides
    assert quick.train.epochs < cfg.train.epochs
    assert quick.estimate == cfg.estimate  # quick shortens training (and may subsample), same estimators


def test_defaults_and_normalisation(tmp_path):
    cfg, _, _ = load_config(write(tmp_path, {**MINIMAL, "capture": {"layers": "hidden1"}, "train": {"lr": "1e-2"}}))
    assert cfg.name == "cfg" and cfg.seed == 0 and cfg.device == "auto"
    assert cfg.capture.layers == ["hidden1"]  # one string becomes a list
    assert cfg.train.lr == 0.01 and cfg.train.epochs == 3000  # YAML's "1e-2" string read as a number
    assert cfg.ood is None and cfg.check is None
    assert cfg.plot.unit == "bits" and cfg.report.enabled is True
    assert cfg.estimate.estimators == ["binning", "ksg"]  # the documented default of `ibscope estimate` too
    text = describe_schema()
    for key in RunConfig.model_fields:
        assert f"{key}:" in text


@pytest.mark.parametrize("cfg, message", [
    ({**MINIMAL, "trian": {}}, "unknown config key 'trian'. Did you mean 'train'?"),
    ({**MINIMAL, "train": {"epoch": 3}}, "unknown config key 'train.epoch'. Did you mean 'epochs'?"),
    ({**MINIMAL, "estimate": {"estimaters": ["binning"]}}, "unknown config key 'estimate.estimaters'. Did you mean 'estimators'?"),
    ({**MINIMAL, "train": {"epochs": "many"}}, "'train.epochs' must be an integer (not null). Got 'many'."),
    ({**MINIMAL, "plot": {"unit": "bytes"}}, "'plot.unit' must be one of bits, nats. Got 'bytes'."),
    ({**MINIMAL, "data": {"task": "twelvebit"}}, "'data.task' must be one of twelve-bit, digits. Got 'twelvebit'. Did you mean 'twelve-bit'?"),
    ({"data": {"task": "twelve-bit"}, "train": {}}, "missing required key 'model.factory'"),
    ({**MINIMAL, "checkpoints": "ck/*.pt"}, "'train:' and 'checkpoints:' exclude each other."),
    ({"model": {"factory": "m:f"}, "data": {"task": "twelve-bit"}}, "give either a 'train:' recipe or 'checkpoints:'"),
    ({**MINIMAL, "train": {"lr": -1.0}}, "'train.lr' must be > 0. Got -1.0."),
    ({**MINIMAL, "data": {"task": "twelve-bit", "options": {"train_frac": 0.5}}},
     "unknown key 'data.options.train_frac'. Did you mean 'train_fraction'?"),
    ({**MINIMAL, "estimate": {"estimators": ["binning"], "params": {"kde": {"noise_variance": 0.1}}}},
     "'estimate.params' sets parameters of 'kde', which is not in estimate.estimators."),
    ({**MINIMAL, "estimate": {"estimators": ["kde-upper"], "probes_for": {"kde-uper": "all"}}},
     "'estimate.probes_for' names 'kde-uper', which is not a registered estimator. Did you mean"),
    ({**MINIMAL, "data": {"task": "twelve-bit", "subsets": {"s": {"probe": "all", "n": 0}}}},
     "'data.subsets.s.n' must be >= 1. Got 0."),
    ({**MINIMAL, "data": {"task": "twelve-bit", "subsets": {"s": {"probe": "all", "n": 5, "sede": 1}}}},
     "unknown key 'data.subsets.s.sede'. Did you mean 'seed'?"),
    ({**MINIMAL, "quick": {"train": {"epohcs": 3}}}, "unknown config key 'quick.train.epohcs'. Did you mean 'epochs'?"),
    ({**MINIMAL, "ood": {"fit": "train", "test": "test", "ood": ["x"]}}, "missing required key 'ood.layer'"),
    ({"model": {"factory": "m:f"}, "train": {}}, "the train stage needs 'data.train'"),
    # names that become path parts (issue 11): refused before anything is written
    ({**MINIMAL, "name": "a/b"}, "'name' 'a/b' is not a safe name: it becomes part of a file path"),
    ({**MINIMAL, "name": "runs.lock"}, "'name' 'runs.lock' is not a safe name"),
    ({**MINIMAL, "data": {"task": "twelve-bit", "probes": {"..": "x.npz"}}}, "a 'data.probes' key '..' is not a safe name"),
    ({**MINIMAL, "data": {"task": "twelve-bit", "subsets": {"s.tmp": {"probe": "all", "n": 5}}}},
     "a 'data.subsets' key 's.tmp' is not a safe name"),
    ({**MINIMAL, "data": {"task": "twelve-bit", "probe": "/etc"}}, "'data.probe' '/etc' is not a safe name"),
    ({**MINIMAL, "capture": {"probes": ["all", "../all"]}}, "an entry of 'capture.probes' '../all' is not a safe name"),
    ({**MINIMAL, "estimate": {"estimators": ["kde-upper"], "probes_for": {"kde-upper": ["x/y"]}}},
     "an entry of 'estimate.probes_for.kde-upper' 'x/y' is not a safe name"),
    ({**MINIMAL, "ood": {"fit": "train", "test": "test", "ood": ["../o"], "layer": "hidden1"}},
     "an entry of 'ood.ood' '../o' is not a safe name"),
    ({**MINIMAL, "model": {"factory": "mynet.py"}}, "'model.factory' must be 'pkg.module:factory' or 'path/file.py:factory'. Got 'mynet.py'."),
    # the run-config keys of the other parts of issue 11
    ({**MINIMAL, "estimate": {"strict": "yes"}}, "'estimate.strict' must be true or false (not null). Got 'yes'."),
    ({**MINIMAL, "skip_bad_shards": 1}, "'skip_bad_shards' must be true or false (not null). Got 1."),
    ({**MINIMAL, "capture": {"safe_globals": ["numpy"]}},
     "'capture.safe_globals' expects 'module.Class' names (e.g. numpy.dtype, collections.OrderedDict). Got 'numpy'."),
    ({**MINIMAL, "capture": {"safe_globals": [3]}}, "'capture.safe_globals' must be a string or a list of strings"),
    ({**MINIMAL, "capture": {"safe_globals": None}}, "'capture.safe_globals' must be a string or a list of strings (not null)"),
    ("- just\n- a list\n", "must hold a YAML mapping (key: value). Got list."),
    ("model: [unclosed\n", "is not valid YAML"),
    ("", "is empty"),
])
def test_bad_configs_are_usage_errors(tmp_path, cfg, message):
    p = write(tmp_path, cfg)
    with pytest.raises(UsageError) as err:
        load_config(p)
    assert message in str(err.value)
    # and through the CLI: the same message, exit code 2, no traceback
    res = CliRunner().invoke(app, ["run", str(p), "--quiet"])
    assert res.exit_code == 2, res.output
    assert message.split(".")[0][:40] in " ".join(res.output.split())
    assert "Traceback" not in res.output


def test_cli_missing_config_and_bad_stage(tmp_path):
    res = CliRunner().invoke(app, ["run", "demo-tahn"])
    assert res.exit_code == 2 and "Config file not found: 'demo-tahn'" in res.output and "Did you mean one of: 'demo-tanh'" in res.output
    p = write(tmp_path, MINIMAL)
    res = CliRunner().invoke(app, ["run", str(p), "--only", "plto", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "Unknown stage 'plto'. Did you mean 'plot'?" in res.output
    res = CliRunner().invoke(app, ["run", str(p), "--set", "train.epochs"])
    assert res.exit_code == 2 and "--set expects KEY.PATH=VALUE" in res.output
    # an unknown key given with --set is named as a --set override, not as a key of the file
    res = CliRunner().invoke(app, ["run", str(p), "--set", "train.epoch=3", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--set: unknown config key 'train.epoch'. Did you mean 'epochs'?" in res.output
    # a model factory that does not exist is named as the config key, not as a --model flag
    bad = write(tmp_path, {**MINIMAL, "model": {**MINIMAL["model"], "factory": "ibscope.demo.models:no_such"}},
                name="bad.yaml")
    res = CliRunner().invoke(app, ["run", str(bad), "-o", str(tmp_path / "ob"), "--quiet"])
    assert res.exit_code == 2 and "model.factory (run config)" in res.output and "--model" not in res.output
    # a typo inside quick: is named with its quick. path even when --quick applies it
    q = write(tmp_path, {**MINIMAL, "quick": {"train": {"epoch": 3}}}, name="q.yaml")
    res = CliRunner().invoke(app, ["run", str(q), "--quick", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "unknown config key 'quick.train.epoch'" in res.output
    res = CliRunner().invoke(app, ["run", str(p), "--until", "estimat"])
    assert res.exit_code == 2 and "Did you mean 'estimate'" in res.output
    res = CliRunner().invoke(app, ["run", str(p), "--device", "gpu", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--device expects auto, cpu or cuda:N. Got 'gpu'" in res.output
    assert not (tmp_path / "o" / "checkpoints").exists()  # rejected before training
    res = CliRunner().invoke(app, ["run", "--show-schema"])
    assert res.exit_code == 0
    schema = json.loads(res.output)  # RunConfig.model_json_schema()
    capture = schema["$defs"]["CaptureSection"]["properties"]
    assert capture["jacobian_samples"]["type"] == "integer" and capture["jacobian_samples"]["minimum"] == 0
    assert schema["additionalProperties"] is False and "model" in schema["required"]
    res = CliRunner().invoke(app, ["run"])
    assert res.exit_code == 2 and "Missing the run config" in res.output


def test_packaged_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()  # e.g. the output folder of an earlier run
    cfg, base, source = load_config("digits")
    assert cfg.name == "digits" and Path(source) == PACKAGED_CONFIGS / "digits.yaml"
    (tmp_path / "runs.d").mkdir()
    with pytest.raises(UsageError, match="is a folder; `ibscope run` expects a YAML file"):
        load_config(tmp_path / "runs.d")


def test_issue11_keys_defaults_values_and_cli(tmp_path):
    cfg, _, _ = load_config(MINIMAL)
    assert cfg.estimate.strict is False and cfg.skip_bad_shards is False and cfg.capture.safe_globals == []
    cfg, _, _ = load_config({**MINIMAL, "skip_bad_shards": True, "estimate": {"strict": True},
                             "capture": {"safe_globals": "numpy.core.multiarray.scalar"}})
    assert cfg.estimate.strict is True and cfg.skip_bad_shards is True
    assert cfg.capture.safe_globals == ["numpy.core.multiarray.scalar"]  # one string becomes a list
    text = describe_schema()
    assert "skip_bad_shards: bool (default False)" in text and "strict: bool (default False)" in text
    assert "safe_globals: strlist" in text
    p = write(tmp_path, MINIMAL)
    res = CliRunner().invoke(app, ["run", str(p), "-o", str(tmp_path / "o"), "--safe-globals", "numpy", "-q"])
    assert res.exit_code == 2 and "--safe-globals expects 'module.Class' names" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["run", str(p), "-o", str(tmp_path / "o"), "--lock-timeout", "nan", "-q"])
    assert res.exit_code == 2 and "--lock-timeout must be a number of seconds. Got NaN." in res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.lock").exists()  # nothing written on a usage error
    res = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    for flag in ("--strict", "--skip-bad-shards", "--safe-globals", "--lock-timeout"):
        assert flag in res.output


def test_default_run_name_from_an_unsafe_file_name_is_made_safe(tmp_path):
    cfg, _, _ = load_config(write(tmp_path, MINIMAL, name="my run (v2).yaml"))
    assert cfg.name == "my_run_v2"


def test_overrides_and_merge():
    o = parse_overrides(["train.epochs=500", "plot.unit=nats", "capture.layers=[hidden1, output]", "name=x"])
    assert o == {"train": {"epochs": 500}, "plot": {"unit": "nats"}, "capture": {"layers": ["hidden1", "output"]}, "name": "x"}
    assert deep_merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"b": 3}, "d": [2]}) == {"a": {"b": 3, "c": 2}, "d": [2]}
    cfg, _, _ = load_config(MINIMAL, overrides=o)
    assert cfg.train.epochs == 500 and cfg.capture.layers == ["hidden1", "output"]


# ---------------------------------------------------------------------------- stage skipping
def test_stage_runner_skips_and_reruns_for_the_right_reasons(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("1")
    calls = []

    def stage(name, config, upstream=(), text=None):
        def run():
            calls.append(name)
            p = tmp_path / f"{name}.out"
            p.write_text(text or src.read_text())
            return [p]
        return Stage(name, config, [src], list(upstream), run)

    def go(cfg_a=1, cfg_b=1, force=False):
        r = StageRunner(tmp_path, force=force)
        r(stage("a", {"k": cfg_a}))
        r(stage("b", {"k": cfg_b}, upstream=["a"]))
        return [(s.name, s.status, s.reason) for s in r.status]

    assert go() == [("a", "ran", "never ran here"), ("b", "ran", "never ran here")]
    assert go() == [("a", "skipped", "up to date"), ("b", "skipped", "up to date")]
    assert go(cfg_b=2) == [("a", "skipped", "up to date"), ("b", "ran", "its config changed")]
    assert go(cfg_a=2, cfg_b=2) == [("a", "ran", "its config changed"), ("b", "ran", "an earlier stage ran again")]
    (tmp_path / "b.out").unlink()
    assert go(cfg_a=2, cfg_b=2)[1] == ("b", "ran", "output b.out is missing")
    # a newer input with the same bytes changes nothing: the fingerprint is the content, not the mtime
    future = time.time() + 5
    os.utime(src, (future, future))
    assert [s[1] for s in go(cfg_a=2, cfg_b=2)] == ["skipped"] * 2
    src.write_text("22")
    assert [s[2] for s in go(cfg_a=2, cfg_b=2)] == ["input input.txt changed (1 -> 2 bytes)", "an earlier stage ran again"]
    assert [s[1:] for s in go(cfg_a=2, cfg_b=2, force=True)] == [("ran", "forced"), ("ran", "an earlier stage ran again")]
    stamp = json.loads((tmp_path / ".ibscope" / "stages" / "b.json").read_text())
    assert stamp["config"] == {"k": 2} and stamp["outputs"] == ["b.out"] and stamp["upstream"]["a"]
    assert stamp["output_hashes"]["b.out"]["sha256"] == hashlib.sha256(b"22").hexdigest()
    assert calls.count("a") == 4 and calls.count("b") == 6


def test_stage_runner_only_needs_earlier_runs(tmp_path):
    r = StageRunner(tmp_path, only=["b"])
    with pytest.raises(UsageError, match="Stage 'a' has not run yet"):
        r(Stage("a", {}, [], [], lambda: []))
