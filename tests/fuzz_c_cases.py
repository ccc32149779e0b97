"""Hostile calls into every entry point of the compiled extension (_backend._C), generated
from a seed (used by tests/test_fuzz_c.py, which runs batches of them in subprocesses and
counts crashes).

A case starts from a valid call of one entry point on a small block table, then applies one
to three mutations: an argument replaced by a wrong type, a hostile __dlpack__ exporter, a
wrong dtype, a short, empty, strided, misaligned, read-only, grad-tracking or sign-flag view,
an alias of another argument, a corrupted table field, or an extreme scalar. run_batch calls
each case and classifies the outcome:

  accepted   the call returned (the mutation was harmless, e.g. a NaN in the data)
  refused    TypeError, ValueError, or OverflowError (CPython's argument parser refuses an
             int that does not fit the C type with it, as builtins do)
  unexpected any other exception (a failure of the test)

and, for every refused call, that each buffer the case passed is bitwise unchanged (a refusal
must happen before any write). A crash kills the worker; the parent sees it.
"""

from __future__ import annotations

import json
import random
import sys
from typing import Any, Callable

import numpy as np
import torch

from block_tables import make_layout
from distributed_shampoo import _backend as B

# The binding itself, below _backend's Python checks: what these tests aim at.
_C = B._C

LAYOUT = make_layout([(5, 3), (4,), (), (2, 2, 3)], max_dim=2)
NB = len(LAYOUT.blocks)
EXTREME_INTS = [-1, 0, 1, 2, 7, 8, 9, 23, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 62, 2 ** 63 - 1,
                -(2 ** 63), 2 ** 63, 2 ** 64, 10 ** 30]
EXTREME_FLOATS = [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1.0, 1e308, -1e308,
                  5e-324, 2.0 ** 63]
WRONG_OBJECTS = [None, 3, 2.5, "x", b"x", [1.0, 2.0], (1,), {}, object(), True]


class Raises:
    def __init__(self, exc: type[BaseException]):
        self.exc = exc

    def __dlpack__(self, **kwargs: Any) -> Any:
        raise self.exc("hostile")


class Returns:
    def __init__(self, value: Any):
        self.value = value

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self.value


class Legacy:
    """An exporter without versioned capsules."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def __dlpack__(self, **kwargs: Any) -> Any:
        if kwargs:
            raise TypeError("unexpected keyword argument 'max_version'")
        return self.t.__dlpack__()


class Stash:
    """Keeps the capsule it hands out, as the only owner of the memory."""

    def __init__(self, t: torch.Tensor):
        self.t: Any = t
        self.capsule: Any = None

    def __dlpack__(self, **kwargs: Any) -> Any:
        self.capsule = self.t.__dlpack__(**kwargs)
        self.t = None
        return self.capsule


class Thief:
    """Consumes another argument's stashed capsule (freeing it if it can), then exports."""

    def __init__(self, t: torch.Tensor, victim: Stash):
        self.t, self.victim = t, victim

    def __dlpack__(self, **kwargs: Any) -> Any:
        if self.victim.capsule is not None:
            stolen = torch.from_dlpack(self.victim.capsule)
            del stolen
        return self.t.__dlpack__(**kwargs)


def _real(n: int, rng: np.random.Generator, bits: int) -> torch.Tensor:
    dtype = torch.float32 if bits == 32 else torch.float64
    return torch.from_numpy(rng.standard_normal(n)).to(dtype)


def _psd_factors(bits: int, rng: np.random.Generator) -> torch.Tensor:
    f = np.zeros(LAYOUT.factor_numel)
    for b in range(NB):
        off = LAYOUT.blocks[b].factor_offset
        for d in LAYOUT.blocks[b].shape:
            g = rng.standard_normal((d, d + 1))
            f[off:off + d * d] = (g @ g.T).ravel()
            off += d * d
    return torch.from_numpy(f).to(torch.float32 if bits == 32 else torch.float64)


