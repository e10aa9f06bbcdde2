"""How the paper's benchmarks name their files, and how their inputs pair with targets.

A layout turns a source folder's file list (paths relative to the folder) into
:class:`PairSpec` records and :class:`Problem` records (missing partners, ambiguous or
unparsable names). It reads no image: :mod:`hdm_platform.data.ingest` does that.

Supported layouts (paper section 4 lists the benchmarks):

========== ========================================================== ==========
layout     naming                                                     task
========== ========================================================== ==========
its        ``hazy/SCENE_K_BETA.png`` -> ``clear/SCENE.png``           dehaze
sots       ``hazy/SCENE_K[_BETA].png`` -> ``gt/SCENE.png`` (or         dehaze
           ``clear/``), or ``gt/SCENE_K[_BETA].png`` of the same name
           (DehazeFormer's copy); outdoor inputs may be ``.jpg``
nh-haze    ``NN_hazy.png`` <-> ``NN_GT.png`` in one folder           dehaze
dense-haze as nh-haze (also with ``hazy/`` and ``GT/`` sub-folders)  dehaze
rain100l   ``rain/[rain-|norain-]N[x2].png`` -> ``norain/[norain-]N``  derain
rain100h   as rain100l                                                derain
rain200h   as rain100l (``rain/X2/norain-Nx2.png`` in JORDER's copy)  derain
did        DID-data: input and target side by side in one image       derain
lol        ``low/NAME`` <-> ``high/NAME`` (LOL-v2: ``Low/lowN``,       lowlight
           ``Normal/normalN``)
paired     ``INPUT_DIR/x`` <-> ``TARGET_DIR/x`` by stem or a regex      (--task)
unpaired   every image, split "infer", no target                      (--task)
========== ========================================================== ==========

Splits: a folder component naming a split (``train``, ``training``, ``our485`` -> train;
``test``, ``testing``, ``eval15`` -> test; ``val``, ``valid``, ``validation`` -> val) wins;
then the split a layout is defined by (ITS is a training set, SOTS a test set); then the
user's ``--split``; then "train".
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Literal

from hdm_platform.vocabulary import Split, Task

__all__ = [
    "IMAGE_SUFFIXES",
    "LAYOUTS",
    "Half",
    "Layout",
    "LayoutOptions",
    "Naming",
    "PairSpec",
    "Pairing",
    "Problem",
    "get_layout",
    "is_image",
    "split_from_path",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm"})

Half = Literal["left", "right"]

_SPLIT_TOKENS: dict[str, Split] = {
    "train": "train",
    "training": "train",
    "our485": "train",
    "test": "test",
    "testing": "test",
    "eval15": "test",
    "val": "val",
    "valid": "val",
    "validation": "val",
}


def is_image(path: str) -> bool:
    """Whether ``path`` has an image file suffix (case-insensitive)."""
    return PurePosixPath(path).suffix.lower() in IMAGE_SUFFIXES


def split_from_path(folders: Sequence[str]) -> Split | None:
    """The split named by the deepest folder that names one (``rain_data_train_Light``)."""
    for folder in reversed(folders):
        for token in re.split(r"[^0-9a-z]+", folder.lower()):
            if token in _SPLIT_TOKENS:
                return _SPLIT_TOKENS[token]
    return None


@dataclass(frozen=True)
class LayoutOptions:
    """User choices that affect pairing.

    Attributes:
        split: the split for pairs whose layout and folders do not name one.
        pair_pattern: ``paired`` layout: a regex with a ``key`` group; it must match the
            whole input stem, and the key is looked up among target stems.
        input_dir: ``paired`` layout: the folder name holding inputs.
        target_dir: ``paired`` layout: the folder name holding targets.
        input_half: ``did`` layout: which half of the side-by-side image is the degraded
            input. DID-MDN's loader crops ``A = left`` and trains ``B2A``, i.e. the
            rainy image is the right half.
    """

    split: Split | None = None
    pair_pattern: str | None = None
    input_dir: str = "input"
    target_dir: str = "target"
    input_half: Half = "right"


@dataclass(frozen=True)
class PairSpec:
    """One pair to ingest; paths are relative to the source folder.

    ``group`` is what a validation split hashes: all hazy renderings of one clear scene
    share it, so a scene never lands in both train and val. ``naming`` describes how the
    input's name found its target (None where no name did: ``did``, ``unpaired``).
    """

    id: str
    split: Split
    input: str
    target: str | None
    group: str
    input_half: Half | None = None
    naming: str | None = None


@dataclass(frozen=True)
class Problem:
    """A pair that cannot be ingested, naming its files (relative paths)."""

    input: str | None
    target: str | None
    reason: str


@dataclass
class Pairing:
    """The result of pairing a file list: pairs sorted by id, and the problems found."""

    pairs: list[PairSpec] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def namings(self) -> dict[str, int]:
        """How many pairs each naming paired, in the order first found; empty for the
        layouts that pair no names (``did``, ``unpaired``)."""
        return dict(Counter(pair.naming for pair in self.pairs if pair.naming is not None))


class Layout(ABC):
    """A benchmark's file naming."""

    name: str
    default_task: Task | None
    paired: bool = True
    split: Split | None = None
    """The split the benchmark is by definition (ITS: train, SOTS: test); None if it has none."""

    @abstractmethod
    def pair(self, files: Sequence[str], options: LayoutOptions) -> Pairing:
        """Pairs the images among ``files`` (relative paths; non-images are ignored)."""

    def _split(self, folders: Sequence[str], options: LayoutOptions) -> Split:
        return split_from_path(folders) or self.split or options.split or "train"

    def _id(self, *parts: str) -> str:
        return "/".join([self.name, *(part for part in parts if part)])


