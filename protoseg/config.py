"""Training configuration: typed sections, YAML files and ``section.key=value`` overrides.

A config file is a YAML mapping of sections (``model``, ``data``, ``loss``,
``optim``, ``train``) to keys; anything not given keeps its default. Unknown
sections or keys, values of the wrong type and values outside their choices
raise :class:`ConfigError` naming the key.
"""

# No ``from __future__ import annotations``: the field types are read at run time.
import dataclasses
import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin

from .hierarchies import HIERARCHY_NAMES


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid."""


def _choice(default: Any, *choices: Any) -> Any:
    return field(default=default, metadata={"choices": choices})


def _positive(default: Any, minimum: float = 0, strict: bool = True) -> Any:
    return field(default=default, metadata={"minimum": minimum, "strict": strict})


@dataclass
class ModelConfig:
    backbone: str = _choice("small_cnn", "small_cnn", "resnet18", "resnet34", "resnet50", "resnet101")
    width: int = _positive(32)  # small_cnn channel width
    output_stride: int = _choice(8, 8, 16, 32)  # ResNet backbones
    pretrained: bool = False  # ResNet: torchvision's ImageNet weights (downloads them)
    head: str = _choice("protoseg", "protoseg", "linear", "contrast", "hssn")
    num_prototypes: int = _positive(10)
    embed_dim: Optional[int] = _positive(None)  # None: the backbone's channels
    projection: str = _choice("mlp", "mlp", "linear", "none")
    momentum: float = field(default=0.999, metadata={"minimum": 0.0, "strict": False, "maximum": 1.0})
    temperature: float = _positive(1.0)
    sinkhorn_epsilon: float = _positive(0.05)
    sinkhorn_iterations: int = _positive(3, strict=False)
    assignment: Optional[str] = _choice(None, None, "argmax", "gumbel")
    compat: Optional[str] = _choice(None, None, "protoseg", "contrastiveseg", "hssn")
    warmup_iters: int = _positive(0, strict=False)
    # head=contrast (ContrastiveSeg, docs/spec.md §10, §12); embed_dim None means 256 there
    contrast_set: str = _choice("in_batch", "in_batch", "bank")
    contrast_anchors: str = _choice("sampled", "sampled", "dense")
    contrast_temperature: float = _positive(0.1)
    contrast_base_temperature: float = _positive(0.07)
    max_samples: int = _positive(1024)
    max_views: int = _positive(100)
    memory_size: int = _positive(5000)
    pixels_per_class: int = _positive(10)
    # head=hssn (HSSN, docs/spec.md §11, §12); embed_dim None means 256 there
    hierarchy: Optional[str] = _choice(None, None, *HIERARCHY_NAMES)  # None: the dataset's
    tree_min_scale: float = _positive(5.0)
    focal_gamma: Optional[float] = _positive(None, strict=False)  # None: the plain tree-min loss
    triplet_weight: float = _positive(0.5, strict=False)  # f(t) after the ramp
    triplet_ramp_iters: int = _positive(80000, strict=False)  # T of f(t)
    max_triplet: int = _positive(200)
    triplet_margin: float = _positive(0.6, strict=False)
    triplet_selection: str = _choice("first", "first", "random")
    hierarchy_rule: str = _choice("softmax_sum", "softmax_sum", "path_min")


@dataclass
class DataConfig:
    dataset: str = _choice("synthetic", "synthetic", "cityscapes", "ade20k")
    root: Optional[str] = None  # dataset folder (cityscapes, ade20k)
    crop_size: list = field(default_factory=lambda: [64, 64])  # training crop [height, width]
    scale_range: list = field(default_factory=lambda: [0.75, 1.5])  # random rescaling before the crop
    flip: bool = True
    eval_scale: float = _positive(1.0)  # images are resized by this for evaluation (labels are not)
    batch_size: int = _positive(16)  # per process
    val_batch_size: int = _positive(16)
    workers: int = _positive(0, strict=False)
    synthetic_train_images: int = _positive(1000)
    synthetic_val_images: int = _positive(200)
    synthetic_image_size: int = _positive(64)
    synthetic_seed: int = 0


@dataclass
class LossConfig:
    ppc_weight: float = _positive(0.01, strict=False)
    ppd_weight: float = _positive(0.001, strict=False)
    class_weights: Optional[list] = None
    contrast_weight: float = _positive(0.1, strict=False)  # λ of the pixel contrast (head=contrast)


@dataclass
class OptimConfig:
    optimizer: str = _choice("sgd", "sgd", "adamw")
    lr: float = _positive(0.01)
    weight_decay: float = _positive(5e-4, strict=False)
    momentum: float = _positive(0.9, strict=False)  # SGD only
    iters: int = _positive(1000)
    poly_power: float = _positive(0.9, strict=False)  # lr = base · (1 − it/iters)^power


@dataclass
class TrainConfig:
    output_dir: str = "runs/protoseg"
    seed: int = 0
    device: str = _choice("auto", "auto", "cpu", "cuda")
    amp: bool = True  # mixed precision (CUDA only)
    log_every: int = _positive(10)
    eval_every: int = _positive(0, strict=False)  # 0: evaluate at the end only
    checkpoint_every: int = _positive(0, strict=False)  # 0: at the end only
    resume: Optional[str] = None  # a checkpoint path, or "auto": output_dir/last.pt if it exists
    overwrite: bool = False  # replace a run already in output_dir (else refused, unless resuming)
    progress: bool = True  # tqdm progress bars


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
# Lists whose entries are checked: key -> (entry type, length or None).
LIST_ENTRIES = {
    "data.crop_size": (int, 2), "data.scale_range": (float, 2), "loss.class_weights": (float, None),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (int/float/bool/str/list, optionally Optional)."""
    if get_origin(tp) is Union:
        if value is None:
            return None
        tp = next(arg for arg in get_args(tp) if arg is not type(None))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is list and key in LIST_ENTRIES and isinstance(value, list):
        entry_type, length = LIST_ENTRIES[key]
        if length is not None and len(value) != length:
            raise ConfigError(f"{key} must be a list of {length} numbers, got {value!r}")
        return [_coerce(key, v, entry_type) for v in value]
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be of type {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _check_range(key: str, value: Any, metadata: Any) -> None:
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    if value is None or not isinstance(value, (int, float)):
        return
    if "minimum" in metadata:
        low, strict = metadata["minimum"], metadata.get("strict", True)
        if value < low or (strict and value == low):
            raise ConfigError(f"{key} must be {'>' if strict else '>='} {low}, got {value!r}")
    if "maximum" in metadata and value > metadata["maximum"]:
        raise ConfigError(f"{key} must be <= {metadata['maximum']}, got {value!r}")


def _unknown(kind: str, name: str, known: list) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown {kind} {name!r}{hint} (known: {', '.join(known)})")


def _set(config: Config, key: str, value: Any) -> None:
    section_name, _, name = key.partition(".")
    if section_name not in SECTIONS:
        raise _unknown("config section", section_name, list(SECTIONS))
    section = getattr(config, section_name)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if name not in fields:
        raise _unknown(f"key in section {section_name!r}", name, list(fields))
    value = _coerce(key, value, fields[name].type)
    _check_range(key, value, fields[name].metadata)
    setattr(section, name, value)


def _check_consistency(config: Config) -> None:
    low, high = config.data.scale_range
    if not 0 < low <= high:
        raise ConfigError(f"data.scale_range must be [low, high] with 0 < low <= high, got {[low, high]}")
    if min(config.data.crop_size) < 1:
        raise ConfigError(f"data.crop_size must be positive, got {config.data.crop_size}")
    if config.data.dataset != "synthetic" and not config.data.root:
        name = config.data.dataset
        raise ConfigError(f"data.root must name the {name} folder (data.dataset={name!r})")
    model = config.model
    if model.backbone in ("resnet18", "resnet34") and model.output_stride != 32:
        raise ConfigError(f"model.backbone={model.backbone} supports only model.output_stride=32 (its basic "
                          f"blocks cannot be dilated), got {model.output_stride}")
    if model.compat == "protoseg" and model.assignment == "argmax":
        raise ConfigError("model.compat='protoseg' uses the Gumbel assignment; remove model.assignment=argmax")
    compat_heads = {"protoseg": "protoseg", "contrastiveseg": "contrast", "hssn": "hssn"}
    if model.compat is not None and model.head != compat_heads[model.compat]:
        raise ConfigError(f"model.compat={model.compat!r} needs model.head={compat_heads[model.compat]!r}, "
                          f"got {model.head!r}")
    if model.compat == "contrastiveseg" and model.contrast_set != "bank":
        raise ConfigError("model.compat='contrastiveseg' reproduces the original memory bank; "
                          "it needs model.contrast_set=bank")


def _flatten(mapping: Any, source: str) -> dict:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source} must be a mapping of sections, got {type(mapping).__name__}")
    flat = {}
    for section_name, section in mapping.items():
        if section_name not in SECTIONS:
            raise _unknown("config section", str(section_name), list(SECTIONS))
        if not isinstance(section, dict):
            raise ConfigError(f"section {section_name!r} in {source} must be a mapping, got {section!r}")
        flat.update({f"{section_name}.{key}": value for key, value in section.items()})
    return flat


