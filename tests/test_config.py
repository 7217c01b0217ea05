"""The typed configs (ibscope.pipeline.config): one EstimateSection for run configs and estimate
presets, pydantic errors as UsageErrors with location and did-you-mean, the schema; and the shared
helpers of the same change (units, KEY=VALUE parsing, the reporter boundary, layering)."""

import ast
import json
import math
from pathlib import Path

import pytest
import yaml

from ibscope.errors import UsageError
from ibscope.pipeline import (DEFAULT_ESTIMATORS, EstimateSection, RunConfig, StageRunner, describe_schema,
                              load_config, load_estimate_preset)
from ibscope.pipeline.runner import Stage

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"factory": "ibscope.demo.models:ib_net"}, "data": {"task": "twelve-bit"}, "train": {"epochs": 5}}


# ---------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name, estimators, params, x_source", [
    ("saxe-kde", ["kde-upper", "kde-lower", "binning"],
     {"kde-upper": {"noise_variance": 0.001}, "kde-lower": {"noise_variance": 0.001}, "binning": {"bin_width": 0.07}},
     "identity"),
    ("shwartz-ziv-tishby-binning", ["binning"],
     {"binning": {"n_bins": 29, "range_min": -1.0, "range_max": 1.0, "outside": "idnns"}}, "identity"),
    ("ibscope-adaptive", ["adaptive-binning", "adaptive-kde-upper", "adaptive-kde-lower"],
     {"adaptive-binning": {"n_bins": 30}, "adaptive-kde-upper": {"relative_variance": 0.001, "scale": "max"},
      "adaptive-kde-lower": {"relative_variance": 0.001, "scale": "max"}}, "identity"),
    ("butakov-compressed", ["compressed"],
     {"compressed": {"latent_dim": 4, "compressor_x": "autoencoder", "compressor_y": "pca", "mi_step": "ksg",
                     "k": 5}}, "inputs"),
])
def test_packaged_presets_read_into_the_shared_section(name, estimators, params, x_source):
    for src in (name, ROOT / "configs" / f"{name}.yaml"):  # a bare name reads the installed copy
        p = load_estimate_preset(src)
        assert isinstance(p, EstimateSection)
        assert p.estimators == estimators and p.params == params and p.x_source == x_source
        assert p.jobs == 1 and p.strict is False and p.layers is None and p.null_permutations is None
        assert p.description and p.reference


def test_preset_forms_and_defaults(tmp_path):
    f = tmp_path / "p.yaml"
    # {name: params} entries and a params: key for the same estimator: the params: key wins per parameter
    f.write_text("estimators:\n  - binning: {n_bins: 10, bin_width: null}\n  - ksg\n"
                 "params: {binning: {n_bins: 20}, ksg: {k: 5}}\nlayers: fc1\njobs: null\n")
    p = load_estimate_preset(f)
    assert p.estimators == ["binning", "ksg"] and p.layers == ["fc1"] and p.jobs == 1  # null: the default
    assert p.params == {"binning": {"n_bins": 20, "bin_width": None}, "ksg": {"k": 5}}
    f.write_text("estimators: {kde-upper: {noise_variance: 0.01}}\n")  # a mapping of name -> params
    assert load_estimate_preset(f).params == {"kde-upper": {"noise_variance": 0.01}}
    f.write_text("")  # an empty preset: the documented default estimators
    assert load_estimate_preset(f).estimators == list(DEFAULT_ESTIMATORS) == ["binning", "ksg"]
    # the estimate: section of a run config, its pipeline-only keys accepted (and unused by a preset)
    f.write_text(yaml.safe_dump({**MINIMAL, "estimate": {"estimators": ["binning"], "probes": ["all"],
                                                         "probes_for": {"binning": "all"}}}))
    p = load_estimate_preset(f)
    assert p.estimators == ["binning"] and p.probes == ["all"] and p.probes_for == {"binning": "all"}