def _finish(pairs: list[PairSpec], problems: list[Problem]) -> Pairing:
    """Sorts pairs by id and reports ids that two inputs would share."""
    by_id: dict[str, list[PairSpec]] = defaultdict(list)
    for pair in pairs:
        by_id[pair.id].append(pair)
    unique = []
    for pair_id, same in sorted(by_id.items()):
        if len(same) == 1:
            unique.append(same[0])
            continue
        names = ", ".join(pair.input for pair in same)
        problems.extend(
            Problem(pair.input, pair.target, f"duplicate id {pair_id!r} ({names})") for pair in same
        )
    return Pairing(unique, sorted(problems, key=lambda p: (p.input or "", p.target or "")))


KeyFunction = Callable[[str], str | None]


def _stem_key(stem: str) -> str | None:
    return stem


def _scene_key(stem: str) -> str | None:
    # RESIDE hazy names are SCENE_K[_BETA] (ITS: 1_1_0.90179, SOTS indoor: 1400_1,
    # SOTS outdoor: 0001_0.8_0.2); the clear image is SCENE.
    match = re.fullmatch(r"(?P<scene>[^_]+)_.+", stem)
    return match["scene"] if match else None


def _rendering_key(stem: str) -> str | None:
    # DehazeFormer's copy of RESIDE gives each hazy rendering a clear image of its own name.
    return stem if _scene_key(stem) is not None else None


def _rain_key(stem: str) -> str | None:
    # Rain100L/H and Rain200H copies name the same pair 1.png, rain-1.png, norain-1x2.png
    # (JORDER's X2 folder) or norain-1.png; the key is the number in the middle.
    match = re.fullmatch(r"(?:(?:no)?rain-)?(?P<key>.+?)(?:-?x2)?", stem, flags=re.IGNORECASE)
    return match["key"] if match else None


def _lol_key(stem: str) -> str | None:
    # LOL names both sides identically; LOL-v2 prefixes them (low00001 / normal00001).
    return re.sub(r"^(?:low|normal|high)(?=\d)", "", stem, flags=re.IGNORECASE)


