"""What is live at the peak of allocated device memory, from a `torch.cuda.memory._snapshot()` dict.

Pure Python over the snapshot (no CUDA calls), so it runs and is tested on the CPU. The snapshot holds
`segments` (each with its `blocks`: the allocations live when the snapshot was taken, with the stack of
the call that made them) and `device_traces` (per device, the allocator's events in order: `alloc`,
`free_requested`, `free_completed`, segment events; each with `addr`, `size` and `frames`, innermost
first).

Counting follows `torch.cuda.memory_allocated`: the allocator lowers that figure when a tensor is freed
(`free_requested`), not when a block used on another stream becomes reusable (`free_completed`), so a
`free_completed` counts only when its request was not recorded. Each request counts rounded up to the
allocator's 512-byte granule; an unsplit remainder of a large block (under 1 MiB) is the only way
torch's own figure can be larger.

The history is a ring buffer (`max_entries`): the oldest events may be gone. The live set before the
first kept event is rebuilt from the end state: blocks live at the end that no kept event allocated, and
frees of addresses that no kept event allocated, are allocations "from before recording". Recording with
`context="alloc"` makes a free event carry the stack of the allocation it frees, so these keep their place.

The caller marks moments in the run with a tiny allocation made inside a function of a known name
(`find_marks`); `report` uses the marks to bound the peak search and to show the steady live set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

MIB = 2**20
GRANULE = 512  # the caching allocator's smallest block and rounding step
FREES = ("free_requested", "free_completed")
# size classes of a tensor: upper bounds in bytes and their labels (the last one open)
SIZE_CLASSES = ((64 * 1024, "<64KiB"), (MIB, "64KiB-1MiB"), (16 * MIB, "1-16MiB"), (256 * MIB, "16-256MiB"))
LARGEST_CLASS = ">=256MiB"
BEFORE = "[before recording]"


def granule(nbytes: int) -> int:
    """`nbytes` as the allocator counts a request for it: at least 512, a multiple of 512."""
    return max(GRANULE, -(-int(nbytes) // GRANULE) * GRANULE)


@dataclass(frozen=True)
class Alloc:
    addr: int
    size: int  # counted bytes (`granule` of the request)
    frames: tuple[dict[str, Any], ...]  # innermost first; empty when no stack was recorded
    born: int  # index of its alloc event in the trace; -1: live since before recording


@dataclass
class Timeline:
    """The trace of one device replayed: who is live after each event."""

    events: list[dict[str, Any]]
    initial: list[Alloc]  # live before the first kept event
    allocs: dict[int, Alloc] = field(default_factory=dict)  # alloc event index -> allocation
    freed_at: dict[int, int] = field(default_factory=dict)  # alloc index (or -1-based key) -> free index
    initial_freed_at: dict[int, int] = field(default_factory=dict)  # position in `initial` -> free index
    after: list[int] = field(default_factory=list)  # counted bytes live after each event
    end_bytes: int = 0  # counted bytes of the snapshot's live blocks (the replay must end there)

    @property
    def initial_bytes(self) -> int:
        return sum(a.size for a in self.initial)

    def total_before(self, index: int) -> int:
        """Bytes live just before event `index`."""
        return self.after[index - 1] if index > 0 else self.initial_bytes

    def peak(self, start: int = 0, stop: int | None = None) -> tuple[int, int]:
        """(bytes, index) of the largest live total from just before event `start` to just after event
        `stop - 1`; index is the event after which it is first reached (`start - 1`: already at `start`)."""
        stop = len(self.after) if stop is None else stop
        best, at = self.total_before(start), start - 1
        for i in range(start, stop):
            if self.after[i] > best:
                best, at = self.after[i], i
        return best, at

    def live_at(self, index: int) -> list[Alloc]:
        """The allocations live just after event `index` (-1: before the first kept event)."""
        live = [
            a for k, a in enumerate(self.initial) if self.initial_freed_at.get(k, len(self.events)) > index
        ]
        live += [
            a for j, a in self.allocs.items() if j <= index and self.freed_at.get(j, len(self.events)) > index
        ]
        return live

    @property
    def consistent(self) -> bool:
        """The replayed trace ends at the snapshot's live total (a check on the reconstruction)."""
        last = self.after[-1] if self.after else self.initial_bytes
        return last == self.end_bytes


