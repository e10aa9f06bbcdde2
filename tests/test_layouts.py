"""Pairing rules of each benchmark layout, on file lists that mimic the real naming."""

from __future__ import annotations

import pytest

from hdm_platform.data.ingest import assign_val_split
from hdm_platform.data.layouts import LAYOUTS, LayoutOptions, get_layout, split_from_path


def pair(layout: str, files: list[str], **options: object) -> tuple[dict[str, tuple], list]:
    pairing = get_layout(layout).pair(files, LayoutOptions(**options))  # type: ignore[arg-type]
    return {p.id: (p.split, p.input, p.target) for p in pairing.pairs}, pairing.problems


def test_its_pairs_every_hazy_rendering_with_its_scene() -> None:
    pairs, problems = pair(
        "its",
        [
            "hazy/1_1_0.90179.png",
            "hazy/1_2_0.8.png",
            "hazy/2_1_0.7.png",
            "clear/1.png",
            "clear/2.png",
            "trans/1_1.png",
        ],
    )
    assert problems == []
    assert pairs == {
        "its/1_1_0.90179": ("train", "hazy/1_1_0.90179.png", "clear/1.png"),
        "its/1_2_0.8": ("train", "hazy/1_2_0.8.png", "clear/1.png"),
        "its/2_1_0.7": ("train", "hazy/2_1_0.7.png", "clear/2.png"),
    }


def test_sots_indoor_gt_and_outdoor_clear_with_jpeg_inputs_are_test_pairs() -> None:
    files = [
        "indoor/hazy/1400_1.png",
        "indoor/hazy/1400_2.png",
        "indoor/gt/1400.png",
        "outdoor/hazy/0001_0.8_0.2.jpg",
        "outdoor/clear/0001.png",
        "README.txt",
    ]
    pairs, problems = pair("sots", files, split="train")
    assert problems == []
    assert pairs == {
        "sots/indoor/1400_1": ("test", "indoor/hazy/1400_1.png", "indoor/gt/1400.png"),
        "sots/indoor/1400_2": ("test", "indoor/hazy/1400_2.png", "indoor/gt/1400.png"),
        "sots/outdoor/0001_0.8_0.2": ("test", "outdoor/hazy/0001_0.8_0.2.jpg", "outdoor/clear/0001.png"),
    }


def test_sots_as_dehazeformer_keeps_it_pairs_same_names_and_says_so() -> None:
    # DehazeFormer's data/RESIDE-IN gives each hazy rendering a clear image of its own name.
    files = ["test/hazy/1400_1.png", "test/hazy/1400_2.png", "test/GT/1400_1.png", "test/GT/1400_2.png"]
    pairing = get_layout("sots").pair(files, LayoutOptions())
    assert pairing.problems == []
    assert [(p.id, p.split, p.input, p.target) for p in pairing.pairs] == [
        ("sots/test/1400_1", "test", "test/hazy/1400_1.png", "test/GT/1400_1.png"),
        ("sots/test/1400_2", "test", "test/hazy/1400_2.png", "test/GT/1400_2.png"),
    ]
    assert pairing.namings == {"hazy/SCENE_K[_BETA] -> gt|clear/SCENE_K[_BETA] (same name)": 2}
    # Both renderings of scene 1400 are one group, so a validation split keeps them together.
    assert {p.group for p in pairing.pairs} == {"test/GT/1400.png"}
    published = get_layout("sots").pair(["hazy/1400_1.png", "gt/1400.png"], LayoutOptions())
    assert published.namings == {"hazy/SCENE_K[_BETA] -> gt|clear/SCENE": 1}
    assert [p.group for p in published.pairs] == ["gt/1400.png"]


@pytest.mark.parametrize("layout", ["nh-haze", "dense-haze"])
def test_nh_and_dense_haze_pair_hazy_with_gt_in_one_folder_or_subfolders(layout: str) -> None:
    flat, problems = pair(layout, ["01_hazy.png", "01_GT.png", "02_hazy.png", "02_GT.png"], split="test")
    assert problems == []
    assert flat == {
        f"{layout}/01": ("test", "01_hazy.png", "01_GT.png"),
        f"{layout}/02": ("test", "02_hazy.png", "02_GT.png"),
    }
    nested, problems = pair(layout, ["hazy/01_hazy.png", "GT/01_GT.png"])
    assert problems == []
    assert nested == {f"{layout}/01": ("train", "hazy/01_hazy.png", "GT/01_GT.png")}


@pytest.mark.parametrize("layout", ["rain100l", "rain100h", "rain200h"])
def test_rain_layouts_accept_every_name_variant(layout: str) -> None:
    files = [
        "train/rain/norain-1x2.png",
        "train/norain/norain-1.png",
        "train/rain/rain-2.png",
        "train/norain/norain-2.png",
        "train/rain/X2/norain-4x2.png",
        "train/norain/norain-4.png",
        "test/rain/3.png",
        "test/norain/3.png",
    ]
    pairs, problems = pair(layout, files)
    assert problems == []
    assert pairs == {
        f"{layout}/train/norain-1x2": ("train", "train/rain/norain-1x2.png", "train/norain/norain-1.png"),
        f"{layout}/train/rain-2": ("train", "train/rain/rain-2.png", "train/norain/norain-2.png"),
        f"{layout}/train/X2/norain-4x2": (
            "train",
            "train/rain/X2/norain-4x2.png",
            "train/norain/norain-4.png",
        ),
        f"{layout}/test/3": ("test", "test/rain/3.png", "test/norain/3.png"),
    }