# Each base: (entry stem, builder(bits, rng) -> (args, kinds)). kinds[i] says what argument
# i is: "buf" (a float buffer), "table", "mask", "i32", "int", "float", "bool", "shape",
# "list" (the per-parameter tensors the pointer-table kernels read or write in place).
BASE_STEMS = ["factor_update", "finish", "gather", "moments", "precondition", "root_inverse",
              "scatter", "sym_unpack", "sym_pack", "packed_commit", "packed_select",
              "factor_update_packed", "gather_io", "finish_io", "scatter_io",
              "soap_direction", "eigenbasis"]


def _packed(full: torch.Tensor) -> torch.Tensor:
    """Factor-layout matrices in the packed layout (upper triangles by rows)."""
    parts = []
    for b in range(NB):
        off = LAYOUT.blocks[b].factor_offset
        for d in LAYOUT.blocks[b].shape:
            rows, cols = np.triu_indices(d)
            parts.append(full[off:off + d * d].reshape(d, d)[rows, cols])
            off += d * d
    return torch.cat(parts) if parts else full[:0]


def _base_calls(bits: int, rng: np.random.Generator, stem: str) -> tuple[list[Any], list[str]]:
    t = torch.from_numpy(LAYOUT.table.copy())
    act = lambda: torch.ones(NB, dtype=torch.uint8)  # noqa: E731
    blk = lambda: _real(LAYOUT.block_numel, rng, bits)  # noqa: E731
    par = lambda: _real(LAYOUT.param_numel, rng, bits)  # noqa: E731
    fac = lambda: _psd_factors(bits, rng)  # noqa: E731
    nf = LAYOUT.factor_count
    fu8 = lambda: torch.zeros(nf, dtype=torch.uint8)  # noqa: E731
    tensors = lambda: [_real(int(np.prod(sh, dtype=np.int64)), rng, bits).reshape(sh)  # noqa: E731
                       for sh in LAYOUT.shapes]
    offs = lambda: torch.tensor(LAYOUT.param_offsets, dtype=torch.int64)  # noqa: E731
    owner = lambda: torch.tensor([b.param for b in LAYOUT.blocks], dtype=torch.int64)  # noqa: E731
    calls = {
        "gather_io": lambda: ([blk(), blk(), tensors(), tensors(), offs(), owner(), t, act(), 0.1,
                               torch.zeros(NB, dtype=torch.float64)],
                              "buf buf list list buf buf table mask float buf"),
        "finish_io": lambda: ([tensors(), offs(), owner(), blk(), blk(), blk().abs(), blk(), t,
                               act(), 2, False, 0.5, 1e-8, 0.01, 0.9, 0.0, True, 0.1],
                              "list buf buf buf buf buf buf table mask int bool float float "
                              "float float float bool float"),
        "scatter_io": lambda: ([tensors(), offs(), owner(), blk(), t, act(), True],
                               "list buf buf buf table mask bool"),
        "gather": lambda: ([blk(), blk(), par(), par(), t, act(), 0.1],
                           "buf buf buf buf table mask float"),
        "scatter": lambda: ([par(), blk(), t, act()], "buf buf table mask"),
        "factor_update": lambda: ([fac(), fac(), blk(), t, act(), 0.9, 2],
                                  "buf buf buf table mask float int"),
        "precondition": lambda: ([blk(), blk(), fac(), t, act(), 2],
                                 "buf buf buf table mask int"),
        "moments": lambda: ([blk(), blk().abs(), blk(), t, act(), True, 0.999, 0.9, 0.5, 0.5],
                            "buf buf buf table mask bool float float float float"),
        "finish": lambda: ([par(), blk(), blk(), blk().abs(), blk(), blk(), t, act(), 2, False,
                            0.5, 1e-8, 0.01, 0.9, 0.0, True, 0.1],
                           "buf buf buf buf buf buf table mask int bool float float float float "
                           "float bool float"),
        "root_inverse": lambda: ([torch.zeros_like(fac()), fac(), t, act(), fu8(),
                                  torch.zeros(nf, dtype=torch.int32), int(rng.integers(0, 3)),
                                  1e-6, 1.0, 1.0, True, True, 20, 1e-6, 0.0, 3, 2],
                                 "buf buf table mask mask i32 int float float float bool bool "
                                 "int float float int int"),
        "sym_unpack": lambda: ([torch.zeros_like(fac()), _packed(fac()), t, act()],
                               "buf buf table mask"),
        "sym_pack": lambda: ([_packed(fac()), fac(), t, torch.ones(nf, dtype=torch.uint8), True],
                             "buf buf table mask bool"),
        "packed_commit": lambda: ([_packed(fac()), _packed(fac()), t,
                                   torch.ones(nf, dtype=torch.uint8)], "buf buf table mask"),
        "packed_select": lambda: ([_packed(fac()), _packed(fac()), t, torch.ones(nf, dtype=torch.uint8),
                                   (torch.arange(nf) % 2).to(torch.uint8), True],
                                  "buf buf table mask mask bool"),
        "factor_update_packed": lambda: ([_packed(fac()), _packed(fac()), blk(), t, act(), 0.9, 2],
                                         "buf buf buf table mask float int"),
        "soap_direction": lambda: ([blk(), blk(), blk(), fac(), blk().abs(), t, act(), 0.99, 0.5,
                                    1e-8, 2], "buf buf buf buf buf table mask float float float int"),
        "eigenbasis": lambda: ([torch.zeros_like(fac()), fac(), fac(), t, act(), fu8(),
                                torch.zeros(nf, dtype=torch.int32), int(rng.integers(0, 2)), True,
                                2, 1e-6, 2],
                               "buf buf buf table mask mask i32 int bool int float int"),
    }
    args, kinds = calls[stem]()
    return args, kinds.split()