@dataclass(frozen=True)
class Naming:
    """One way a benchmark names its targets after its inputs.

    An input pairs with the target whose ``target_key`` is the input's ``input_key``
    (``input_key`` is None for a name this naming does not read). Where each input has a
    target file of its own, ``scene_key`` says what the renderings of one scene share, so
    that a validation split keeps them together.
    """

    description: str
    input_key: KeyFunction
    target_key: KeyFunction
    scene_key: KeyFunction | None = None

    def group(self, target: str, input_stem: str) -> str:
        """The pair's :attr:`PairSpec.group`: the target, or the scene's image in its folder."""
        if self.scene_key is None:
            return target
        return str(PurePosixPath(target).with_stem(self.scene_key(input_stem) or input_stem))


_Folders = tuple[str, ...]


def _by_role(
    files: Sequence[str], input_dirs: frozenset[str], target_dirs: frozenset[str]
) -> tuple[dict[_Folders, list[tuple[str, _Folders]]], dict[_Folders, list[str]]]:
    """Inputs (with their folders inside the input folder) and targets, by parent folder."""
    inputs: dict[_Folders, list[tuple[str, _Folders]]] = defaultdict(list)
    targets: dict[_Folders, list[str]] = defaultdict(list)
    for path in filter(is_image, files):
        parts = PurePosixPath(path).parts
        folders = [part.lower() for part in parts[:-1]]
        roles = [i for i, folder in enumerate(folders) if folder in input_dirs | target_dirs]
        if not roles:
            continue
        at = roles[-1]
        if folders[at] in input_dirs:
            inputs[parts[:at]].append((path, parts[at + 1 : -1]))
        else:
            targets[parts[:at]].append(path)
    return inputs, targets


def _by_key(paths: Sequence[str], key: KeyFunction) -> dict[str, list[str]]:
    by_key: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        stem = PurePosixPath(path).stem
        by_key[key(stem) or stem].append(path)
    return by_key


def _find_targets(
    stem: str, namings: Sequence[Naming], targets: Sequence[Mapping[str, list[str]]]
) -> tuple[Naming | None, list[str], list[str]]:
    """The first naming under which ``stem`` has targets, those targets, and the keys tried
    in vain (none if no naming reads ``stem``); ``targets`` is indexed by each naming's key."""
    tried: list[str] = []
    for naming, by_key in zip(namings, targets, strict=True):
        key = naming.input_key(stem)
        if key is not None and key in by_key:
            return naming, by_key[key], tried
        if key is not None and key not in tried:
            tried.append(key)
    return None, [], tried


class FolderPairLayout(Layout):
    """Inputs and targets in sibling folders (``hazy/`` and ``gt/``), paired by name.

    The sibling folders may sit at any depth (``SOTS/indoor/hazy``, ``LOL/our485/low``);
    each parent folder is paired on its own. Inputs may sit in sub-folders of the input
    folder (``rain/X2/``). Each input is paired by the first of the layout's namings under
    which it has a target.
    """

    def __init__(
        self,
        name: str,
        *,
        default_task: Task | None,
        input_dirs: Sequence[str],
        target_dirs: Sequence[str],
        namings: Sequence[Naming],
        input_naming: str,
        split: Split | None = None,
    ) -> None:
        self.name = name
        self.default_task = default_task
        self.split = split
        self._input_dirs = frozenset(d.lower() for d in input_dirs)
        self._target_dirs = frozenset(d.lower() for d in target_dirs)
        self._naming_rules = tuple(namings)
        self._input_naming = input_naming

    def _roles(self, options: LayoutOptions) -> tuple[frozenset[str], frozenset[str]]:
        return self._input_dirs, self._target_dirs

    def _namings(self, options: LayoutOptions) -> Sequence[Naming]:
        return self._naming_rules

    def pair(self, files: Sequence[str], options: LayoutOptions) -> Pairing:
        input_dirs, target_dirs = self._roles(options)
        namings = self._namings(options)
        inputs, targets = _by_role(files, input_dirs, target_dirs)
        pairs: list[PairSpec] = []
        problems: list[Problem] = []
        used: set[str] = set()
        for parent, members in inputs.items():
            split = self._split(parent, options)
            by_key = [_by_key(targets.get(parent, []), naming.target_key) for naming in namings]
            expected = "/".join([*parent, "|".join(sorted(target_dirs))])
            for path, inner in members:
                stem = PurePosixPath(path).stem
                naming, candidates, tried = _find_targets(stem, namings, by_key)
                used.update(candidates)
                if naming is None and not tried:
                    problems.append(Problem(path, None, f"name does not follow {self._input_naming}"))
                elif naming is None:
                    keys = " or ".join(repr(key) for key in tried)
                    problems.append(Problem(path, None, f"missing partner: no target {keys} in {expected}/"))
                elif len(candidates) > 1:
                    problems.append(Problem(path, None, f"ambiguous targets: {', '.join(candidates)}"))
                else:
                    target = candidates[0]
                    pair_id = self._id(*parent, *inner, stem)
                    group = naming.group(target, stem)
                    pairs.append(PairSpec(pair_id, split, path, target, group, naming=naming.description))
        problems.extend(
            Problem(None, path, "missing partner: no input for this target")
            for paths in targets.values()
            for path in paths
            if path not in used
        )
        return _finish(pairs, problems)