def test_did_pairs_each_side_by_side_file_with_itself() -> None:
    pairing = get_layout("did").pair(
        ["DID-MDN-training/Rain_Heavy/1.jpg", "DID-MDN-test/2.jpg"], LayoutOptions(input_half="left")
    )
    assert [(p.id, p.split, p.input, p.target, p.input_half) for p in pairing.pairs] == [
        ("did/DID-MDN-test/2", "test", "DID-MDN-test/2.jpg", "DID-MDN-test/2.jpg", "left"),
        (
            "did/DID-MDN-training/Rain_Heavy/1",
            "train",
            "DID-MDN-training/Rain_Heavy/1.jpg",
            "DID-MDN-training/Rain_Heavy/1.jpg",
            "left",
        ),
    ]


def test_lol_maps_our485_to_train_and_eval15_to_test_and_reads_lol_v2_names() -> None:
    pairs, problems = pair(
        "lol",
        [
            "our485/low/2.png",
            "our485/high/2.png",
            "eval15/low/1.png",
            "eval15/high/1.png",
            "v2/Train/Low/low00001.png",
            "v2/Train/Normal/normal00001.png",
        ],
    )
    assert problems == []
    assert pairs == {
        "lol/our485/2": ("train", "our485/low/2.png", "our485/high/2.png"),
        "lol/eval15/1": ("test", "eval15/low/1.png", "eval15/high/1.png"),
        "lol/v2/Train/low00001": ("train", "v2/Train/Low/low00001.png", "v2/Train/Normal/normal00001.png"),
    }


def test_generic_paired_layout_by_stem_and_by_pattern() -> None:
    by_stem, problems = pair(
        "paired", ["in/a.png", "out/a.jpg"], input_dir="in", target_dir="out", split="val"
    )
    assert problems == []
    assert by_stem == {"paired/a": ("val", "in/a.png", "out/a.jpg")}
    by_pattern, problems = pair(
        "paired", ["input/7_rain_heavy.png", "target/7.png"], pair_pattern=r"(?P<key>\d+)_.*"
    )
    assert problems == []
    assert by_pattern == {"paired/7_rain_heavy": ("train", "input/7_rain_heavy.png", "target/7.png")}


def test_generic_paired_layout_rejects_patterns_without_a_key_group() -> None:
    with pytest.raises(ValueError, match="no \\(\\?P<key>"):
        pair("paired", ["input/1.png", "target/1.png"], pair_pattern=r"\d+")
    with pytest.raises(ValueError, match="invalid --pair-pattern"):
        pair("paired", ["input/1.png", "target/1.png"], pair_pattern="(")


def test_unpaired_layout_is_an_inference_set_without_targets() -> None:
    pairs, problems = pair("unpaired", ["a.jpg", "sub/b.png", "notes.txt"], split="train")
    assert problems == []
    assert pairs == {"unpaired/a": ("infer", "a.jpg", None), "unpaired/sub/b": ("infer", "sub/b.png", None)}


def test_problems_name_missing_partners_on_both_sides_bad_names_and_duplicate_ids() -> None:
    _, problems = pair(
        "sots", ["hazy/1_1.png", "hazy/2_1.png", "gt/1.png", "gt/3.png", "hazy/nounderscore.png"]
    )
    reasons = {(p.input, p.target): p.reason for p in problems}
    assert reasons[("hazy/2_1.png", None)].startswith("missing partner: no target '2'")
    assert reasons[(None, "gt/3.png")] == "missing partner: no input for this target"
    assert reasons[("hazy/nounderscore.png", None)] == "name does not follow SCENE_K[_BETA]"
    _, problems = pair("rain100h", ["rain/1.png", "rain/1.jpg", "norain/1.png"])
    assert {p.input for p in problems} == {"rain/1.png", "rain/1.jpg"}
    assert all("duplicate id 'rain100h/1'" in p.reason for p in problems)


def test_split_precedence_folder_then_layout_then_user() -> None:
    assert split_from_path(["Rain100L", "rain_data_train_Light"]) == "train"
    assert split_from_path(["data", "testing"]) == "test"
    assert split_from_path(["misc"]) is None
    user, _ = pair("rain100h", ["rain/1.png", "norain/1.png"], split="test")
    assert user["rain100h/1"][0] == "test"
    folder, _ = pair("rain100h", ["val/rain/1.png", "val/norain/1.png"], split="test")
    assert folder["rain100h/val/1"][0] == "val"


def test_val_fraction_is_deterministic_keeps_scenes_together_and_leaves_test_alone() -> None:
    hazy = [f"hazy/{scene}_{k}_0.8.png" for scene in range(40) for k in range(1, 4)]
    clear = [f"clear/{scene}.png" for scene in range(40)]
    pairing = get_layout("its").pair(hazy + clear, LayoutOptions())
    first = assign_val_split(pairing.pairs, 0.25)
    # A pair's split depends on the pair alone, not on which other pairs are listed.
    assert assign_val_split(pairing.pairs[::2], 0.25) == first[::2]
    val_scenes = {p.target for p in first if p.split == "val"}
    train_scenes = {p.target for p in first if p.split == "train"}
    assert val_scenes and train_scenes and not val_scenes & train_scenes
    assert 3 <= len(val_scenes) <= 18
    sots = get_layout("sots").pair(["hazy/1_1.png", "gt/1.png"], LayoutOptions()).pairs
    assert [p.split for p in assign_val_split(sots, 0.99)] == ["test"]


def test_every_layout_is_registered_under_its_cli_name() -> None:
    assert set(LAYOUTS) == {
        "its",
        "sots",
        "nh-haze",
        "dense-haze",
        "rain100l",
        "rain100h",
        "rain200h",
        "did",
        "lol",
        "paired",
        "unpaired",
    }
    with pytest.raises(ValueError, match="unknown layout 'nope'; choose one of its, sots"):
        get_layout("nope")