def _plain_calls(rng: np.random.Generator) -> dict[str, tuple[list[Any], list[str]]]:
    shape = [int(v) for v in rng.integers(0, 6, size=int(rng.integers(0, 5)))]
    count = _C.block_count(shape, 2)
    return {
        "merge_small_dims": ([shape, 8], ["shape", "int"]),
        "block_count": ([shape, 2], ["shape", "int"]),
        "block_plan": ([shape, 2, np.zeros((count, _C.BF_COUNT), np.int64)],
                       ["shape", "int", "table"]),
        "table_validate": ([LAYOUT.table.copy(), LAYOUT.block_numel, LAYOUT.factor_numel,
                            LAYOUT.factor_count, LAYOUT.param_numel],
                           ["table", "int", "int", "int", "int"]),
        "batch_plan": ([LAYOUT.table.copy()], ["table"]),
        "packed_numel": ([LAYOUT.table.copy()], ["table"]),
    }


def _mutate_buffer(x: Any, others: list[Any], r: random.Random) -> Any:
    if not isinstance(x, torch.Tensor):
        return r.choice(WRONG_OBJECTS)
    n = x.numel()
    choice = r.randrange(22)
    if choice == 0:
        return r.choice(WRONG_OBJECTS)
    if choice == 1:
        return Raises(r.choice([TypeError, ValueError, RuntimeError, BufferError, KeyError]))
    if choice == 2:
        return Returns(r.choice([None, 3, "capsule", x, x.numpy()]))
    if choice == 3:
        return x.to(r.choice([torch.float16, torch.bfloat16, torch.int32, torch.int64,
                              torch.uint8, torch.bool, torch.complex64, torch.complex128,
                              torch.float32 if x.dtype == torch.float64 else torch.float64,
                              torch.int8]))
    if choice == 4:
        return x[: max(n - r.randrange(1, 4), 0)]
    if choice == 5:
        return x[:0]
    if choice == 6:
        big = torch.zeros(2 * n + 2, dtype=x.dtype)
        return big[::2][:n]  # non-contiguous
    if choice == 7:
        return x.reshape(-1, 1).expand(n, 2)  # zero stride, twice as many elements
    if choice == 8:
        raw = np.zeros(n * x.element_size() + 1, np.uint8)
        return np.frombuffer(raw.data, dtype=x.numpy().dtype, count=n, offset=1)  # misaligned
    if choice == 9:
        a = x.numpy().copy()
        a.flags.writeable = False
        return a
    if choice == 10:
        return x.clone().requires_grad_(True) if x.is_floating_point() else x
    if choice == 11:
        return torch._neg_view(x) if x.is_floating_point() else x
    if choice == 12:
        same = [o for o in others if isinstance(o, torch.Tensor) and o is not x]
        return r.choice(same) if same else x  # alias of another argument
    if choice == 13:
        big = torch.zeros(n + 3, dtype=x.dtype)
        return big[r.randrange(1, 4):][:n]  # may overlap a sibling made the same way
    if choice == 14:
        return Legacy(x)
    if choice == 15:
        return Stash(x)
    if choice == 16:
        victims = [o for o in others if isinstance(o, Stash)]
        return Thief(x, victims[0]) if victims else Stash(x)
    if choice == 17:
        return x.numpy()
    if choice == 18:
        return x.reshape(1, -1) if n else x
    if choice == 19:
        return torch.cat([x, x])  # too long is fine for most layouts
    if choice == 20:
        return torch.full_like(x, r.choice([float("nan"), float("inf"), 1e38])) \
            if x.is_floating_point() else x
    return x.t() if x.dim() == 2 else x.as_strided((n,), (1,))