def packaged_config(name: str) -> Path:
    """Path of a config shipped with the package (``protoseg/configs/<name>.yaml``)."""
    return Path(str(resources.files("protoseg") / "configs" / f"{name}.yaml"))


def packaged_config_names() -> list:
    folder = resources.files("protoseg") / "configs"
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A file path, or the name of a packaged config (e.g. ``demo``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.suffix == "" and path.name in packaged_config_names():
        return packaged_config(path.name)
    raise ConfigError(
        f"config file {name_or_path!r} not found (packaged configs: {', '.join(packaged_config_names())})"
    )


def _yaml():
    """PyYAML, imported when a config is read (``--help`` works without it)."""
    try:
        import yaml
    except ImportError as exc:
        raise ConfigError("reading configs needs PyYAML: pip install 'protoseg-kernels[train]'") from exc
    return yaml


def parse_override(text: str) -> tuple:
    """``section.key=value`` with the value parsed as YAML (``lr=1e-3``, ``crop_size=[32,32]``)."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.lr=0.01)")
    yaml = _yaml()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse the value: {exc}") from exc
    return key.strip(), value


def build_config(mapping: Optional[dict] = None, overrides: tuple = (), source: str = "config") -> Config:
    """A validated :class:`Config` from a mapping of sections and ``key=value`` overrides."""
    config = Config()
    for key, value in _flatten(mapping, source).items():
        _set(config, key, value)
    for text in overrides:
        _set(config, *parse_override(text))
    _check_consistency(config)
    return config


def load_config(name_or_path: Optional[str] = None, overrides: tuple = ()) -> Config:
    """Read a YAML config (a path or a packaged name; None: defaults) and apply overrides."""
    if name_or_path is None:
        return build_config(None, overrides)
    path = resolve_config_path(name_or_path)
    yaml = _yaml()
    try:
        mapping = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return build_config(mapping, overrides, source=str(path))
