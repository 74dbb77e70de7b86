"""One sequential pass over a tar file: its members' names, offsets and sizes, and the file's sha256.

This is what adopting shards written by other tools needs (`sslkit.shard index`): the bytes are read
once, in large blocks, straight into the hash; headers are parsed from the same buffer, so the pass
runs at the speed of sha256 and the disk, with no image decode and no copy. Only members the caller
asks for (labels, JSON, or every image with `--full`) are handed over as bytes.

Formats: ustar/GNU/PAX as Python's `tarfile` and webdataset write them (PAX `path`/`size` records,
GNU long names), and old v7 headers. Damage is reported, not raised: a file cut inside a member or a
header whose checksum fails ends the scan with `ScanResult.damage` naming the byte where it happened.

Speed: a web-scale tar holds a header (often two: PAX + file) per few kB of data, so a Python loop that
slices and parses every header costs more than hashing the bytes. Instead, each window of the file is
searched at once with numpy for blocks that carry the `ustar` magic, and their checksums, sizes, types
and names are computed for all of them together; the walk from header to header then only looks these
up. The walk alone decides what a header is (the magic inside an image's bytes is never reached), and a
header the tables do not vouch for (no magic, an unusual number field) is parsed on its own, as before.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Collection, NamedTuple

import numpy as np

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
CHUNK = 256 << 10        # bytes per read
WINDOW = 16 << 20        # bytes whose headers are looked at together
_POW8 = 8 ** np.arange(13, dtype=np.int64)


class Member(NamedTuple):
    name: str
    offset: int          # first byte of the member's data
    size: int
    data: bytes | None = None   # only for members the caller asked to read


@dataclass
class ScanResult:
    members: list[Member] = field(default_factory=list)
    sha256: str = ""
    bytes: int = 0
    ignored: int = 0             # directories, links and other non-file entries
    damage: str | None = None    # why the scan stopped before the end-of-archive marker
    damaged_member: str | None = None   # the member being read when it stopped, if its header was intact


class _Window:
    """The bytes [base, base + len) of a file read sequentially, every byte hashed exactly once. `reach`
    slides the window forward; `moves` counts the slides, so tables computed on it can tell when they
    are stale. Reads are CHUNK bytes into the window's own buffer: on a cold page cache a few large
    reads wait for the disk in turn, while a stream of moderate ones keeps the kernel's readahead busy
    (as `cat` does), and reading into place copies nothing."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()
        self.size = os.fstat(f.fileno()).st_size      # a guide for the window's size, not a limit
        self.buf, self.base, self.len, self.moves = bytearray(), 0, 0, 0

    @property
    def end(self) -> int:
        return self.base + self.len

    def take(self, start: int, end: int) -> bytes:
        return bytes(memoryview(self.buf)[start - self.base:end - self.base])

    def _fill(self, view: memoryview) -> int:
        """Read into `view` (short at the end of the file), hashing as it comes; return the count."""
        n = 0
        while n < len(view):
            got = self.f.readinto(view[n:n + CHUNK])
            if not got:
                break
            self.sha.update(view[n:n + got])
            n += got
        return n

    def reach(self, start: int, end: int) -> bool:
        """Hold at least [start, end): bytes before `start` are let go (they were hashed). False when the
        file ends first; the window then holds what there was from `start` on."""
        if end <= self.end:
            return True
        if start > self.end:                          # a member nobody asked for: hash it, keep nothing
            scratch = memoryview(bytearray(min(CHUNK, start - self.end)))
            pos = self.end
            while pos < start and (got := self._fill(scratch[:min(CHUNK, start - pos)])):
                pos += got
            self.buf, self.base, self.len = bytearray(), pos, 0
            if pos < start:
                return False
        kept = self.end - start
        buf = bytearray(max(end - start, min(WINDOW, self.size - start)))
        buf[:kept] = memoryview(self.buf)[start - self.base:self.len]
        if start + len(buf) < self.size:          # the disk reads the next window while this one is used
            will_need(self.f.fileno(), WINDOW, start + len(buf))
        self.len = kept + self._fill(memoryview(buf)[kept:])
        self.buf, self.base = buf, start
        self.moves += 1
        return self.end >= end

    def drain(self) -> int:
        """Hash the rest of the file; return its size."""
        scratch, size = memoryview(bytearray(CHUNK)), self.end
        while got := self._fill(scratch):
            size += got
        return size