def _mutate_list(x: Any, others: list[Any], r: random.Random) -> Any:
    """A per-parameter tensor list made hostile: a wrong container or length, an entry
    mutated like a buffer, None, a Parameter, an alias of another argument."""
    if not isinstance(x, list) or not x:
        return r.choice(WRONG_OBJECTS)
    choice = r.randrange(8)
    if choice == 0:
        return r.choice(WRONG_OBJECTS)
    if choice == 1:
        return x[:-1] if r.random() < 0.5 else x + [x[-1]]
    if choice == 2:
        return tuple(x)
    if choice == 3:
        return type("Sub", (list,), {})(x)
    out = list(x)
    i = r.randrange(len(out))
    if not isinstance(out[i], torch.Tensor):  # an earlier mutation's entry
        out[i] = r.choice(WRONG_OBJECTS)
    elif choice == 4:
        out[i] = None
    elif choice == 5:
        out[i] = torch.nn.Parameter(out[i], requires_grad=False)
    elif choice == 6:
        same = [o for o in others if isinstance(o, torch.Tensor) and o.dtype == out[i].dtype
                and o.numel() >= out[i].numel()]
        if same:  # a view of another argument's memory
            out[i] = r.choice(same).reshape(-1)[: out[i].numel()].reshape(out[i].shape)
    else:  # (a 0-d entry as 1-d: the buffer mutations slice)
        out[i] = _mutate_buffer(out[i] if out[i].dim() else out[i].reshape(1), others, r)
    return out


def _mutate_table(x: Any, r: random.Random) -> Any:
    base = x.numpy() if isinstance(x, torch.Tensor) else x
    if not (isinstance(base, np.ndarray) and base.dtype == np.int64 and base.ndim == 2):
        base = LAYOUT.table  # already mutated into something else: start again
    choice = r.randrange(10)
    if choice <= 4 and base.size:
        t = base.copy()
        for _ in range(r.randrange(1, 4)):
            t[r.randrange(t.shape[0]), r.randrange(t.shape[1])] = r.choice(
                [v for v in EXTREME_INTS if -(2 ** 63) <= v < 2 ** 63] + [r.randrange(-50, 50)])
        return torch.from_numpy(t) if r.random() < 0.5 else t
    if choice == 5:
        return base[:, :-1].copy()
    if choice == 6:
        return base.astype(np.int32)
    if choice == 7:
        return np.asfortranarray(base) if base.shape[0] > 1 else base.ravel()
    if choice == 8:
        t = base.copy()
        if t.shape[0] > 1:
            t[1] = t[0]  # two blocks share everything
        return t
    return r.choice(WRONG_OBJECTS + [base[:0], np.concatenate([base, base])])


def _mutate_scalar(kind: str, r: random.Random) -> Any:
    pick = r.random()
    if pick < 0.15:
        return r.choice(WRONG_OBJECTS)
    if kind in ("int", "i32"):
        return r.choice(EXTREME_INTS)
    if kind == "float":
        return r.choice(EXTREME_FLOATS + EXTREME_INTS[:4])
    if kind == "bool":
        return r.choice([0, 1, 2, -1, [], [0], "", "x"])
    if kind == "shape":
        return r.choice([[-1], [2 ** 62] * 8, [1] * 9, [2 ** 63], "ab", [1.5], [None],
                         list(range(12)), [0] * 8, [2 ** 40, 2 ** 40]])
    return r.choice(WRONG_OBJECTS)


