"""Search spaces, the concurrency rule, the results table and the paper's ablation tables,
without a Ray cluster: every check here runs before (or after) a sweep's trials."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import ray
import yaml
from click.testing import CliRunner
from PIL import Image
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from safetensors.torch import save_file
from torchvision.models.vgg import cfgs, make_layers

from hdm_platform.cli.tune import tune as tune_command
from hdm_platform.config import ConfigError, load_config, validate_config
from hdm_platform.data.synth import synthesize
from hdm_platform.tune.ablations import PAPER_TABLES, check_paper_table, render_paper_table
from hdm_platform.tune.driver import max_concurrent_trials
from hdm_platform.tune.report import TrialRow, format_table, plot_val_psnr, write_best_config, write_csv
from hdm_platform.tune.space import load_space

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "jobs" / "spaces").glob("*.yaml"))
PAPER_CONFIGS = sorted(
    path for path in (ROOT / "jobs" / "configs").glob("*.yaml") if not path.stem.endswith("-cpu")
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    # Enough training pairs for the paper configs' global batch of 16 over 4 workers.
    root = tmp_path_factory.mktemp("tune-space")
    synthesize("builtin", str(root / "ds"), task="dehaze", count=24, size=(16, 16), val_fraction=0.25,
               workers=1, progress=False)  # fmt: skip
    return str(root / "ds")


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory) -> str:
    # A random VGG16 feature stack stands in for torchvision's ImageNet weights.
    path = tmp_path_factory.mktemp("vgg") / "vgg16.safetensors"
    features = make_layers(cfgs["D"])[:16]
    save_file({f"features.{k}": v.contiguous() for k, v in features.state_dict().items()}, str(path))
    return str(path)


def paper_experiment(path: Path, dataset: str, vgg_weights: str) -> dict:
    """A paper config with its placeholders pointed at local files, as a raw mapping."""
    config = load_config(path, [f"data.uri={dataset}", f"loss.vgg_weights={vgg_weights}"])
    return config.model_dump(mode="json", exclude_unset=True)


def tiny_experiment(dataset: str, **sections: dict) -> dict:
    raw = {
        "name": "space-test",
        "task": "dehaze",
        "model": {"channels": 8, "num_groups": 1, "blocks_per_group": 1},
        "data": {"uri": dataset, "crop_size": 16},
        "loss": {"perceptual_weight": 0},
        "train": {"epochs": 4, "batch_size": 2},
        "scaling": {"num_workers": 1},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def write_space(tmp_path: Path, **content: object) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


@pytest.mark.parametrize("space_path", SPACES, ids=lambda path: path.stem)
@pytest.mark.parametrize("config_path", PAPER_CONFIGS, ids=lambda path: path.stem)
def test_every_space_validates_against_the_paper_configs(space_path, config_path, dataset, vgg_weights):
    space = load_space(space_path)
    base = paper_experiment(config_path, dataset, vgg_weights)
    experiment = space.check(base)
    assert experiment.name == config_path.stem
    if space.paper_table is not None:
        table = PAPER_TABLES[space.paper_table]
        check_paper_table(table, space.candidate_configs(base, table.key))
        # The space sweeps exactly the values the paper's table compares (minus depth masks).
        assert {str(value) for value in table.columns.values() if value is not None} == {
            str(value) for value in space.params[table.key].candidates()
        }
    param_space = space.param_space()
    assert set(param_space) == set(space.params)
    if space.searcher == "grid":
        assert all(set(domain) == {"grid_search"} for domain in param_space.values())


def test_space_files_say_what_they_are():
    assert {path.stem for path in SPACES} == {
        "loss-lr", "table4-orders", "table5-variants", "table6-masks", "regions",
    }  # fmt: skip
    for path in SPACES:
        assert path.read_text().startswith("# "), f"{path.name} lacks its comment header"


def test_searchers_and_tune_domains(tmp_path):
    space = load_space(
        write_space(
            tmp_path,
            searcher="random",
            seed=7,
            params={
                "train.lr": {"loguniform": [1e-5, 1e-3]},
                "model.num_regions": {"int": [2, 4]},
                "data.crop_size": {"int": [16, 32], "step": 8},
                "model.order": ["PSR", "PRS"],
            },
        )
    )
    domains = space.param_space()
    assert domains["train.lr"].lower == 1e-5 and domains["train.lr"].upper == 1e-3
    # Both ends of an int range are included: Tune's randint excludes its upper bound.
    assert (domains["model.num_regions"].lower, domains["model.num_regions"].upper) == (2, 5)
    draws = {domains["data.crop_size"].sample() for _ in range(200)}
    assert draws == {16, 24, 32}
    assert domains["model.order"].categories == ["PSR", "PRS"]
    generator = space.search_algorithm(max_concurrent=3)
    assert isinstance(generator, BasicVariantGenerator) and generator.max_concurrent == 3

    optuna = load_space(write_space(tmp_path, searcher="optuna", params={"train.lr": {"uniform": [1e-4, 1e-3]}}))
    limiter = optuna.search_algorithm(max_concurrent=2)
    assert isinstance(limiter, ConcurrencyLimiter) and limiter.max_concurrent == 2
    assert type(limiter.searcher).__name__ == "OptunaSearch"


@pytest.mark.parametrize(
    ("params", "extra", "message"),
    [
        ({"model.num_regionz": [2, 3]}, {}, "params.model.num_regionz is not an experiment setting"),
        ({"scaling.num_workers": [1, 2]}, {}, "params.scaling.num_workers cannot be searched"),
        ({"model.num_regions": [1, 3]}, {}, "params.model.num_regions value 1 is not usable"),
        ({"train.lr": {"uniform": [1e-3, -1.0]}}, {}, r"params.train.lr.uniform: low must be below high"),
        ({"train.lr": {"uniform": [-1e-3, 1e-3]}}, {}, "params.train.lr value -0.001 is not usable"),
        ({"train.lr": {"loguniform": [0, 1e-3]}}, {}, "params.train.lr.loguniform: low must be above 0"),
        ({"data.crop_size": {"int": [16, 32], "step": 2}}, {}, "params.data.crop_size value 18 is not usable"),
        ({"data.crop_size": {"int": [18, 32], "step": 8}}, {}, "must be multiples of step 8"),
        ({"model.order": ["PSR", "XYZ"]}, {}, "params.model.order value 'XYZ' is not usable"),
        ({"model.variant": ["HDM", "HDM-X"]}, {}, "params.model.variant value 'HDM-X' is not usable"),
        ({"model.order": []}, {}, "params.model.order: the list of values is empty"),
        ({"model.order": {"choice": ["PSR"]}}, {}, "a range is exactly one of uniform, loguniform or int"),
        ({"train.epochs": [2, 4]}, {}, "asha.max_t must be given when params.train.epochs is searched"),
        ({"train.lr": {"uniform": [1e-4, 1e-3]}}, {"searcher": "grid"}, "the grid searcher needs a list"),
        ({"train.lr": [1e-4]}, {"searcher": "bayes"}, "searcher"),
        ({"train.lr": [1e-4]}, {"paper_table": "table4"}, "compares values of model.order"),
        ({"train.lr": [1e-4]}, {"asha": {"grace_period": 0}}, "asha.grace_period"),
    ],
)
def test_a_bad_space_is_rejected_naming_the_key(tmp_path, dataset, params, extra, message):
    content = {"searcher": "random", **extra, "params": params}
    with pytest.raises(ConfigError, match=message):
        load_space(write_space(tmp_path, **content)).check(tiny_experiment(dataset))


def test_external_masks_are_rejected_with_the_reason(tmp_path, dataset):
    space = load_space(
        write_space(tmp_path, searcher="grid", asha=False, paper_table="table6",
                    params={"model.mask_source": ["dcp", "learned", "external"]})
    )  # fmt: skip
    with pytest.raises(ConfigError) as error:
        space.check(tiny_experiment(dataset))
    assert "params.model.mask_source value 'external'" in str(error.value)
    assert "needs a guide map per image, which datasets do not carry" in str(error.value)


def test_paper_tables_reject_a_base_config_that_defeats_them(dataset):
    table5 = load_space(ROOT / "jobs" / "spaces" / "table5-variants.yaml")
    base = tiny_experiment(dataset, model={"mask_source": "dcp"})
    table5.check(base)  # every value is valid on its own...
    with pytest.raises(ConfigError, match="variant HDM-F .* sets model.mask_source"):
        # ...but HDM-F would silently use DCP masks, so it is not the paper's variant.
        check_paper_table(PAPER_TABLES["table5"], table5.candidate_configs(base, "model.variant"))
    orders = load_space(ROOT / "jobs" / "spaces" / "table4-orders.yaml")
    without_region = tiny_experiment(dataset, model={"variant": "B+FA+S"})
    with pytest.raises(ConfigError, match="turns off model.use_region"):
        check_paper_table(PAPER_TABLES["table4"], orders.candidate_configs(without_region, "model.order"))
    regions = load_space(ROOT / "jobs" / "spaces" / "regions.yaml")
    with pytest.raises(ConfigError, match="only matters with the region level"):
        check_paper_table(PAPER_TABLES["regions"], regions.candidate_configs(without_region, "model.num_regions"))


def test_a_bad_space_stops_hdm_tune_before_ray_starts(tmp_path, dataset, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init was called for a bad search space")

    monkeypatch.setattr(ray, "init", no_ray)
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(tiny_experiment(dataset)))
    for params, message in (
        ({"loss.l1_wieght": [1.0]}, "params.loss.l1_wieght is not an experiment setting"),
        ({"model.num_regions": [3, 1]}, "params.model.num_regions value 1 is not usable"),
    ):
        space = write_space(tmp_path, searcher="grid", params=params)
        result = CliRunner().invoke(tune_command, ["--config", str(config), "--space", str(space)])
        assert result.exit_code != 0
        assert message in result.output


def test_concurrency_follows_the_cluster_and_the_workers_per_trial(dataset):
    def experiment(**scaling: object) -> object:
        return validate_config(tiny_experiment(dataset, scaling=scaling))

    # CPU trials: 2 workers x 2 CPUs (+ the trial's sliver) each, one CPU kept for Ray Data.
    cpu = experiment(num_workers=2, cpus_per_worker=2)
    assert max_concurrent_trials(cpu, {"CPU": 17.0}) == 3
    assert max_concurrent_trials(cpu, {"CPU": 17.0}, cap=2) == 2
    # A cluster that fits no trial yet still runs one (an autoscaler may add nodes).
    assert max_concurrent_trials(cpu, {"CPU": 2.0}) == 1
    # GPU trials: the GPUs bound it (8 GPUs / 4 workers), unless CPUs run out first.
    gpu = experiment(num_workers=4, use_gpu=True, cpus_per_worker=3)
    assert max_concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0}) == 2
    assert max_concurrent_trials(gpu, {"CPU": 20.0, "GPU": 8.0}) == 1
    one = experiment(num_workers=1, cpus_per_worker=1)
    assert max_concurrent_trials(one, {"CPU": 4.0}) == 2  # 2 x 1.01 + 1 <= 4


def row(trial_id: str, params: dict, psnr: float | None, *, stopped: bool = False, epochs: int = 4) -> TrialRow:
    history = [(epoch, psnr - (epochs - epoch)) for epoch in range(1, epochs + 1)] if psnr is not None else []
    return TrialRow(
        trial_id=trial_id,
        params=params,
        failed=psnr is None,
        validations=len(history),
        epochs_run=epochs if psnr is not None else 0,
        stopped_early=stopped,
        best_psnr=psnr,
        best_ssim=0.8 if psnr is not None else None,
        best_metrics={"step": 40} if psnr is not None else {},
        history=history,
        error=None if psnr is not None else "ValueError: boom",
    )


def test_table4_prints_the_papers_numbers_beside_the_sweep(dataset):
    rows = [row("t0", {"model.order": "PSR"}, 21.5), row("t1", {"model.order": "SRP"}, 14.25, stopped=True, epochs=1),
            row("t2", {"model.order": "RSP"}, None)]  # fmt: skip
    text = render_paper_table(PAPER_TABLES["table4"], rows, {}, data_label="my-data, split val")
    lines = text.splitlines()
    assert lines[0].startswith("Table 4: cascade order")
    assert lines[1].split() == ["PSR(Ours)", "PRS", "SRP", "SPR", "RPS", "RSP"]
    assert lines[2].split() == ["paper", "NH-HAZE", "22.48", "15.12", "11.44", "18.84", "17.23", "11.55"]
    assert lines[3].split()[-6:] == ["21.50/0.8000", "-", "14.25/0.8000*", "-", "-", "failed"]
    assert "this sweep (my-data, split val)" in lines[3]
    assert "SRP: trial t1 was stopped early by ASHA after 1 epoch(s)" in text


def test_table5_is_by_variant_with_parameter_counts(dataset):
    rows = [row(f"t{index}", {"model.variant": variant}, 20.0 + index)
            for index, variant in enumerate(["B", "B+FA", "B+FA+S", "HDM-F", "HDM"])]  # fmt: skip
    configs = {
        item.trial_id: validate_config(tiny_experiment(dataset, model={"variant": item.params["model.variant"]}))
        for item in rows
    }
    text = render_paper_table(PAPER_TABLES["table5"], rows, configs, data_label="d")
    lines = text.splitlines()
    assert lines[1].split()[:6] == ["paper", "SOTS", "paper", "NH-HAZE", "paper", "Parms"]
    assert lines[2].split()[:6] == ["a)", "B", "28.74/0.9631", "14.78/0.6064", "0.49", "20.00/0.8000"]
    assert lines[6].split()[:6] == ["e)", "HDM", "38.56/0.9909", "22.48/0.7373", "2.32", "24.00/0.8000"]
    # The swept models' own parameter counts close each row (8-channel models: ~0.0xM).
    assert all(line.split()[-1].startswith("0.0") for line in lines[2:7])


def test_table6_marks_the_depth_columns_as_not_run():
    rows = [row("t0", {"model.mask_source": "dcp"}, 19.0), row("t1", {"model.mask_source": "learned"}, 18.0)]
    text = render_paper_table(PAPER_TABLES["table6"], rows, {}, data_label="d")
    lines = text.splitlines()
    assert lines[1].split() == ["GT-Depth", "Predicted", "Depth", "DRconv[5]", "DCP(Ours)"]
    assert lines[2].split() == ["paper", "SOTS", "38.53/0.9908", "36.11/0.9811", "37.57/0.9902", "38.56/0.9909"]
    assert lines[3].split() == ["paper", "NH-HAZE", "-/-", "9.43/0.2579", "20.77/0.7267", "22.48/0.7373"]
    assert lines[4].split()[-4:] == ["n/a", "n/a", "18.00/0.8000", "19.00/0.8000"]
    assert "GT-Depth: not run: depth-guided masks need a depth map per image" in text
    assert "Predicted Depth: not run:" in text


def test_region_study_quotes_only_what_the_paper_prints():
    rows = [row(f"t{count}", {"model.num_regions": count}, 15.0 + count) for count in range(2, 9)]
    lines = render_paper_table(PAPER_TABLES["regions"], rows, {}, data_label="d").splitlines()
    assert lines[1].split() == [f"N={count}" for count in range(2, 9)]
    assert lines[2].split() == ["paper", "NH-HAZE", "-", "-", "-", "22.48/0.7373", "-", "-", "-"]
    assert "supplementary material" in "\n".join(lines)


def test_results_table_csv_plot_and_best_config(tmp_path, dataset):
    keys = ["train.lr", "model.num_regions"]
    rows = [
        row("a_00000", {"train.lr": 3e-3, "model.num_regions": 2}, 12.5),
        row("a_00001", {"train.lr": 1e-6, "model.num_regions": 2}, 6.25, stopped=True, epochs=1),
        row("a_00002", {"train.lr": 3e-3, "model.num_regions": 3}, None),
    ]
    table = format_table(rows, keys).splitlines()
    assert table[0].split() == ["trial", *keys, "best_val_psnr", "val_ssim", "epochs_run", "validations", "status"]
    assert table[2].split() == ["a_00000", "*", "0.003", "2", "12.5", "0.8", "4", "4", "finished"]
    assert table[3].split()[-4:] == ["1", "1", "stopped", "early"]
    assert table[4].split()[-1] == "failed" and "a_00002 failed: ValueError: boom" in table

    with write_csv(rows, keys, tmp_path / "results.csv").open() as handle:
        records = list(csv.DictReader(handle))
    assert [record["status"] for record in records] == ["finished", "stopped early", "failed"]
    assert records[1]["epochs_run"] == "1" and records[2]["error"] == "ValueError: boom"

    png = plot_val_psnr(rows, keys, tmp_path / "val_psnr.png", title="test")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (800, 500)

    base = tiny_experiment(dataset, run={"name": "base-run"})
    original = copy.deepcopy(base)
    path = tmp_path / "best.yaml"
    written = write_best_config(base, rows[0], path, name="sweep-best", header="best trial a_00000\nline two")
    assert base == original
    reloaded = load_config(path)
    assert reloaded == written
    assert reloaded.name == "sweep-best" and reloaded.run.name is None
    assert (reloaded.train.lr, reloaded.model.num_regions) == (3e-3, 2)
    assert path.read_text().startswith("# best trial a_00000\n# line two\n")
