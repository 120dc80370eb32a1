"""Argument validation shared by every op.

Each check raises where the bad value enters, with a message of the form
``"<op>: <argument> must be <expected>, got <actual>"``. Shape, dtype and device
checks are free (no data is read); :func:`check_index_range` reads the data once
(one host synchronisation) and is skipped when the caller passes ``validate=False``.

Given a process group, the value checks are collective (:func:`first_bad_values`): every
rank finds its own first bad value without a host read, one small all-reduce tells every
rank what all ranks found, and then every rank raises the same ``ValueError``, naming the
rank the value was found on, instead of one rank raising while the others wait in the op's
next collective until the group's timeout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ._op_utils import compute_dtype

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
# The one default label of unlabelled pixels, for every op, head, loss and dataset of the
# library (docs/spec.md §3, "Conventions"): the original ProtoSeg and ContrastiveSeg value.
IGNORE_INDEX = -1


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def check_tensor(op: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_tensor(op: str, name: str, value: object, ndim: int, layout: str) -> torch.Tensor:
    """A floating tensor of rank ``ndim``; ``layout`` (e.g. "[N, D]") is quoted in errors."""
    t = check_tensor(op, name, value)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {t.dtype}"
        )
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have shape {layout}, got shape {_shape(t)}")
    return t


def check_features_and_prototypes(
    op: str, x: object, prototypes: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check ``x`` [N, D] and ``prototypes`` [C, K, D]; return them with the
    prototypes cast to ``x``'s dtype (prototypes are small: casting them costs
    nothing, while casting ``x`` would copy N·D elements)."""
    x = check_float_tensor(op, "x", x, 2, "[N, D]")
    prototypes = check_float_tensor(op, "prototypes", prototypes, 3, "[C, K, D]")
    if x.device != prototypes.device:
        raise ValueError(
            f"{op}: prototypes must be on the same device as x ({x.device}), "
            f"got {prototypes.device}"
        )
    if x.shape[1] == 0:
        raise ValueError(f"{op}: x must have at least one feature column (D > 0), got shape {_shape(x)}")
    if prototypes.shape[0] == 0 or prototypes.shape[1] == 0:
        raise ValueError(
            f"{op}: prototypes must have C > 0 classes and K > 0 prototypes per class, "
            f"got shape {_shape(prototypes)}"
        )
    if prototypes.shape[2] != x.shape[1]:
        if prototypes.shape[2] == x.shape[0]:  # the embedding size is x's first dimension
            raise ValueError(
                f"{op}: x must be [N, D] with D = {prototypes.shape[2]} (the prototypes' last dimension), "
                f"got shape {_shape(x)}: is x transposed ([D, N])?"
            )
        raise ValueError(
            f"{op}: prototypes must have the embedding size of x (D = {x.shape[1]}) in their "
            f"last dimension, got shape {_shape(prototypes)}"
        )
    return x, prototypes.to(x.dtype)


def check_index_tensor(
    op: str, name: str, value: object, length: int, device: torch.device, *,
    layout: str = "[N]", owner: str = "x",
) -> torch.Tensor:
    """A 1-D integer tensor of ``length`` elements (``layout``, e.g. "[N]", is quoted in
    errors) on ``device``, the device of argument ``owner``, returned as int64 (so
    comparisons with ``ignore_index`` cannot wrap around in a narrow dtype)."""
    t = check_tensor(op, name, value)
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{op}: {name} must have shape {layout} = ({length},), got shape {_shape(t)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} must be on the same device as {owner} ({device}), got {t.device}")
    return t.long()


def check_mask(op: str, value: object, length: int, device: torch.device) -> torch.Tensor:
    t = check_tensor(op, "mask", value)
    if t.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor, got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{op}: mask must have shape [N] = ({length},), got shape {_shape(t)}")
    if t.device != device:
        raise ValueError(f"{op}: mask must be on the same device as x ({device}), got {t.device}")
    return t