class GenericPairedLayout(FolderPairLayout):
    """Two user-named folders, paired by identical stem or by ``--pair-pattern``."""

    def __init__(self) -> None:
        super().__init__(
            "paired",
            default_task=None,
            input_dirs=(),
            target_dirs=(),
            namings=(),
            input_naming="the pair pattern",
        )

    def _roles(self, options: LayoutOptions) -> tuple[frozenset[str], frozenset[str]]:
        input_dir, target_dir = options.input_dir.lower(), options.target_dir.lower()
        if input_dir == target_dir:
            raise ValueError(f"input and target folders must differ, both are {input_dir!r}")
        return frozenset({input_dir}), frozenset({target_dir})

    def _namings(self, options: LayoutOptions) -> Sequence[Naming]:
        folders = f"{options.input_dir}/NAME -> {options.target_dir}/"
        if options.pair_pattern is None:
            return [Naming(folders + "NAME", _stem_key, _stem_key)]
        try:
            pattern = re.compile(options.pair_pattern)
        except re.error as error:
            raise ValueError(f"invalid --pair-pattern {options.pair_pattern!r}: {error}") from error
        if "key" not in pattern.groupindex:
            raise ValueError(f"--pair-pattern {options.pair_pattern!r} has no (?P<key>...) group")

        def input_key(stem: str) -> str | None:
            match = pattern.fullmatch(stem)
            return match["key"] if match else None

        return [Naming(f"{folders}KEY, NAME matching {options.pair_pattern}", input_key, _stem_key)]


class SuffixPairLayout(Layout):
    """NH-HAZE and Dense-Haze: ``NN_hazy`` and ``NN_GT`` share a folder (or sit in
    ``hazy/`` and ``GT/`` sub-folders of one folder)."""

    _ROLE = re.compile(r"(?P<key>.+)_(?P<role>hazy|gt)", flags=re.IGNORECASE)
    _ROLE_FOLDERS = frozenset({"hazy", "gt"})
    _NAMING = "NN_hazy <-> NN_GT"

    def __init__(self, name: str) -> None:
        self.name = name
        self.default_task = "dehaze"

    def pair(self, files: Sequence[str], options: LayoutOptions) -> Pairing:
        groups: dict[tuple[tuple[str, ...], str], dict[str, list[str]]] = defaultdict(
            lambda: defaultdict(list)
        )
        problems: list[Problem] = []
        for path in filter(is_image, files):
            parts = PurePosixPath(path).parts
            match = self._ROLE.fullmatch(PurePosixPath(path).stem)
            if match is None:
                problems.append(Problem(path, None, "name does not follow NN_hazy / NN_GT"))
                continue
            parent = parts[:-1]
            if parent and parent[-1].lower() in self._ROLE_FOLDERS:
                parent = parent[:-1]
            groups[(parent, match["key"])][match["role"].lower()].append(path)

        pairs = []
        for (parent, key), roles in groups.items():
            hazy, clear = roles.get("hazy", []), roles.get("gt", [])
            if len(hazy) == 1 and len(clear) == 1:
                pair_id, split = self._id(*parent, key), self._split(parent, options)
                pairs.append(PairSpec(pair_id, split, hazy[0], clear[0], clear[0], naming=self._NAMING))
            elif not clear:
                problems.extend(Problem(p, None, f"missing partner: no {key}_GT") for p in hazy)
            elif not hazy:
                problems.extend(Problem(None, p, f"missing partner: no {key}_hazy") for p in clear)
            else:
                names = ", ".join(hazy + clear)
                problems.append(Problem(hazy[0], clear[0], f"ambiguous pair {key!r}: {names}"))
        return _finish(pairs, problems)


