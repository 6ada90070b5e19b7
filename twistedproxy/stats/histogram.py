"""
Latency histograms: recorded cheaply in the hot path, shipped as their
non-empty buckets, read with the C{hdrhistogram} package.

L{Latency.record} fills a plain list laid out exactly like an HdrHistogram's
counts array (1 microsecond .. 60 seconds, 2 significant digits), so recording
costs a few integer operations instead of the package's C{record_value} (which
is several times slower on CPython and far slower on PyPy, where its counts
live in a ctypes array).  L{Latency.export} lists the non-empty buckets of that
list; L{merge_hist} adds exported histograms of several workers bucket by
bucket, so merged percentiles are exact to HDR precision, never averages of
averages; L{summarize} reads percentiles off an HdrHistogram built from them.

A worker exports every histogram it has whenever its master collects its
statistics (every C{-i} milliseconds, and for each stats query), in the middle
of its traffic.  So exporting builds no HdrHistogram and encodes nothing: on
PyPy, building and encoding them took a worker 5-17 ms per collection, a pause
for every request it had in hand (bench/README.md, "Measured in the fourteenth
#10 session").  Only the master, which serves no traffic, builds them.

An exported histogram is a JSON-able dict::

    {"count": n, "sum": total microseconds, "max": microseconds,
     "buckets": [index, count, index, count, ...]}

(bucket indexes ascending, into the counts array; "buckets" is absent when count
is 0).  An older master handing its totals on in a binary upgrade sent the
whole encoded HdrHistogram instead, as "hdr": that is read too, and the totals
a master hands on carry both forms (L{with_encoded}), for an older heir.
"""

from __future__ import annotations

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 60 * 1000 * 1000  # values above are recorded as 60 s
DIGITS = 2  # 1% precision: plenty for latency, and 2560 buckets per histogram

PERCENTILES = (50.0, 90.0, 95.0, 98.0, 99.0, 99.9)


def new_hdr() -> HdrHistogram:
    """An empty HdrHistogram with the layout every L{Latency} uses."""
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


_LAYOUT = new_hdr()
_UNIT = _LAYOUT.unit_magnitude
_HALF_MAG = _LAYOUT.sub_bucket_half_count_magnitude
_HALF = _LAYOUT.sub_bucket_half_count
_MASK = _LAYOUT.sub_bucket_mask
_SHIFT = _UNIT + _HALF_MAG + 1
COUNTS_LEN = _LAYOUT.counts_len
del _LAYOUT


def bucket_index(us: int) -> int:
    """The HdrHistogram counts index of C{us} microseconds (same as the package's)."""
    b = (us | _MASK).bit_length() - _SHIFT
    return ((b + 1) << _HALF_MAG) + (us >> (b + _UNIT)) - _HALF


# The bucket index of every value below FAST_US (65 ms, above nearly every
# latency a cache sees), computed once: recording such a value is then one list
# lookup instead of the bit arithmetic, which matters at a few records per request.
FAST_US = 1 << 16
_FAST_INDEX = [bucket_index(us) for us in range(FAST_US)]


class Latency:
    """One latency distribution, recorded in seconds, kept in microseconds."""

    __slots__ = ("counts", "count", "sum", "max")

    def __init__(self):
        self.counts = [0] * COUNTS_LEN
        self.count = 0
        self.sum = 0
        self.max = 0

    def record(self, seconds: float) -> None:
        self.record_us(int(seconds * 1000000.0))

    def record_us(self, us: int) -> None:
        """Record C{us} microseconds (the hot path's form: callers convert once)."""
        if 0 <= us < FAST_US:
            self.counts[_FAST_INDEX[us]] += 1
        else:
            if us < 0:
                us = 0  # a clock step backwards
            elif us > HIGHEST_US:
                us = HIGHEST_US
            self.counts[bucket_index(us)] += 1
        self.count += 1
        self.sum += us
        if us > self.max:
            self.max = us

    def export(self) -> dict:
        """This distribution as a JSON-able dict: count, sum, max and the non-empty buckets."""
        out = {"count": self.count, "sum": self.sum, "max": self.max}
        if self.count:
            buckets = []
            for index, n in enumerate(self.counts):
                if n:
                    buckets.append(index)
                    buckets.append(n)
            out["buckets"] = buckets
        return out