def check_generator(op: str, value: object, device: torch.device, owner: str) -> torch.Generator | None:
    """None, or a ``torch.Generator`` on the device type of argument ``owner`` (``device``)."""
    if value is None:
        return None
    if not isinstance(value, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator or None, got {type(value).__name__}")
    if value.device.type != device.type:
        raise ValueError(f"{op}: generator must be on the device of {owner} ({device}), got {value.device}")
    return value


def check_bool(op: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value


def check_int(op: str, name: str, value: object, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return value


def _check_real(op: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    return float(value)


def check_positive_finite(op: str, name: str, value: object, dtype: torch.dtype) -> float:
    """A positive scale (a temperature, Sinkhorn's ε) that the op divides by and multiplies
    with in its compute dtype (that of ``dtype`` inputs): it and its reciprocal must be
    normal finite numbers there (fp32: about [2.9e-39, 8.5e37]), else the op would turn every
    value into 0, inf or NaN."""
    v = _check_real(op, name, value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{op}: {name} must be a positive finite number, got {value}")
    info = torch.finfo(compute_dtype(dtype))
    low, high = max(info.tiny, 1 / info.max), min(info.max, 1 / info.tiny)
    if not low <= v <= high:
        raise ValueError(
            f"{op}: {name} must be in [{low:.3g}, {high:.3g}] for {dtype} inputs (it and its reciprocal "
            f"must be normal {compute_dtype(dtype)} numbers), got {value}"
        )
    return v


def check_unit_interval(op: str, name: str, value: object) -> float:
    v = _check_real(op, name, value)
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"{op}: {name} must be in [0, 1], got {value}")
    return v


def check_choice(op: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{op}: {name} must be one of {options}, got {value!r}")
    return value  # type: ignore[return-value]


def valid_index_mask(index: torch.Tensor, upper: int, ignore_index: int) -> torch.Tensor:
    """True where ``index`` is a real entry: in [0, upper) and not ``ignore_index``."""
    return (index != ignore_index) & (index >= 0) & (index < upper)


def sanitize_index(index: torch.Tensor, upper: int, ignore_index: int) -> torch.Tensor:
    """int64 copy of ``index`` with every ignored or out-of-range entry set to -1.

    Backends only ever see this form, so no kernel can be handed an index that
    addresses memory outside [0, upper).
    """
    return torch.where(valid_index_mask(index, upper, ignore_index), index.long(), -1)


class BadValue(NamedTuple):
    """The first bad value found by a collective check: ``check`` (its position in the
    list of checks) failed on ``rank`` (the lowest such rank) with ``value``."""

    check: int
    rank: int
    value: int


def _first_bad(values: Tensor, bad: Tensor) -> Tensor:
    """[2] int64 on ``values``' device: (1, first value where ``bad``, in flattened order)
    or (0, 0); no host synchronisation."""
    flat_bad, flat = bad.reshape(-1), values.reshape(-1)
    if flat.numel() == 0:
        return torch.zeros(2, dtype=torch.int64, device=values.device)
    at = flat_bad.to(torch.uint8).argmax()  # the first maximum: the first bad element
    found = flat_bad[at]
    return torch.stack([found.long(), torch.where(found, flat[at].long(), 0)])


def first_bad_values(checks: Sequence[tuple[Tensor, Tensor]], group: Any) -> BadValue | None:
    """Collective over ``group``: each rank passes the same number of (values, bad mask)
    pairs (tensors on one device, which the group's backend must support, as for the ops'
    all-reduces; any shape, empty included). Returns, identically on every rank, the
    first check (in list order) that has a bad value on some rank, with the lowest such
    rank and its first bad value; None when every rank's values are good.

    Costs one all-reduce of world size × len(checks) × 2 int64 and one host
    synchronisation, whatever the data's size. Every rank of the group must call it
    (with ``validate=True``) at the same point, as for any collective."""
    device = checks[0][0].device
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    table = torch.zeros(world, len(checks), 2, dtype=torch.int64, device=device)
    table[rank] = torch.stack([_first_bad(values, bad) for values, bad in checks])
    dist.all_reduce(table, op=dist.ReduceOp.SUM, group=group)  # row r: what rank r found
    found = table.tolist()  # the one host synchronisation
    for check in range(len(checks)):
        for r in range(world):
            if found[r][check][0]:
                return BadValue(check, r, found[r][check][1])
    return None


def on_rank(bad: BadValue) -> str:
    """How a collective check's message names the offending value and its rank."""
    return f"{bad.value} on rank {bad.rank} of the process group"


class IndexRange(NamedTuple):
    """One argument for :func:`check_index_ranges`: ``index`` must hold ``meaning`` in
    [0, upper) or ``ignore_index`` (described as ``absent``, by default
    "ignore_index=<value>"), at the entries where ``only`` is True (all when None)."""

    name: str
    index: Tensor
    upper: int
    ignore_index: int
    meaning: str
    absent: str | None = None
    only: Tensor | None = None


def _out_of_range(check: IndexRange) -> Tensor:
    index = check.index
    bad = (index != check.ignore_index) & ((index < 0) | (index >= check.upper))
    return bad if check.only is None else bad & check.only


def _range_error(op: str, check: IndexRange, found: object) -> ValueError:
    absent = check.absent or f"ignore_index={check.ignore_index}"
    return ValueError(
        f"{op}: {check.name} must hold {check.meaning} in [0, {check.upper}) or "
        f"{absent}, found {found} (pass validate=False to treat out-of-range values as ignored)"
    )


def check_index_ranges(op: str, checks: Sequence[IndexRange], group: Any | None = None) -> None:
    """Raise ValueError for the first of ``checks`` whose index holds a value outside
    [0, upper) other than its ``ignore_index``. Without ``group``: one host
    synchronisation per check. With ``group``: collective (:func:`first_bad_values`), one
    small all-reduce and one host synchronisation for all checks together, and every rank
    raises the same error, naming the rank the value was found on."""
    if group is None:
        for check in checks:
            _check_locally(op, check)
        return
    bad = first_bad_values([(c.index, _out_of_range(c)) for c in checks], group)
    if bad is not None:
        raise _range_error(op, checks[bad.check], on_rank(bad))


def check_index_range(
    op: str, name: str, index: torch.Tensor, upper: int, ignore_index: int, meaning: str,
    group: Any | None = None,
) -> None:
    """Raise ValueError if ``index`` holds a value outside [0, upper) other than
    ``ignore_index``. Reads the data: one host synchronisation; with ``group``, collective
    (see :func:`check_index_ranges`)."""
    check_index_ranges(op, [IndexRange(name, index, upper, ignore_index, meaning)], group)


def _check_locally(op: str, check: IndexRange) -> None:
    if check.index.numel() == 0:
        return
    bad = _out_of_range(check)
    if bool(bad.any()):
        first = int(check.index[bad][0])  # boolean indexing flattens: any shape
        raise _range_error(op, check, first)


def check_class_ids(
    op: str, name: str, labels: torch.Tensor, ignore_index: int, group: Any | None = None,
) -> None:
    """Raise ValueError if ``labels`` holds a negative value other than ``ignore_index``
    (class ids without a known upper bound). Reads the data: one host synchronisation;
    with ``group``, collective (as :func:`check_index_ranges`)."""
    def error(found: object) -> ValueError:
        return ValueError(
            f"{op}: {name} must hold class ids >= 0 or ignore_index={ignore_index}, found {found} "
            "(pass validate=False to treat negative values as ignored)"
        )

    if group is not None:
        bad = first_bad_values([(labels, (labels != ignore_index) & (labels < 0))], group)
        if bad is not None:
            raise error(on_rank(bad))
        return
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & (labels < 0)
    if bool(bad.any()):
        raise error(int(labels[bad][0]))


def sanitize_class_ids(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """int64 copy of ``labels`` with ``ignore_index`` and every negative value set to -1."""
    return torch.where((labels != ignore_index) & (labels >= 0), labels.long(), -1)