def _block_address(seg: dict[str, Any]) -> Iterable[tuple[int, dict[str, Any]]]:
    """(address, block) of a segment's blocks; blocks lie back to back from the segment's address."""
    addr = seg["address"]
    for b in seg["blocks"]:
        yield b.get("address", addr), b
        addr += b["size"]


def live_blocks(snapshot: dict[str, Any], device: int = 0) -> dict[int, Alloc]:
    """The allocations live when the snapshot was taken (blocks in state `active_allocated`), by address."""
    out = {}
    for seg in snapshot.get("segments", []):
        if seg.get("device", device) != device:
            continue
        for addr, b in _block_address(seg):
            if b["state"] == "active_allocated":
                size = granule(b.get("requested_size", b["size"]))
                out[addr] = Alloc(addr, size, tuple(b.get("frames", ())), -1)
    return out


def build_timeline(snapshot: dict[str, Any], device: int = 0) -> Timeline:
    """Replay device `device`'s trace against the snapshot's end state (see the module docstring)."""
    traces = snapshot.get("device_traces", [])
    events = list(traces[device]) if device < len(traces) else []
    end = live_blocks(snapshot, device)
    tl = Timeline(events=events, initial=[])
    open_: dict[int, int] = {}  # address -> index of the alloc event not yet freed
    requested: set[int] = set()  # addresses whose free was requested and not yet completed
    deltas = []
    for i, e in enumerate(events):
        action, addr = e.get("action"), e.get("addr")
        delta = 0
        if action == "alloc":
            a = Alloc(addr, granule(e["size"]), tuple(e.get("frames", ())), i)
            tl.allocs[i] = a
            open_[addr] = i
            delta = a.size
        elif action == "free_completed" and addr in requested:
            requested.discard(addr)  # already counted at its request
        elif action in FREES:
            if action == "free_requested":
                requested.add(addr)
            j = open_.pop(addr, None)
            if j is None:  # allocated before the kept history: it was live at the start
                tl.initial_freed_at[len(tl.initial)] = i
                tl.initial.append(Alloc(addr, granule(e["size"]), tuple(e.get("frames", ())), -1))
                delta = -tl.initial[-1].size
            else:
                tl.freed_at[j] = i
                delta = -tl.allocs[j].size
        deltas.append(delta)
    # live at the end without a kept alloc event: live since before recording, never freed
    tl.initial += [a for addr, a in end.items() if addr not in open_]
    tl.end_bytes = sum(a.size for a in end.values())
    total = tl.initial_bytes
    for d in deltas:
        total += d
        tl.after.append(total)
    return tl


def find_marks(events: Sequence[dict[str, Any]], func: str, size: int | None = None) -> list[int]:
    """Indices of the alloc events made inside a function named `func` (the caller's markers), in order;
    `size`: the markers' request in bytes, checked first (a run has ~10^5 events with deep stacks)."""
    return [
        i
        for i, e in enumerate(events)
        if e.get("action") == "alloc"
        and (size is None or e.get("size") == size)
        and any(f.get("name") == func for f in e.get("frames", ()))
    ]


def size_class(nbytes: int) -> str:
    for bound, label in SIZE_CLASSES:
        if nbytes < bound:
            return label
    return LARGEST_CLASS


def _short(filename: str, roots: Sequence[str]) -> str:
    for root in roots:
        if filename.startswith(root.rstrip("/") + "/"):
            return filename[len(root.rstrip("/")) + 1 :]
    for anchor in ("site-packages/", "dist-packages/"):
        if anchor in filename:
            return filename.split(anchor, 1)[1]
    return filename.rsplit("/", 1)[-1]