def make_case(seed: int, index: int) -> tuple[str, Callable[..., Any], list[Any]]:
    r = random.Random(seed * 1_000_003 + index)
    rng = np.random.default_rng(seed * 1_000_003 + index)
    bits = r.choice([32, 64])
    if r.random() < 0.8:
        stem = r.choice(BASE_STEMS)
        args, kinds = _base_calls(bits, rng, stem)
        name = f"{stem}_f{bits}"
    else:
        stem, (args, kinds) = r.choice(sorted(_plain_calls(rng).items()))
        name = stem
    for _ in range(r.choice([1, 1, 2, 3])):
        i = r.randrange(len(args) + 1)
        if i == len(args):  # wrong argument count
            args = args[:-1] if r.random() < 0.5 or not args else args + [args[-1]]
            kinds = kinds[: len(args)] + ["int"] * (len(args) - len(kinds))
            continue
        try:
            if kinds[i] in ("buf", "mask", "i32"):
                args[i] = _mutate_buffer(args[i], args, r)
            elif kinds[i] == "list":
                args[i] = _mutate_list(args[i], args, r)
            elif kinds[i] == "table":
                args[i] = _mutate_table(args[i], r)
            else:
                args[i] = _mutate_scalar(kinds[i], r)
        except (RuntimeError, TypeError, ValueError):
            # torch refused to derive a view from an already mutated one (e.g. .numpy() of a
            # negative view): a plain wrong object instead
            args[i] = r.choice(WRONG_OBJECTS)
    return name, getattr(_C, name), args


def _snapshot(args: list[Any]) -> list[bytes | None]:
    out: list[bytes | None] = []
    for a in args:
        if isinstance(a, (list, tuple)):  # a tensor list: every entry's storage
            parts = _snapshot(list(a))
            out.append(b"|".join(p if p is not None else b"-" for p in parts))
            continue
        inner = getattr(a, "t", None) if not isinstance(a, (torch.Tensor, np.ndarray)) else a
        if isinstance(inner, torch.Tensor):
            raw = torch.empty(0, dtype=torch.uint8).set_(inner.untyped_storage())
            out.append(raw.numpy().tobytes())  # the whole storage, whatever the view
        elif isinstance(inner, np.ndarray):
            out.append(inner.tobytes())
        else:
            out.append(None)
    return out


REFUSALS = (TypeError, ValueError, OverflowError)


def run_batch(seed: int, start: int, count: int, progress: str | None = None) -> dict[str, Any]:
    stats: dict[str, Any] = {"cases": 0, "accepted": 0, "refused": 0, "atomicity_checks": 0,
                             "atomicity_failures": [], "unexpected": [], "per_entry": {}}
    for index in range(start, start + count):
        if progress is not None:
            with open(progress, "w") as f:
                f.write(str(index))
        name, fn, args = make_case(seed, index)
        before = _snapshot(args)
        stats["cases"] += 1
        stats["per_entry"][name] = stats["per_entry"].get(name, 0) + 1
        try:
            fn(*args)
            stats["accepted"] += 1
        except REFUSALS:
            stats["refused"] += 1
            after = _snapshot(args)
            for i, (b, a) in enumerate(zip(before, after)):
                if b is None or a is None:
                    continue
                stats["atomicity_checks"] += 1
                if a != b:
                    stats["atomicity_failures"].append(f"{index}:{name}:arg{i}")
        except Exception as e:  # noqa: BLE001 - counted, then reported by the test
            stats["unexpected"].append(f"{index}:{name}:{type(e).__name__}: {e}")
    return stats


if __name__ == "__main__":
    seed_, start_, count_ = (int(v) for v in sys.argv[1:4])
    print(json.dumps(run_batch(seed_, start_, count_, sys.argv[4] if len(sys.argv) > 4 else None)))