def _text(encoded) -> str:
    return encoded.decode("ascii") if isinstance(encoded, bytes) else encoded


EMPTY = {"count": 0, "sum": 0, "max": 0}


def _buckets(hist: dict) -> list:
    """The flattened (index, count) pairs of an exported histogram, of either form."""
    buckets = hist.get("buckets")
    if buckets is not None:
        return buckets
    counts = HdrHistogram.decode(hist["hdr"]).counts  # an older master's totals (see the module docstring)
    return [x for index in range(len(counts)) if counts[index] for x in (index, counts[index])]


def merge_hist(hists) -> dict:
    """Add exported histograms (of several workers, pools or commands) into one."""
    hists = [h for h in hists if h and h.get("count")]
    if not hists:
        return dict(EMPTY)
    if len(hists) == 1 and "buckets" in hists[0]:
        return dict(hists[0])
    counts = {}
    for h in hists:
        pairs = _buckets(h)
        for i in range(0, len(pairs), 2):
            counts[pairs[i]] = counts.get(pairs[i], 0) + pairs[i + 1]
    buckets = []
    for index in sorted(counts):
        buckets.append(index)
        buckets.append(counts[index])
    return {
        "count": sum(h["count"] for h in hists),
        "sum": sum(h["sum"] for h in hists),
        "max": max(h["max"] for h in hists),
        "buckets": buckets,
    }


def decode(hist: dict):
    """The HdrHistogram of an exported histogram (None when empty)."""
    if not hist or not hist.get("count"):
        return None
    if "buckets" not in hist:
        return HdrHistogram.decode(hist["hdr"])
    hdr = new_hdr()
    counts = hdr.counts
    pairs = hist["buckets"]
    for i in range(0, len(pairs), 2):
        counts[pairs[i]] = pairs[i + 1]
    if pairs:
        hdr.set_internal_tacking_values(pairs[0], pairs[-2], hist["count"])
    return hdr


def with_encoded(tree):
    """
    C{tree} (a JSON-able snapshot or part of one) with every exported histogram
    in it also carrying its whole encoded HdrHistogram ("hdr"): the form an
    older master reads, for the totals a master hands on in a binary upgrade,
    which may go back to an older version.  Readers here take "buckets" first.
    """
    if isinstance(tree, dict):
        if "buckets" in tree and "count" in tree:
            return dict(tree, hdr=_text(decode(tree).encode()))
        return {key: with_encoded(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [with_encoded(item) for item in tree]
    return tree


def summarize(hist: dict) -> dict:
    """
    Count, average, percentiles and max of an exported histogram, in
    milliseconds: C{{"count", "avg", "p50", "p90", "p95", "p98", "p99", "p99.9", "max"}}.
    Percentiles are HDR's (the top of their 1% bucket, never above the max).
    """
    count = hist.get("count", 0) if hist else 0
    out = {"count": count, "avg": 0.0}
    if not count:
        for p in PERCENTILES:
            out[_pname(p)] = 0.0
        out["max"] = 0.0
        return out
    top = hist["max"]
    values = decode(hist).get_percentile_to_value_dict(list(PERCENTILES))
    out["avg"] = round(hist["sum"] / count / 1000.0, 3)
    for p in PERCENTILES:
        out[_pname(p)] = round(min(values[p], top) / 1000.0, 3)
    out["max"] = round(top / 1000.0, 3)
    return out


def _pname(p: float) -> str:
    return "p%g" % (p,)


PERCENTILE_NAMES = tuple(_pname(p) for p in PERCENTILES)


def cumulative_counts(hist: dict, bounds_us) -> list:
    """How many values are <= each bound (microseconds, ascending): Prometheus buckets."""
    hdr = decode(hist)
    result = [0] * len(bounds_us)
    if hdr is None:
        return result
    for item in hdr.get_recorded_iterator():
        # A bucket counts below a bound when its whole range does.
        value = item.value_iterated_to
        for i, bound in enumerate(bounds_us):
            if value <= bound:
                result[i] += item.count_at_value_iterated_to
    return result