class SideBySideLayout(Layout):
    """DID-data (DID-MDN): each file holds the target and the input side by side."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.default_task = "derain"

    def pair(self, files: Sequence[str], options: LayoutOptions) -> Pairing:
        pairs = []
        for path in filter(is_image, files):
            parts = PurePosixPath(path).parts
            pair_id = self._id(*parts[:-1], PurePosixPath(path).stem)
            split = self._split(parts[:-1], options)
            pairs.append(PairSpec(pair_id, split, path, path, path, input_half=options.input_half))
        return _finish(pairs, [])


class UnpairedLayout(Layout):
    """Real photos without ground truth: an inference-only set (split "infer")."""

    paired = False

    def __init__(self) -> None:
        self.name = "unpaired"
        self.default_task = None

    def pair(self, files: Sequence[str], options: LayoutOptions) -> Pairing:
        pairs = []
        for path in filter(is_image, files):
            parts = PurePosixPath(path).parts
            pair_id = self._id(*parts[:-1], PurePosixPath(path).stem)
            pairs.append(PairSpec(pair_id, "infer", path, None, path))
        return _finish(pairs, [])


_RESIDE = Naming("hazy/SCENE_K[_BETA] -> gt|clear/SCENE", _scene_key, _stem_key)
_SAME_NAME = Naming(
    "hazy/SCENE_K[_BETA] -> gt|clear/SCENE_K[_BETA] (same name)",
    _rendering_key,
    _stem_key,
    scene_key=_scene_key,
)


def _rain_layout(name: str) -> FolderPairLayout:
    return FolderPairLayout(
        name,
        default_task="derain",
        input_dirs=("rain",),
        target_dirs=("norain",),
        namings=[Naming("rain/[rain-|norain-]N[x2] -> norain/[norain-]N", _rain_key, _rain_key)],
        input_naming="[rain-|norain-]N[x2]",
    )


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        FolderPairLayout(
            "its",
            default_task="dehaze",
            input_dirs=("hazy",),
            target_dirs=("clear",),
            namings=[Naming("hazy/SCENE_K_BETA -> clear/SCENE", _scene_key, _stem_key)],
            input_naming="SCENE_K_BETA",
            split="train",
        ),
        FolderPairLayout(
            "sots",
            default_task="dehaze",
            input_dirs=("hazy",),
            target_dirs=("gt", "clear"),
            # SOTS as published, then as DehazeFormer's data/RESIDE-IN keeps it.
            namings=[_RESIDE, _SAME_NAME],
            input_naming="SCENE_K[_BETA]",
            split="test",
        ),
        SuffixPairLayout("nh-haze"),
        SuffixPairLayout("dense-haze"),
        _rain_layout("rain100l"),
        _rain_layout("rain100h"),
        _rain_layout("rain200h"),
        SideBySideLayout("did"),
        FolderPairLayout(
            "lol",
            default_task="lowlight",
            input_dirs=("low",),
            target_dirs=("high", "normal"),
            namings=[
                Naming("low/NAME -> high/NAME (LOL-v2: Low/lowN -> Normal/normalN)", _lol_key, _lol_key)
            ],
            input_naming="identical names in low/ and high/",
        ),
        GenericPairedLayout(),
        UnpairedLayout(),
    )
}


def get_layout(name: str) -> Layout:
    """The layout called ``name``; raises ValueError listing the known ones."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}") from None
