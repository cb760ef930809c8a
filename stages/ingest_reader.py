"""Reading ingest's inputs (and eval's held-out files): LLaVA JSON lists (streamed), JSONL and Parquet
as raw records, one at a time.

Any valid JSON is read — integers of any size, floats of any length or exponent, nesting up to
``MAX_JSON_DEPTH`` — by one parser (``loads_record``) for ``.json`` elements and ``.jsonl`` lines
alike (issue #13). A broken stretch of a ``.json`` list costs only the records it spans
(``_JsonList``), each counted.
"""
from __future__ import annotations

import json
import re
import sys
from decimal import Decimal
from pathlib import Path
from typing import Iterator, Optional

from ..pipeline import remote
from ..schemas.samples import REJECT_VALUE_CHARS, Reject

INPUT_KINDS = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
RAW_PREVIEW_CHARS = REJECT_VALUE_CHARS["raw"]  # how much of an unparsable record the rejects file keeps
# Deepest legal nesting of a record (the record object itself is level 1; LLaVA records are 3-4
# deep). Deeper records are rejected as malformed_json in .json and .jsonl alike; the limit sits
# well inside what Python's recursive json parser handles under the default recursion limit.
MAX_JSON_DEPTH = 500
# A .json list element still open after this many bytes is taken to be broken (an unclosed
# bracket or string) and the reader resynchronises; it also bounds the reader's memory.
MAX_RECORD_BYTES = 16 << 20
_CHUNK = 1 << 20
_BOM = b"\xef\xbb\xbf"
# a whole string (escapes included), or a lone quote whose string is not complete in the buffer
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|"', re.S)
# from an index inside an element: everything up to the next bracket, strings whole (possessive:
# no backtracking); stops at a '"' whose string is not complete in the buffer yet
_SKIP = re.compile(rb'(?:[^"\[\]{}]++|"[^"\\]*+(?:\\.[^"\\]*+)*+")*+', re.S)
_SCALAR_END = re.compile(rb'[\[\]{},"]')
_NON_WS = re.compile(rb"[^ \t\r\n]")
_ID_KEY = re.compile(rb'"id"[ \t\r\n]*:')
_SUBSTANCE = re.compile(rb"[^ \t\r\n,\[\]]")
_OPEN, _CLOSE = b"[{", {ord("]"): ord("["), ord("}"): ord("{")}
_QUOTE = ord('"')


def _kind(path: str) -> Optional[str]:
    return INPUT_KINDS.get(Path(path).suffix.lower())


def source_name(path: str) -> str:
    """The input's file name as ``source`` values show it: always valid UTF-8 (a name whose bytes
    are in another encoding shows them as ``\\xe9``), so no record of that file becomes unwritable
    through its source (issue #22)."""
    name = Path(path).name
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _first_byte(path: str) -> bytes:
    """The first byte that is not whitespace (after a UTF-8 byte-order mark), b"" if none."""
    with remote.open_binary(path) as f:
        head = f.read(len(_BOM))
        pending = b"" if head == _BOM else head
        while True:
            b, pending = (pending[:1], pending[1:]) if pending else (f.read(1), b"")
            if not b or not b.isspace():
                return b


def _parse_int(s: str):
    # Python refuses int() of more than sys.get_int_max_str_digits() (4300) digits; such a number
    # is still valid JSON: keep it exact as a Decimal rather than lose the record
    try:
        return int(s)
    except ValueError:
        return Decimal(s)