@pytest.mark.parametrize("text, message", [
    ("estimator: [ksg]\n", "Unknown key 'estimator' in config '{f}'. Did you mean 'estimators'?"),
    ("estimators: [binning]\nx_source: ids\n", "{f}: 'x_source' must be one of identity, inputs. Got 'ids'."),
    ("estimators: [binning]\njobs: 0\n", "{f}: 'jobs' must be >= 1. Got 0."),
    ("estimators: [binning]\njobs: true\n", "{f}: 'jobs' must be an integer (not null). Got True."),
    ("estimators: []\n", "{f}: 'estimators' is empty; name at least one estimator."),
    ("estimators: [{a: 1, b: 2}]\n", "Each entry of 'estimators' must be a name or {name: {param: value}}."),
    ("estimate: {estimators: [binning], strict: maybe}\n", "{f}: 'estimate.strict' must be true or false"),
    ("- a list\n", "must hold a YAML mapping (key: value). Got list."),
])
def test_bad_presets_are_usage_errors(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(UsageError) as err:
        load_estimate_preset(f)
    assert message.replace("{f}", str(f)) in str(err.value)


def test_missing_preset_names_the_packaged_ones(tmp_path):
    with pytest.raises(UsageError, match="Config file not found: 'saxe-kd'. Did you mean 'saxe-kde'") as err:
        load_estimate_preset("saxe-kd")
    assert "butakov-compressed" in err.value.hint
    with pytest.raises(UsageError, match="is a folder"):
        load_estimate_preset(tmp_path)


# ---------------------------------------------------------------------------- run config
def test_one_estimate_section_in_run_configs():
    cfg, _, _ = load_config(MINIMAL)
    assert isinstance(cfg.estimate, EstimateSection) and cfg.estimate.estimators == ["binning", "ksg"]
    # the preset form works in a run config too; params of the entry become estimate.params
    cfg, _, _ = load_config({**MINIMAL, "estimate": {"estimators": [{"binning": {"n_bins": 7}}, "kde-upper"],
                                                      "x_source": "inputs", "layers": "hidden1"}})
    assert cfg.estimate.estimators == ["binning", "kde-upper"] and cfg.estimate.params == {"binning": {"n_bins": 7}}
    assert cfg.estimate.x_source == "inputs" and cfg.estimate.layers == ["hidden1"]
    with pytest.raises(UsageError, match="'estimate.out' is a key of `ibscope estimate` presets"):
        load_config({**MINIMAL, "estimate": {"out": "r.csv"}})


@pytest.mark.parametrize("cfg, message", [
    ({**MINIMAL, "train": 5}, "'train' must be a mapping. Got int: 5."),
    ({**MINIMAL, "checkpoints": None, "train": {"epochs": 10, "checkpoint_epochs": [0, 20]}},
     "train.checkpoint_epochs must lie in [0, epochs=10]. Got [20]."),
    ({**MINIMAL, "train": {"optimizer": "adamw"}}, "'train.optimizer' must be one of adam, sgd. Got 'adamw'. Did you mean 'adam'?"),
    ({**MINIMAL, "capture": {"batch_size": 0}}, "'capture.batch_size' must be >= 1. Got 0."),
    ({**MINIMAL, "capture": {"jacobian_samples": -1}}, "'capture.jacobian_samples' must be >= 0. Got -1."),
    ({**MINIMAL, "estimate": {"jobs": 1.5}}, "'estimate.jobs' must be an integer (not null). Got 1.5."),
    ({**MINIMAL, "estimate": {"probes_for": {"binning": []}}}, "'estimate.probes_for.binning' must not be empty."),
    ({**MINIMAL, "estimate": {"probes_for": {"binning": 3}}},
     "'estimate.probes_for.binning' must be a probe set name or a list of them. Got 3."),
    ({**MINIMAL, "data": {"task": "twelve-bit", "subsets": {"s": {"n": 5}}}}, "missing required key 'data.subsets.s.probe'"),
    ({**MINIMAL, "checkpoints": 5, "train": None}, "'checkpoints' must be a path, glob or list of paths. Got 5."),
    ({**MINIMAL, "ood": {"fit": "a", "test": "b", "ood": "c", "layer": "l", "detector": ["knn"]}},
     "unknown config key 'ood.detector'. Did you mean 'detectors'?"),
])
def test_more_bad_run_configs(cfg, message):
    with pytest.raises(UsageError) as err:
        load_config(cfg)
    assert message in str(err.value)


def test_typed_values_and_a_json_schema():
    cfg, _, _ = load_config({**MINIMAL, "train": {"lr": 1, "weight_decay": "1e-4", "epochs": 7},
                             "data": {"task": "twelve-bit", "subsets": {"s": {"probe": "all", "n": 5}}}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.weight_decay == 1e-4
    assert cfg.data.subsets["s"].seed == 0 and cfg.data.model_dump()["subsets"] == {"s": {"probe": "all", "n": 5}}
    tc = cfg.train_config()
    assert (tc.epochs, tc.lr, tc.seed, tc.optimizer) == (7, 1.0, 0, "adam")
    schema = RunConfig.model_json_schema()
    defs = schema["$defs"]
    assert all(d.get("additionalProperties") is False for k, d in defs.items() if k.endswith("Section"))
    assert defs["TrainSection"]["properties"]["lr"]["exclusiveMinimum"] == 0
    assert defs["PlotSection"]["properties"]["unit"]["enum"] == ["bits", "nats"]
    assert defs["EstimateSection"]["properties"]["estimators"]["description"].startswith("registered estimator")
    json.dumps(schema)  # plain JSON
    text = describe_schema()
    assert "factory: str [required] - 'pkg.module:factory'" in text and "Undefined" not in text
    assert "estimators: strlist (default ['binning', 'ksg'])" in text


# ---------------------------------------------------------------------------- helpers of the same change
def test_units_conversion():
    from ibscope.estimators.base import conversion_factor as old_name
    from ibscope.units import conversion_factor, convert

    assert old_name is conversion_factor
    assert conversion_factor("nats", "bits") == 1 / math.log(2) and conversion_factor("bits", "nats") == math.log(2)
    assert conversion_factor("dims", "dims") == 1.0
    assert convert(math.log(2), "nats", "bits") == pytest.approx(1.0, abs=1e-15)
    assert convert(None, "nats", "bits") is None and convert(3.0, "dims", "bits") == 3.0
    with pytest.raises(UsageError, match="Cannot convert from unit 'dims' to 'bits'"):
        conversion_factor("dims", "bits")


def test_parse_kv():
    from ibscope._options import parse_kv

    assert parse_kv([" a = 1", "b.c=x=y", "a=2"]) == {"a": "2", "b.c": "x=y"}
    with pytest.raises(UsageError, match=r"--ood expects NAME=STORE. Got 'x'\.") as err:
        parse_kv(["x"], "--ood", form="NAME=STORE", example="noise=stores/noise")
    assert err.value.hint == "Example: --ood noise=stores/noise"
    with pytest.raises(UsageError, match="with both parts non-empty"):
        parse_kv(["a="], "--ood", form="NAME=STORE", nonempty=True)
    with pytest.raises(UsageError, match="OOD set name 'a' is given twice"):
        parse_kv(["a=1", "a=2"], "--ood", unique="OOD set name")


def test_stage_runner_is_silent_without_a_reporter(tmp_path, capsys):
    out = tmp_path / "x.out"
    StageRunner(tmp_path)(Stage("x", {}, [], [], lambda: [out.write_text("1") and out]))
    assert out.read_text() == "1"
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_the_library_never_imports_the_cli():
    """Outside ibscope/cli/, no module imports ibscope.cli (the CLI imports the library, not back)."""
    pkg = ROOT / "ibscope"
    offenders = []
    for path in pkg.rglob("*.py"):
        if path.relative_to(pkg).parts[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n == "ibscope.cli" or n.startswith("ibscope.cli.")]
    assert offenders == []


def test_pipeline_modules_stay_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "ibscope" / "pipeline").glob("*.py")}
    assert set(sizes) >= {"__init__.py", "config.py", "loading.py", "runner.py", "context.py", "stages.py"}
    assert max(sizes.values()) <= 600, sizes


def test_no_module_over_600_lines_and_no_progress_bar_outside_the_cli():
    """The house rules of issue 15: every module of the package stays under ~600 lines, and
    progress is shown only through the Reporter (no rich progress bar built in the library)."""
    pkg = ROOT / "ibscope"
    big = {str(p.relative_to(pkg)): n for p in pkg.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert big == {}
    bars = [str(p.relative_to(pkg)) for p in pkg.rglob("*.py")
            if p.relative_to(pkg).parts[0] != "cli" and "rich.progress" in p.read_text()]
    assert bars == []


def test_every_problem_of_a_config_is_named_at_once():
    """pydantic finds every bad key; the error names each once (a misspelt key is not also
    reported as the right key missing); one problem keeps its one-line message."""
    cfg = {**MINIMAL, "trian": {"epochs": 3}, "plot": {"dpii": 3}, "capture": {"batch_size": 0}}
    with pytest.raises(UsageError) as err:
        load_config(cfg)
    msg = str(err.value)
    assert "3 problems:" in msg
    assert "  - unknown config key 'trian'. Did you mean 'train'?" in msg
    assert "  - unknown config key 'plot.dpii'." in msg
    assert "  - 'capture.batch_size' must be >= 1. Got 0." in msg
    with pytest.raises(UsageError) as err:
        load_config({**MINIMAL, "capture": {"batch_size": 0}})
    assert "problems" not in str(err.value) and "'capture.batch_size' must be >= 1. Got 0." in str(err.value)


def test_unknown_keys_of_quick_and_set_are_listed_with_the_other_problems():
    cfg = {**MINIMAL, "capture": {"batch_size": -3}, "quick": {"capture": {"batch_sise": 3}}}
    with pytest.raises(UsageError) as err:
        load_config(cfg, overrides={"plot": {"fmt": "gif"}, "trian": {"epochs": 2}})
    msg = str(err.value)
    assert "4 problems:" in msg
    assert "  - unknown config key 'quick.capture.batch_sise'. Did you mean 'batch_size'?" in msg
    assert "  - --set: unknown config key 'trian'. Did you mean 'train'?" in msg
    assert "  - 'capture.batch_size' must be >= 1. Got -3." in msg
    assert "  - 'plot.fmt' must be one of png, svg, pdf. Got 'gif'. (The value was set by --set plot.fmt.)" in msg


def test_estimator_names_and_parameters_are_checked_when_the_config_is_read(tmp_path):
    """A misspelt estimator or a bad parameter stops `ibscope run` before any stage (nothing
    written), naming the config key, and --set when the value came from there."""
    from typer.testing import CliRunner

    from ibscope.cli.main import app

    bad = {**MINIMAL, "estimate": {"estimators": ["binnning", "ksg"], "params": {"ksg": {"k": 0}}}}
    with pytest.raises(UsageError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "2 problems:" in msg
    assert "  - 'estimate.estimators': Unknown estimator 'binnning'. Did you mean" in msg
    assert "  - 'estimate.params.ksg.k': The 'k' parameter of ksg must be an integer >= 1. Got 0 instead." in msg
    with pytest.raises(UsageError) as err:
        load_config(MINIMAL, overrides={"estimate": {"estimators": ["ksg", "twonnn"]}})
    assert ("'estimate.estimators': Unknown estimator 'twonnn'. Did you mean 'twonn'? "
            "(The value was set by --set estimate.estimators.)") in str(err.value)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    res = CliRunner().invoke(app, ["run", str(path), "-o", str(tmp_path / "out"), "--until", "capture"])
    assert res.exit_code == 2 and "Unknown estimator 'binnning'" in res.output
    assert not (tmp_path / "out").exists()


def test_config_file_mixups_are_named(tmp_path):
    """A run config naming a missing factory file says the path is relative to the config's
    folder (nothing written); `ibscope run PRESET` says it is an estimate preset; the hints list
    the packaged configs of the right kind."""
    from typer.testing import CliRunner

    from ibscope.cli.main import app

    (tmp_path / "c").mkdir()
    cfg = tmp_path / "c" / "run.yaml"
    cfg.write_text(yaml.safe_dump({**MINIMAL, "model": {"factory": "mynet2.py:Net"}}))
    res = CliRunner().invoke(app, ["run", str(cfg), "-o", str(tmp_path / "out")])
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert f"'model.factory': file 'mynet2.py' not found (looked for '{tmp_path / 'c' / 'mynet2.py'}')" in text
    assert f"relative to the config file's folder ('{tmp_path / 'c'}')" in text
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(app, ["run", "saxe-kde", "-o", str(tmp_path / "out")])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "'saxe-kde' is an estimate preset" in text and "ibscope estimate STORE -c saxe-kde" in text
    res = CliRunner().invoke(app, ["run", "nope", "-o", str(tmp_path / "out")])
    text = " ".join(res.output.split())
    assert "Packaged run configs: demo-relu, demo-tanh, digits" in text and "saxe-kde" not in text
    res = CliRunner().invoke(app, ["estimate", str(tmp_path), "-c", "nope", "-o", str(tmp_path / "r.csv")])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "saxe-kde" in text and "demo-tanh" not in text


def test_one_message_names_schema_estimator_and_parameter_mistakes_each_from_its_source():
    """Estimator names and every bad parameter are listed with the schema's problems (not in a
    second round); a value of the file is not blamed on a quick: section that only held a bad key."""
    cfg = {**MINIMAL, "train": {"epochs": 5, "lr": -0.01}, "quick": {"train": {"epochz": 3}},
           "estimate": {"estimators": ["binning", "kde-uper"], "params": {"binning": {"bin_widht": 3, "n_bins": 0}}}}
    with pytest.raises(UsageError) as err:
        load_config(cfg, quick=True, overrides={"estimate": {"params": {"binning": {"bin_width": -1}}}})
    msg = str(err.value)
    assert "6 problems:" in msg
    assert "  - unknown config key 'quick.train.epochz'. Did you mean 'epochs'?" in msg
    assert "  - 'train.lr' must be > 0. Got -0.01.\n" in msg  # the file's own value: no "set by"
    assert "  - 'estimate.estimators': Unknown estimator 'kde-uper'." in msg
    assert "  - 'estimate.params.binning.bin_widht': Estimator 'binning' has no parameter 'bin_widht'." in msg
    assert "  - 'estimate.params.binning.n_bins': The 'n_bins' parameter of binning must be an integer >= 1." in msg
    assert ("  - 'estimate.params.binning.bin_width': The 'bin_width' parameter of binning must be a finite number "
            "> 0 or None. Got -1 instead. (The value was set by --set estimate.params.binning.bin_width.)") in msg


def test_errors_of_merged_values_say_where_they_were_written():
    """A bad value from the quick: section or from --set is named where the user wrote it."""
    cfg = {**MINIMAL, "quick": {"train": {"epochs": -1}}}
    load_config(cfg)  # not applied: the file's own epochs (5) are valid
    with pytest.raises(UsageError) as err:
        load_config(cfg, quick=True)
    assert "'train.epochs' must be >= 1. Got -1. (The value was set by 'quick.train.epochs'.)" in str(err.value)
    with pytest.raises(UsageError) as err:
        load_config(MINIMAL, overrides={"capture": {"batch_size": 0}})
    assert "'capture.batch_size' must be >= 1. Got 0. (The value was set by --set capture.batch_size.)" in str(err.value)
    with pytest.raises(UsageError) as err:  # the file's own bad value: no origin named
        load_config({**MINIMAL, "capture": {"batch_size": 0}}, overrides={"train": {"epochs": 3}})
    assert "set by" not in str(err.value)


def test_rich_reporter_of_the_cli():
    import io

    from rich.console import Console

    from ibscope.cli._common import RichReporter, progress_callback
    from ibscope.reporting import LoggingReporter, NullReporter, Reporter, is_silent

    buf = io.StringIO()
    rep = RichReporter(Console(file=buf, width=100, force_terminal=False))
    assert isinstance(rep, Reporter) and isinstance(NullReporter(), Reporter) and isinstance(LoggingReporter(), Reporter)
    assert is_silent(None) and is_silent(NullReporter()) and not is_silent(rep)
    rep.info("> estimate (its config changed) [not markup]")
    rep.warning("  binning: 3 cell(s) saturated")
    with rep.task("figures", 3) as t:
        t.advance(note="a.png")
        t.update(completed=3, total=3, note="c.png")
    assert buf.getvalue().splitlines()[:2] == ["> estimate (its config changed) [not markup]",
                                               "  binning: 3 cell(s) saturated"]
    with progress_callback(True, "plot") as cb:
        assert cb is None  # --quiet: no callback, no bar
    # tasks nest (capture: checkpoints > batches > Jacobian passes) on one live display, which
    # ends with the last open task; a second round starts a new one
    for _ in range(2):
        with rep.task("checkpoints", 2) as outer:
            for i in range(2):
                with rep.task("batches", 3) as inner:
                    inner.advance(3)
                outer.advance(note=f"epoch {i}")
                assert rep._open == 1 and rep._bar is not None and len(rep._bar.tasks) == 1
        assert rep._open == 0 and rep._bar is None


def test_bad_estimate_device_fails_before_any_work(tmp_path):
    from ibscope.pipeline import Pipeline

    cfg, base, _ = load_config({**MINIMAL, "estimate": {"device": "gpu"}})
    with pytest.raises(UsageError, match="--device expects auto, cpu or cuda:N. Got 'gpu'"):
        Pipeline(cfg, base, tmp_path / "o")
    assert not (tmp_path / "o").exists()