def will_need(file: str | int, length: int, offset: int = 0) -> int:
    """Ask the kernel to read [offset, offset + length) of a file (a path or an open descriptor) in the
    background; returns the bytes asked for (0 where the system has no such call or refuses)."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    try:
        fd = os.open(file, os.O_RDONLY) if isinstance(file, str) else file
    except OSError:
        return 0
    try:
        size = os.fstat(fd).st_size
        length = min(length, size - offset)
        if length > 0:                         # (0 would mean: to the end of the file)
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        return max(length, 0)
    except OSError:
        return 0
    finally:
        if isinstance(file, str):
            os.close(fd)


def _octals(fields: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Octal number fields (one per row), in the forms writers use: optional NUL/space padding, one run
    of digits, NUL/space padding. Returns (values, ok); a row in another form (base-256, stray bytes) has
    ok False and is parsed by `_octal` when the walk meets it. The form almost every writer uses (digits,
    then one NUL or space, then maybe one more) is read with one product; only other rows take the
    general path."""
    width = fields.shape[1]
    digits = width - 1 if width == 12 else 6            # size "%011o\0"; checksum "%06o\0 "
    d = fields[:, :digits].astype(np.int64) - 48
    ends = fields[:, digits:]
    common = ((d >= 0) & (d <= 7)).all(1) & ((ends == 0) | (ends == 32)).all(1)
    values = d @ _POW8[digits - 1::-1]
    if common.all():
        return values, common
    odd = np.flatnonzero(~common)
    values[odd], common[odd] = _octals_general(fields[odd])
    return values, common