def _fmt(f: dict[str, Any], roots: Sequence[str]) -> str:
    return f"{_short(f['filename'], roots)}:{f['line']} {f['name']}"


def where(frames: Sequence[dict[str, Any]], roots: Sequence[str]) -> str:
    """The innermost frame in one of `roots` (this repository), else the innermost torch frame, else the
    innermost Python frame; "(no stack)" when none was recorded."""
    py = [f for f in frames if str(f.get("filename", "")).endswith(".py")]
    for pick in (
        lambda f: any(f["filename"].startswith(r.rstrip("/") + "/") for r in roots),
        lambda f: "/torch/" in f["filename"],
        lambda f: True,
    ):
        hit = next((f for f in py if pick(f)), None)
        if hit is not None:
            return _fmt(hit, roots)
    return "(no stack)"


def group(
    allocs: Iterable[Alloc], roots: Sequence[str], top: int = 20, skip_func: str = ""
) -> dict[str, Any]:
    """Allocations grouped by (`where`, size class), the largest `top` groups first.

    Each group also names its innermost Python frame that holds the most bytes (`inner`), which says
    more than `where` when this repository's frame is only the caller of a library."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    total = 0
    for a in allocs:
        if skip_func and any(f.get("name") == skip_func for f in a.frames):
            continue
        total += a.size
        at = where(a.frames, roots)
        if a.born < 0:
            at = f"{at} {BEFORE}"
        g = groups.setdefault((at, size_class(a.size)), {"bytes": 0, "count": 0, "inner": {}})
        g["bytes"] += a.size
        g["count"] += 1
        py = [f for f in a.frames if str(f.get("filename", "")).endswith(".py")]
        inner = _fmt(py[0], roots) if py else "(no stack)"
        g["inner"][inner] = g["inner"].get(inner, 0) + a.size
    ranked = sorted(groups.items(), key=lambda kv: -kv[1]["bytes"])
    rows = []
    for (at, cls), g in ranked[:top]:
        inner = max(g["inner"].items(), key=lambda kv: kv[1])[0]
        row = {"where": at, "size": cls, "mib": round(g["bytes"] / MIB, 2), "count": g["count"]}
        if not at.startswith(inner):
            row["inner"] = inner
        rows.append(row)
    rest = sum(g["bytes"] for _, g in ranked[top:])
    return {"live_mib": round(total / MIB, 2), "rest_mib": round(rest / MIB, 2), "groups": rows}


def report(
    snapshot: dict[str, Any],
    *,
    device: int = 0,
    roots: Sequence[str] = (),
    mark_func: str = "",
    mark_size: int | None = None,
    mark_names: Sequence[str] = ("warmup", "measured"),
    top: int = 20,
) -> dict[str, Any]:
    """The peak from the `warmup` mark on (or from the oldest kept event), what is live there, and the
    live set just before the `measured` mark (the steady state between steps). The marks are the alloc
    events of `find_marks(events, mark_func, mark_size)`, named in order by `mark_names`."""
    tl = build_timeline(snapshot, device)
    marks = dict(zip(mark_names, find_marks(tl.events, mark_func, mark_size) if mark_func else []))
    start = marks.get("warmup", 0)
    peak, at = tl.peak(start)
    out: dict[str, Any] = {
        "peak_mib": round(peak / MIB, 2),
        "window": "from the warmup mark" if "warmup" in marks else "from the oldest kept event",
        "events": len(tl.events),
        "consistent": tl.consistent,
    }
    if "measured" in marks:
        out["phase"] = "measured steps" if at >= marks["measured"] else "warmup (captures included)"
    if at >= 0 and tl.events[at].get("action") == "alloc":
        a = tl.allocs[at]
        out["peak_alloc"] = {"where": where(a.frames, roots), "mib": round(a.size / MIB, 2)}
    out.update(group(tl.live_at(at), roots, top, mark_func))
    if "measured" in marks:
        out["steady"] = group(tl.live_at(marks["measured"] - 1), roots, top, mark_func)
    return out