def _depth(obj) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, ``{}`` is 1), iteratively."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_JSON_DEPTH:
                stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def loads_record(raw: bytes | str):
    """The one JSON parser of ingest (``.json`` elements, ``.jsonl`` lines, staged chunks): any
    valid JSON value up to ``MAX_JSON_DEPTH`` levels. Integers stay exact at any size (``int``, or
    ``Decimal`` past Python's 4300-digit ``int`` limit); floats are Python floats (``1e-400`` →
    0.0, ``1e400`` → inf, 40 digits → nearest double), as ``json.loads`` reads them. Raises
    ``Reject`` (``not_utf8`` / ``malformed_json``)."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Reject("not_utf8", str(e)) from None
    try:
        obj = json.loads(raw, parse_int=_parse_int)
    except RecursionError:
        raise Reject("malformed_json", f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # json.JSONDecodeError, and the odd number Python cannot convert
        raise Reject("malformed_json", str(e)) from None
    # nesting is at most the number of opening brackets: walk the record only when that is large
    d = _depth(obj) if raw.count("[") + raw.count("{") > MAX_JSON_DEPTH else 0
    if d > MAX_JSON_DEPTH:
        raise Reject("malformed_json", f"nested {d if d <= MAX_JSON_DEPTH + 1 else 'more than ' + str(MAX_JSON_DEPTH)} "
                                       f"levels deep; at most {MAX_JSON_DEPTH} are read")
    return obj


def _one_line(raw: bytes) -> bytes:
    # a record that parsed holds no raw CR/LF inside strings (JSON forbids them there), so
    # these bytes are whitespace and the record fits one line of the staging JSONL verbatim
    return raw.replace(b"\r", b" ").replace(b"\n", b" ")


def _record_item(source: str, raw: bytes) -> dict:
    """A raw record's bytes → a ``read_raw`` item (parsed record + its bytes, or a reject)."""
    try:
        rec = loads_record(raw)
    except Reject as r:
        return {"source": source, "reject": r.reason, "detail": r.detail,
                "raw": raw[:RAW_PREVIEW_CHARS].decode("utf-8", "replace")}
    return {"source": source, "record": rec, "text": _one_line(raw)}


def read_raw(path: str) -> Iterator[dict]:
    """Yield, streaming and in input order, ``{"source", "record", "text"}`` per readable record
    (``text``: its JSON bytes on one line) or ``{"source", "reject", "detail", "raw"}``.

    ``.jsonl``: one record per line, each parsed by ``loads_record``. ``.json``: a list, split into
    elements by ``_JsonList`` and each element parsed by the same ``loads_record``, so the same
    records give the same results in either format. A broken stretch of a ``.json`` list costs
    only the records it spans (see ``_JsonList``); every lost record is a reject."""
    name = source_name(path)
    kind = _kind(path)
    if kind == "jsonl":
        with remote.open_binary(path) as f:
            for lineno, line in enumerate(f, start=1):
                if lineno == 1 and line.startswith(_BOM):
                    line = line[len(_BOM):]
                if not line.strip():
                    continue
                yield _record_item(f"{name}:{lineno}", line)
    elif kind == "json":
        with remote.open_binary(path) as f:
            yield from _JsonList(f, name).items()
    elif kind == "parquet":
        import pyarrow.parquet as pq

        with remote.open_binary(path) as f:
            pf = pq.ParquetFile(f)
            i = 0
            # small batches: a datasets Parquet holds the images in its rows (≈ 64 images in memory)
            for batch in pf.iter_batches(batch_size=64):
                for rec in batch.to_pylist():
                    yield {"source": f"{name}#{i}", "record": rec}
                    i += 1
    else:  # preflight refuses these; kept for direct callers
        raise ValueError(f"{path}: unknown input type")