def _octals_general(fields: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    digit = (fields >= 48) & (fields <= 55)
    pad = (fields == 0) | (fields == 32)
    seen = np.cumsum(digit, axis=1)
    after_run = np.cumsum(pad & (seen > 0), axis=1) > 0
    ok = (digit | pad).all(1) & ~(digit & after_run).any(1)
    later = seen[:, -1:] - seen          # digits to the right of each position: its power of 8
    values = (np.where(digit, fields.astype(np.int64) - 48, 0) * _POW8[later]).sum(1)
    return values, ok


class _Tables:
    """Header fields of every block in the window from `start` on that carries the ustar magic, computed
    at once. `plain` rows need nothing the tables lack: a checksum that adds up, numbers in the usual
    form (see `_octals`), the member inside the window, no GNU long name, no PAX record that renames or
    resizes; `stop[i]` says that a stretch of plain rows, each followed directly by the next row, ends
    at row i (row i is its last when it is plain)."""

    def __init__(self, win: _Window, start: int):
        lo = start - win.base
        n = (win.len - lo) // BLOCK
        blocks = np.frombuffer(win.buf, np.uint8, n * BLOCK, lo).reshape(n, BLOCK)
        rows = np.flatnonzero(blocks[:, 257] == 117)                      # 'u' first, then the rest
        rows = rows[(blocks[rows, 258:262] == np.frombuffer(b"star", np.uint8)).all(1)]
        h = blocks[rows]
        size, size_ok = _octals(h[:, 124:136])
        stored, sum_ok = _octals(h[:, 148:156])
        sums = h.sum(1, dtype=np.uint32).astype(np.int64) - h[:, 148:156].sum(1, dtype=np.int64) + 256
        kind = h[:, 156]
        off = start + BLOCK * rows
        nxt = off + BLOCK + ((size + BLOCK - 1) & -BLOCK)
        plain = size_ok & sum_ok & (stored == sums) & (nxt <= win.end) & (kind != 76)
        _pax_plain(blocks, rows, size, plain & (kind == 120), plain)
        link = np.zeros(len(rows), bool)
        link[:-1] = nxt[:-1] == off[1:]
        self.off, self.nxt, self.size, self.kind, self.plain = off, nxt, size, kind, plain
        self.stop = ~(plain & link)
        self.regular = (kind == 48) | (kind == 0) | (kind == 55)
        self.skipped = (kind == 120) | (kind == 103)
        self._h, self.moves = h, win.moves

    def stretch(self, pos: int) -> tuple[int, int] | None:
        """Rows [first, last] of the plain stretch whose first header is at `pos`, or None."""
        i = int(np.searchsorted(self.off, pos))
        if i == len(self.off) or self.off[i] != pos or not self.plain[i]:
            return None
        k = i + int(self.stop[i:].argmax())
        return i, k if self.plain[k] else k - 1

    def names(self, sel: np.ndarray) -> list[str]:
        h = self._h[sel]
        names = np.ascontiguousarray(h[:, :100]).view("S100")[:, 0].tolist()
        prefixed = np.flatnonzero(h[:, 345] != 0).tolist()
        if prefixed:
            prefixes = np.ascontiguousarray(h[:, 345:500]).view("S155")[:, 0].tolist()
            for r in prefixed:
                names[r] = prefixes[r].split(b"\0", 1)[0] + b"/" + names[r]
        return [(n.split(b"\0", 1)[0] if b"\0" in n else n).decode("utf-8", "surrogateescape") for n in names]


def _pax_plain(blocks: np.ndarray, rows: np.ndarray, size: np.ndarray, pax: np.ndarray, plain: np.ndarray):
    """Clear `plain` for PAX headers whose records set a path or a size (which change the member they
    describe). Bodies of one block are searched all together, the usual case (webdataset writes an
    mtime only); a larger body, or any hit, is looked at on its own. The bodies lie inside `blocks`:
    plain rows end inside the window."""
    pax = np.flatnonzero(pax)
    sizes = size[pax]
    short = pax[(sizes > 0) & (sizes <= BLOCK)]
    longest = int(size[short].max()) if len(short) else 0
    joined = blocks[rows[short] + 1, :longest].tobytes()     # each body, and maybe the NULs after it
    hit = b"path=" in joined or b"size=" in joined
    for x in pax[(sizes > 0) if hit else (sizes > BLOCK)].tolist():   # then each one on its own
        first, n = int(rows[x]) + 1, int(size[x])
        body = blocks[first:first + (n + BLOCK - 1) // BLOCK].tobytes()[:n]
        if b"path=" in body or b"size=" in body:
            plain[x] = False


def _octal(field_bytes: bytes) -> int:
    if field_bytes[0] & 0x80:          # GNU base-256 for sizes over 8 GB
        return int.from_bytes(field_bytes[1:], "big")
    try:
        return int(field_bytes.strip(b" \0") or b"0", 8)   # the usual forms: "0001234\0", "001234\0 "
    except ValueError:
        return int(field_bytes.split(b"\0", 1)[0].strip() or b"0", 8)


def _header_ok(h: bytes) -> bool:
    try:
        stored = _octal(h[148:156])
    except ValueError:
        return False
    if stored == sum(h) - sum(h[148:156]) + 256:      # the checksum field counts as 8 spaces
        return True
    return stored == sum((b - 256 if b > 127 else b) for b in h[:148] + b" " * 8 + h[156:])  # old signed tars


def _pax(data: bytes) -> dict[str, str]:
    """PAX extended-header records: `LEN key=value\\n`."""
    out, i = {}, 0
    while i < len(data):
        sp = data.find(b" ", i)
        if sp < 0:
            break
        n = int(data[i:sp])
        key, _, value = data[sp + 1:i + n - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        i += n
    return out


def _ustar_name(h: bytes) -> str:
    name = h[0:100].split(b"\0", 1)[0]
    if h[257:262] == b"ustar":
        prefix = h[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def scan(path: str, keep: Collection[str] = (), max_members: int | None = None) -> ScanResult:
    """Walk the tar at `path` once; members whose extension (WebDataset's: after the first dot of the
    file name, lower-cased) is in `keep` have their bytes in `Member.data`.
    With `max_members`, stop after that many (a peek: no sha256, `bytes` 0)."""
    res = ScanResult()
    with open(path, "rb", buffering=0) as f:
        win = _Window(f)
        try:
            _walk(win, res, frozenset(keep), max_members)
        except (ValueError, IndexError, UnicodeDecodeError) as e:   # fields of a damaged header
            res.damage = f"an unreadable tar header ({e})"
        if max_members is not None and len(res.members) >= max_members:
            return res
        res.bytes = win.drain()
        res.sha256 = win.sha.hexdigest()
    return res


def _walk(win: _Window, res: ScanResult, keep: frozenset, max_members):
    """The header loop of `scan`: plain stretches (see `_Tables`) are listed at once; any other header
    (no magic, a GNU long name, a PAX path or size, a member running past the window, damage) is taken
    on its own by `_header`."""
    pos, pending, tab = 0, None, None
    while True:
        if pos + BLOCK > win.end and not win.reach(pos, pos + BLOCK):
            if pos < win.end:
                res.damage = f"the file ends inside a tar header at byte {pos}"
            return   # a tar without its end-of-archive blocks: every complete member is still there
        if pending is None:
            if tab is None or tab.moves != win.moves:
                tab = _Tables(win, pos)
            rows = tab.stretch(pos)
            if rows is not None:
                pos = _list_stretch(tab, rows, win, res, keep)
                if max_members is not None and len(res.members) >= max_members:
                    del res.members[max_members:]
                    return
                continue
        pos, pending = _header(win, res, keep, pos, pending)
        if pos is None or max_members is not None and len(res.members) >= max_members:
            return


def _list_stretch(tab: _Tables, rows: tuple[int, int], win: _Window, res: ScanResult, keep: frozenset) -> int:
    """List the members of a plain stretch of rows; return the byte where the header after it starts."""
    first, last = rows
    regular = tab.regular[first:last + 1]
    res.ignored += int((~regular & ~tab.skipped[first:last + 1]).sum())
    sel = np.flatnonzero(regular) + first
    members, take = res.members, win.take
    for name, at, size in zip(tab.names(sel), (tab.off[sel] + BLOCK).tolist(), tab.size[sel].tolist()):
        data = None
        if keep:
            dot = name.find(".", name.rfind("/") + 1)
            if dot >= 0 and name[dot + 1:].lower() in keep:
                data = take(at, at + size)
        members.append(Member(name, at, size, data))
    return int(tab.nxt[last])


def _header(win: _Window, res: ScanResult, keep: frozenset, pos: int, pending):
    """One header parsed from its bytes. `pending` carries a GNU long name or PAX records to the member
    they describe. Returns (where the next header starts, pending), or (None, None) to stop."""
    long_name, pax = pending or (None, None)
    h = win.take(pos, pos + BLOCK)
    if h == ZERO_BLOCK:
        return None, None   # end of archive
    if not _header_ok(h):
        res.damage, res.damaged_member = f"a damaged tar header at byte {pos}", None
        return None, None
    size, kind = _octal(h[124:136]), h[156]
    if pax and "size" in pax:
        size = int(pax["size"])
    data_at = pos + BLOCK
    end = data_at + size
    nxt = data_at + ((size + BLOCK - 1) & -BLOCK)
    if kind in (76, 120, 103):                        # L (GNU long name), x / g (PAX)
        if end > win.end and not win.reach(pos, end):
            res.damage = f"the file ends inside a tar header at byte {pos}"
            return None, None
        body = win.take(data_at, end)
        if kind == 76:
            long_name = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind == 120 and (b"path=" in body or b"size=" in body):
            pax = _pax(body)   # only names and sizes matter here (webdataset writes mtime records)
        return nxt, ((long_name, pax) if long_name or pax else None)
    name = long_name or (pax and pax.get("path")) or _ustar_name(h)
    if kind not in (48, 0, 55):                       # regular files ('0', NUL, '7') only
        res.ignored += 1
        return nxt, None
    dot = name.find(".", name.rfind("/") + 1)
    wanted = dot >= 0 and name[dot + 1:].lower() in keep
    if end > win.end and not win.reach(data_at if wanted else end, end):
        res.damage = f"the file ends inside member {name} (byte {data_at}, {size} bytes)"
        res.damaged_member = name
        return None, None
    data = win.take(data_at, end) if wanted else None
    res.members.append(Member(name, data_at, size, data))
    return nxt, None
