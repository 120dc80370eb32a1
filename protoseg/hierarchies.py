"""The class hierarchies of the packaged datasets (HSSN, docs/spec.md §11, §12), by name.

A config names one (``model.hierarchy``) or takes its dataset's. Building one checks that its
leaves are the dataset's classes, in order, so a hierarchy never silently relabels classes.
"""

from __future__ import annotations

from collections.abc import Sequence

# The embedded synthetic scenes (protoseg/data/synthetic.py): the background is "stuff", the
# four object classes are "things" (two levels, V = 7).
SYNTHETIC_GROUPS = (("stuff", ("background",)), ("thing", ("class-A", "class-B", "class-C", "class-D")))
HIERARCHY_NAMES = ("cityscapes", "synthetic")
DATASET_HIERARCHIES = {"cityscapes": "cityscapes", "synthetic": "synthetic"}  # dataset -> its hierarchy


def from_named_groups(groups: Sequence[tuple[str, Sequence[str]]], class_names: Sequence[str]):
    """A two-level :class:`~protoseg_kernels.Hierarchy` from (superclass, member class names)
    pairs; leaves in the order of ``class_names``."""
    import protoseg_kernels as pk

    position = {name: i for i, name in enumerate(class_names)}
    unknown = [member for _, members in groups for member in members if member not in position]
    if unknown:
        raise ValueError(f"hierarchy: {unknown[0]!r} is not a class of the dataset ({', '.join(class_names)})")
    return pk.Hierarchy.from_groups([[position[m] for m in members] for _, members in groups],
                                    [*class_names, *(name for name, _ in groups)])


def build_hierarchy(name: str | None, dataset: str, class_names: Sequence[str]):
    """The hierarchy ``name`` (None: the dataset's), checked against the dataset's classes;
    :class:`~protoseg.config.ConfigError` (a ``ValueError``) if it does not fit."""
    import protoseg_kernels as pk

    from .config import ConfigError  # the config module reads HIERARCHY_NAMES from here

    if name is None:
        if dataset not in DATASET_HIERARCHIES:
            raise ConfigError(f"model.hierarchy: the {dataset} dataset has no built-in hierarchy; name one of "
                             f"{', '.join(HIERARCHY_NAMES)}")
        name = DATASET_HIERARCHIES[dataset]
    if name not in HIERARCHY_NAMES:
        raise ConfigError(f"model.hierarchy must be one of {', '.join(HIERARCHY_NAMES)}, got {name!r}")
    if name == "cityscapes":
        hierarchy = pk.Hierarchy.cityscapes()
    else:
        try:
            hierarchy = from_named_groups(SYNTHETIC_GROUPS, class_names)
        except ValueError as exc:
            raise ConfigError(f"model.hierarchy={name!r}: {exc}") from exc
    leaves = tuple(hierarchy.names[: hierarchy.num_leaves])
    if leaves != tuple(class_names):
        raise ConfigError(f"model.hierarchy={name!r}: its leaves ({', '.join(leaves)}) are not the classes of the "
                         f"{dataset} dataset ({', '.join(class_names)})")
    return hierarchy


def model_hierarchy(config, class_names: Sequence[str]):
    """The hierarchy a :class:`~protoseg.config.Config`'s model needs (None unless
    ``model.head="hssn"``)."""
    if config.model.head != "hssn":
        return None
    return build_hierarchy(config.model.hierarchy, config.data.dataset, class_names)