class _JsonList:
    """Split a JSON list (``[elem, elem, …]``) into its elements' bytes, streaming: at most one
    element (≤ ``MAX_RECORD_BYTES``) plus one read chunk in memory, whatever the file size.

    Boundaries come from a scan of brackets, commas and whole strings; each element is then parsed
    on its own (``loads_record``), so a bad value inside a record — a typo, a stray byte, invalid
    UTF-8, too deep — costs that record only (``malformed_json`` / ``not_utf8``). When the
    *structure* breaks (a closing bracket of the wrong kind, an element still open after
    ``MAX_RECORD_BYTES`` or at the end of the file — an unclosed bracket or string — or stray bytes
    between elements) the reader resynchronises at the next ``{`` that follows a ``,`` or ``[``
    and opens a complete object with an ``"id"`` or ``"conversations"`` key followed by ``,`` or
    ``]``. The skipped stretch is rejected as ``unreadable_json``, one reject per ``"id":`` key in
    it (at least one unless it holds only commas, brackets and blanks), with its byte range; a list that the file ends without closing (a
    truncated file) adds one such reject for the records that may have followed. Each stretch is
    also reported on stderr. Tolerated without loss: a missing comma between two objects, a
    trailing comma before ``]``, a UTF-8 byte-order mark.
    """

    def __init__(self, f, name: str):
        self.f, self.name = f, name
        self.buf, self.base, self.eof = b"", 0, False  # base: file offset of buf[0]
        self.i = 0  # records (and counted lost records) so far: the ``#i`` of sources

    # -- buffer
    def _fill(self) -> bool:
        if self.eof:
            return False
        b = self.f.read(max(_CHUNK, len(self.buf)))  # doubling: a long element is rescanned O(log n) times
        if not b:
            self.eof = True
            return False
        self.buf += b
        return True

    def _compact(self, pos: int) -> int:
        """Forget bytes before ``pos`` (only between elements); returns the new index of ``pos``."""
        if pos > _CHUNK:
            self.buf, self.base = self.buf[pos:], self.base + pos
            return 0
        return pos

    def _skip_ws(self, pos: int) -> Optional[int]:
        while True:
            m = _NON_WS.search(self.buf, pos)
            if m:
                return m.start()
            pos = len(self.buf)
            if not self._fill():
                return None

    # -- one element
    def _scan(self, start: int) -> tuple[int, int, Optional[str]]:
        """Element at ``buf[start]`` (not whitespace) → (end index, nesting depth, structural
        error or None)."""
        c = self.buf[start]
        pos = start
        while c not in _OPEN:  # a scalar element (not a record: its parse gives not_an_object)
            if c == _QUOTE:
                m = _STRING.match(self.buf, start)
                if m.end() - start > 1:
                    return m.end(), 0, None
            else:
                m = _SCALAR_END.search(self.buf, pos)
                if m:
                    return m.start(), 0, None
                pos = len(self.buf)
            if len(self.buf) - start > MAX_RECORD_BYTES:
                return len(self.buf), 0, f"still open after {MAX_RECORD_BYTES} bytes"
            if not self._fill():
                return len(self.buf), 0, ("the file ends inside a string" if c == _QUOTE else None)
        stack, depth, pos = bytearray([c]), 1, start + 1
        while True:
            buf = self.buf
            pos = _SKIP.match(buf, pos).end()  # past everything but brackets (strings whole)
            if pos < len(buf) and buf[pos] != _QUOTE:  # a quote here: its string is incomplete
                ch = buf[pos]
                pos += 1
                if ch in _OPEN:
                    stack.append(ch)
                    depth = max(depth, len(stack))
                    continue
                if stack[-1] != _CLOSE[ch]:
                    return pos - 1, depth, f"'{chr(ch)}' at byte {self.base + pos - 1} closes '{chr(stack[-1])}'"
                stack.pop()
                if not stack:
                    return pos, depth, None
                continue
            if len(buf) - start > MAX_RECORD_BYTES:
                return pos, depth, f"still open after {MAX_RECORD_BYTES} bytes (an unclosed bracket or string?)"
            if not self._fill():
                return len(self.buf), depth, "the file ends inside it (truncated, or an unclosed bracket or string)"

    def _element(self, start: int, end: int, depth: int) -> dict:
        src = f"{self.name}#{self.i}"
        self.i += 1
        if depth > MAX_JSON_DEPTH:  # rejected without recursing into it
            return {"source": src, "reject": "malformed_json",
                    "detail": f"nested more than {MAX_JSON_DEPTH} levels deep; at most {MAX_JSON_DEPTH} are read",
                    "raw": self.buf[start:start + RAW_PREVIEW_CHARS].decode("utf-8", "replace")}
        return _record_item(src, self.buf[start:end])

    # -- the list
    def items(self) -> Iterator[dict]:
        pos = self._skip_ws(0)
        if pos is not None and self.buf.startswith(_BOM, pos):
            pos = self._skip_ws(pos + len(_BOM))
        if pos is None or self.buf[pos] != ord("["):
            raise ValueError(f"{self.name} is not a JSON list")
        pos += 1
        while True:
            if pos is None:  # a resync ran into the end of the file (its rejects are out)
                return
            pos = self._skip_ws(self._compact(pos))
            if pos is None:  # the file ends where a record or the closing ']' should be
                yield from self._lost(self.base + len(self.buf), self.base + len(self.buf), "", tail=True)
                return
            c = self.buf[pos]
            if c == ord("]"):  # the end (also after a tolerated trailing comma)
                nxt = self._skip_ws(pos + 1)
                if nxt is None:
                    return
                pos = yield from self._resync(nxt, nxt, "bytes after the list's closing ']'")
            elif c == ord(",") or c in _CLOSE:
                pos = yield from self._resync(pos, pos, f"'{chr(c)}' where a record should start")
            else:
                end, depth, err = self._scan(pos)
                if err:
                    pos = yield from self._resync(pos, pos + 1, f"record #{self.i}: {err}")
                    continue
                yield self._element(pos, end, depth)
                nxt = self._skip_ws(end)
                if nxt is None:
                    yield from self._lost(self.base + end, self.base + end, "", tail=True)
                    return
                c = self.buf[nxt]
                if c == ord(","):
                    pos = nxt + 1
                elif c in (ord("]"), ord("{")):  # end of list, or a missing comma between two objects
                    pos = nxt
                else:
                    pos = yield from self._resync(nxt, nxt, f"{chr(c)!r} after record #{self.i - 1}")

    def _resync(self, start: int, search: int, why: str):
        """Skip the stretch from ``buf[start]`` to the next record start found at or after
        ``search`` (see the class docstring); yield its rejects; return the index to go on from,
        or None at the end of the file."""
        preview = self.buf[start:start + RAW_PREVIEW_CHARS].decode("utf-8", "replace")
        start_off = self.base + start
        tally = [0, False]  # "id" keys in the stretch, and whether it holds more than , [ ] and blanks
        counted, p = start, search  # buf[start:counted] is tallied; no record starts before p

        def count(a: int, b: int, cut: int) -> None:
            tally[0] += sum(1 for m in _ID_KEY.finditer(self.buf, a, b) if m.start() < cut)
            tally[1] = tally[1] or _SUBSTANCE.search(self.buf, a, cut) is not None

        while True:
            if p - counted > 2 * MAX_RECORD_BYTES:  # a long stretch: tally it and forget its bytes
                cut = p - 64
                count(counted, p, cut)
                self.buf, self.base = self.buf[cut:], self.base + cut
                counted, p = 0, p - cut
            k = self.buf.find(b"{", p)
            if k < 0:
                p = len(self.buf)
                if not self._fill():
                    count(counted, p, p)
                    yield from self._lost(start_off, self.base + p, preview, *tally, why=why, tail=True)
                    return None
                continue
            q = k - 1
            while q >= 0 and self.buf[q] in b" \t\r\n":
                q -= 1
            if q >= 0 and self.buf[q] in b",[":
                end, depth, err = self._scan(k)
                if not err and depth <= MAX_JSON_DEPTH:
                    nxt = self._skip_ws(end)
                    if nxt is not None and self.buf[nxt] in b",]":
                        try:
                            obj = loads_record(self.buf[k:end])
                        except Reject:
                            obj = None
                        if isinstance(obj, dict) and ("id" in obj or "conversations" in obj):
                            count(counted, k, k)
                            yield from self._lost(start_off, self.base + k, preview, *tally, why=why)
                            return k
            p = k + 1

    def _lost(self, a: int, b: int, preview: str, ids: int = 0, substance: bool = True, why: str = "",
              tail: bool = False):
        """Rejects for the stretch of bytes [a, b): one per "id" key in it; one if it has none but
        holds more than commas, brackets and blanks; one for a list the file ends without closing."""
        n = ids or int(substance and bool(why))
        parts = []
        if why:
            parts.append(f"bytes {a}-{b} of {self.name} are not readable as JSON ({why}); " + (
                f"they held about {n} record(s) (counted by their \"id\" keys), each counted as one "
                "unreadable_json reject" if n else "no record was in them"))
        if tail:
            parts.append(f"the file ends at byte {b} without the list's closing ']' (truncated?): any records "
                         "after it are missing and counted as one reject")
            n += 1
        what = "; ".join(parts)
        print(f"ingest: WARNING: {what}", file=sys.stderr, flush=True)
        for j in range(n):
            yield {"source": f"{self.name}#{self.i}", "reject": "unreadable_json", "detail": what,
                   **({"raw": preview} if j == 0 and preview else {})}
            self.i += 1


def _id_key(rec) -> Optional[str]:
    if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)) and not isinstance(rec.get("id"), bool):
        return str(rec["id"])
    return None
