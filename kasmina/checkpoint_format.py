"""The v2 checkpoint format: a safetensors payload plus a JSON sidecar.

**Payload** (``<id>.safetensors``): a standard safetensors file. Every tensor found in the
checkpoint's sections (``state_data``, ``blueprint_state``, ``metadata``, or a layer's
``state`` and ``blueprints``) is one safetensors entry named by its path
(``state_data/history``); everything else (ints, floats, strings, bools, None, lists,
nested dicts with string keys) is kept in the header's ``__metadata__`` as a JSON
*structure* in which each tensor is ``{"__tensor__": name}``. No pickle anywhere: loading
parses JSON and copies bytes, nothing else. Tuples come back as lists and ``IntEnum``
values as plain ints. The file is written and read here (one pass, no extra copy, the
sha256 computed over the same buffers) and stays readable by the ``safetensors`` library.

**Sidecar** (``<id>.json``): version 2, ids, kind, priority, lifecycle state, creation
time, payload file, size and sha256, plus ``sidecar_sha256`` over its own canonical JSON,
so a garbled sidecar is detected even when it still parses.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import struct
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ._extension import FILEIO
from ._generated.lifecycle_tables import NUM_STATES, STATE_NAMES
from .checkpoint_errors import CheckpointCorruptError

__all__ = [
    "FORMAT_VERSION",
    "PRIORITIES",
    "SIDECAR_FORMAT",
    "CheckpointInfo",
    "EncodedPayload",
    "build_sidecar",
    "compact_json",
    "decode_payload",
    "encode_payload",
    "is_v2_sidecar",
    "lifecycle_state_of",
    "load_json",
    "parse_sidecar",
    "sha256_hex",
]

FORMAT_VERSION = 2
SIDECAR_FORMAT = "kasmina-checkpoint"
PAYLOAD_FORMAT = "kasmina-checkpoint-payload/2"
PRIORITIES = ("low", "normal", "high", "critical")
KINDS = ("seed", "layer")
_TENSOR_TAG = "__tensor__"
_MAX_HEADER = 100 * 1024 * 1024

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code
_CODES = {code: dtype for dtype, code in _DTYPES.items()}
# dtypes whose tensors .numpy() can view directly (the others are viewed as uint8 first)
_NUMPY_DTYPES = frozenset(
    d for d in _DTYPES if d not in (torch.bfloat16, getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None))
)


class CheckpointInfo(NamedTuple):
    """What a sidecar says about one checkpoint (what ``list_checkpoints`` returns).
    An immutable record (a named tuple: cheap to build for tens of thousands of sidecars).

    ``number`` is the checkpoint's per-(layer, seed) sequence number, starting at 1: the
    stable integer stored in a seed's CHECKPOINT_ID column (0 means none). ``timestamp``
    is the creation time in seconds since the epoch; ``location`` is ``active`` or
    ``archive``; ``sha256`` is None for v1 files, which carry no checksum."""

    checkpoint_id: str
    kind: str
    layer_id: str
    seed_id: int | None
    number: int
    created_ms: int
    seq: int
    timestamp: float
    priority: str
    lifecycle_state: int | None
    payload_file: str
    payload_size: int
    sha256: str | None
    version: int
    location: str = "active"

    @property
    def lifecycle_state_name(self) -> str | None:
        return None if self.lifecycle_state is None else STATE_NAMES[self.lifecycle_state]

    @property
    def sort_key(self) -> tuple[int, int]:
        """Newest-first ordering uses this parsed (milliseconds, sequence) pair."""
        return (self.created_ms, self.seq)

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


def lifecycle_state_of(value: Any) -> int | None:
    """The lifecycle state id held in ``state_data['lifecycle_state']``: an int, an
    :class:`ExtendedLifecycle`, a state name or a one-element integer tensor; None when
    absent. Raises ``ValueError`` naming the value for anything else."""
    if value is None:
        return None
    state = value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex():
            raise ValueError(
                f"lifecycle_state must be a one-element integer tensor, got shape {tuple(value.shape)} {value.dtype}"
            )
        state = int(value.item())
    elif isinstance(value, str):
        if value.upper() not in STATE_NAMES:
            raise ValueError(f"lifecycle_state {value!r} is not a state name ({', '.join(STATE_NAMES)})")
        state = STATE_NAMES.index(value.upper())
    elif isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"lifecycle_state must be an int, a state name or a tensor, got {value!r}")
    if not 0 <= state < NUM_STATES:
        raise ValueError(f"lifecycle_state {value!r} is out of range 0..{NUM_STATES - 1}")
    return int(state)


# ---- payload ---------------------------------------------------------------------------
# Payloads this large are hashed on a second thread while they are written (and read).
BACKGROUND_HASH_BYTES = 16 << 20
# Without kasmina._fileio, inputs this small are hashed by CPython's own SHA-256 (_sha256,
# _sha2 from 3.12): slower per byte than OpenSSL's, but far less code to run, which is what
# a small save pays for (each fsync leaves the CPU's caches cold).
SMALL_HASH_BYTES = 16 << 10
try:
    from _sha256 import sha256 as _builtin_sha256  # type: ignore[import-not-found]
except ImportError:
    try:
        from _sha2 import sha256 as _builtin_sha256  # type: ignore[import-not-found,no-redef]
    except ImportError:
        _builtin_sha256 = hashlib.sha256  # type: ignore[assignment]


# The SHA-256 of a tuple of buffers in one native call (kasmina._fileio, where it is built):
# cheaper for a save than a hasher object, whose code each fsync leaves cold (see
# csrc/fileio/sha256.cpp).
_NATIVE_SHA256: Callable[[tuple[Any, ...]], str] | None = getattr(FILEIO, "sha256_hex", None)


def sha256_of(nbytes: int) -> Any:
    """A new SHA-256 hasher for ``nbytes`` of input (the same digest either way)."""
    return _builtin_sha256() if nbytes < SMALL_HASH_BYTES else hashlib.sha256()


def sha256_hex(chunks: tuple[Any, ...]) -> str:
    """The SHA-256 of ``chunks`` (buffers, in order) as 64 hex digits."""
    if _NATIVE_SHA256 is not None:
        return _NATIVE_SHA256(chunks)
    digest = sha256_of(sum(memoryview(chunk).nbytes for chunk in chunks))
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


class EncodedPayload:
    """A payload ready to write: ``chunks`` in file order, total ``size`` and its sha256
    (computed when first read, so a writer can start the write first; for a large
    payload :meth:`hash_in_background` computes it on a second thread while the payload
    is written). The chunks view the caller's tensors, which must not change until the
    payload is written."""

    __slots__ = ("_digest", "_hasher", "chunks", "size")

    def __init__(self, chunks: tuple[memoryview | bytes, ...], size: int) -> None:
        self.chunks = chunks
        self.size = size
        self._digest: str | None = None
        self._hasher: threading.Thread | None = None

    def hash_in_background(self) -> None:
        """Start computing the sha256 on a second thread when the payload is large
        (hashlib and file writes both release the GIL); :attr:`sha256` waits for it."""
        if self.size >= BACKGROUND_HASH_BYTES and self._digest is None and self._hasher is None:
            self._hasher = threading.Thread(target=self._hash, name="kasmina-sha256", daemon=True)
            self._hasher.start()

    @property
    def sha256(self) -> str:
        if self._hasher is not None:
            self._hasher.join()
            self._hasher = None
        if self._digest is None:
            self._hash()
        return self._digest  # type: ignore[return-value]

    def _hash(self) -> None:
        self._digest = sha256_hex(self.chunks)


def encode_payload(sections: Mapping[str, Any]) -> EncodedPayload:
    """Encode ``{section name: value}`` as one safetensors payload. Raises ``TypeError`` /
    ``ValueError`` naming the path of a value that cannot be stored."""
    tensors: dict[str, _TensorBytes] = {}
    structure = {name: _encode_value(value, name, tensors) for name, value in sections.items()}
    # the header as json.dumps(..., separators=(",", ":")) writes it, put together directly
    header = [f'{{"__metadata__":{{"format":"{PAYLOAD_FORMAT}","structure":{_escape(compact_json(structure))}}}']
    views: list[memoryview] = []
    offset = 0
    # widest elements first, so that every tensor's data starts aligned to its element size
    for _, name, code, shape, view in sorted((-t[0], name, *t[1:]) for name, t in tensors.items()):
        nbytes = view.nbytes
        dims = ",".join(map(str, shape))
        header.append(f',{_escape(name)}:{{"dtype":"{code}","shape":[{dims}],"data_offsets":[{offset},{offset + nbytes}]}}')
        if nbytes:
            views.append(view)
        offset += nbytes
    header.append("}")
    header_bytes = "".join(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    chunks = (struct.pack("<Q", len(header_bytes)) + header_bytes, *views)
    return EncodedPayload(chunks, len(chunks[0]) + offset)


def _json_encoder(sort_keys: bool) -> Callable[[Any], str]:
    """A compact JSON encoder equal to ``json.dumps(..., separators=(",", ":"))``, built
    once (``JSONEncoder.encode`` builds its C encoder on every call)."""
    encoder = json.JSONEncoder(separators=(",", ":"), sort_keys=sort_keys)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    try:
        fast = make(None, encoder.default, json.encoder.encode_basestring_ascii, None, ":", ",", sort_keys, False, True)
    except TypeError:  # another signature in this Python: the plain encoder
        return encoder.encode
    return lambda value: "".join(fast(value, 0))


_escape = json.encoder.encode_basestring_ascii  # a str as JSON, quotes included (json's own, in C)
_FORMAT_JSON = _escape(SIDECAR_FORMAT)
_compact_encode = _json_encoder(sort_keys=False)
_canonical_json = _json_encoder(sort_keys=True)


def compact_json(value: Any) -> str:
    """``json.dumps(value, separators=(",", ":"))``, without building an encoder per call."""
    return _compact_encode(value)


_SCALARS = (str, int, float, type(None))
_PLAIN = frozenset((*_SCALARS, bool))  # stored as they are (floats keep NaN and infinities: Python's JSON)


_TensorBytes = tuple[int, str, list[int], memoryview]  # (element size, dtype code, shape, bytes)


def _tensor_bytes(tensor: torch.Tensor, path: str) -> tuple[str, int, list[int], memoryview]:
    """(dtype code, element size, shape, bytes) of a tensor, viewing its memory when it can.
    Raises ``TypeError``/``ValueError`` naming ``path`` for one that cannot be stored."""
    dtype = tensor.dtype
    if dtype in _NUMPY_DTYPES:
        try:  # a dense, contiguous CPU tensor that needs no grad: a view of its memory
            array = tensor.numpy()
            return _DTYPES[dtype], dtype.itemsize, list(array.shape), memoryview(array).cast("B")
        except (RuntimeError, TypeError, ValueError):
            pass  # the general way, with its checks
    if tensor.layout != torch.strided or tensor.is_nested:
        raise TypeError(f"checkpoint tensor {path!r}: only dense tensors can be stored, got layout {tensor.layout}")
    code = _DTYPES.get(dtype)
    if code is None:  # quantized and complex dtypes among them
        raise TypeError(f"checkpoint tensor {path!r}: dtype {dtype} is not supported by safetensors")
    if tensor.is_meta:
        raise ValueError(f"checkpoint tensor {path!r} is on the meta device and has no data")
    tensor = tensor.detach().to("cpu").contiguous()
    shape = list(tensor.shape)
    if not tensor.numel():
        return code, dtype.itemsize, shape, memoryview(b"")
    return code, dtype.itemsize, shape, memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _encode_value(value: Any, path: str, tensors: dict[str, _TensorBytes]) -> Any:
    kind = type(value)
    if kind is torch.Tensor or isinstance(value, torch.Tensor):
        return {_TENSOR_TAG: _add_tensor(value, path, tensors)}
    if kind is dict or (kind not in _SCALARS and isinstance(value, Mapping)):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"checkpoint value {path!r}: dict keys must be strings, got {key!r} ({type(key).__name__})")
            if key == _TENSOR_TAG:
                raise ValueError(f"checkpoint value {path!r}: the key {_TENSOR_TAG!r} is reserved")
            kind = type(item)
            out[key] = item if kind in _PLAIN else _encode_value(item, f"{path}/{key}", tensors)
        return out
    if kind in _PLAIN:
        return value
    if isinstance(value, list | tuple):
        return [_encode_value(item, f"{path}/{i}", tensors) for i, item in enumerate(value)]
    if isinstance(value, str | int | float):  # subclasses (IntEnum, ...): stored as the plain value
        return value
    raise TypeError(
        f"checkpoint value {path!r} has type {type(value).__name__}; only tensors, dicts with string keys, "
        "lists, tuples, str, int, float, bool and None can be stored"
    )


def _add_tensor(tensor: torch.Tensor, path: str, tensors: dict[str, _TensorBytes]) -> str:
    code, itemsize, shape, view = _tensor_bytes(tensor, path)
    name = path
    suffix = 1
    while name in tensors:
        name = f"{path}#{suffix}"
        suffix += 1
    tensors[name] = (itemsize, code, shape, view)
    return name


def decode_payload(buffer: torch.Tensor, path: Path, device: torch.device | str | None = None) -> dict[str, Any]:
    """Decode a payload held in the uint8 tensor ``buffer`` back into its sections.
    Tensors are views of ``buffer`` on CPU, or copies on ``device``. Any inconsistency
    raises :class:`CheckpointCorruptError` naming ``path``."""
    tensors, metadata = _parse_safetensors(buffer, path)
    if metadata.get("format") != PAYLOAD_FORMAT:
        raise CheckpointCorruptError(f"payload {path} is not a Kasmina v2 payload (format {metadata.get('format')!r})", path)
    try:
        structure = json.loads(metadata["structure"])
    except (KeyError, ValueError) as exc:
        raise CheckpointCorruptError(f"payload {path}: its structure metadata is missing or not JSON ({exc})", path) from None
    target = None if device is None else torch.device(device)
    if target is not None and target.type != "cpu":
        tensors = {name: t.to(target) for name, t in tensors.items()}
    if not isinstance(structure, dict):
        raise CheckpointCorruptError(f"payload {path}: its structure is not an object", path)
    return {name: _decode_value(value, tensors, path) for name, value in structure.items()}


def _decode_value(value: Any, tensors: Mapping[str, torch.Tensor], path: Path) -> Any:
    if isinstance(value, dict):
        if _TENSOR_TAG in value:
            name = value[_TENSOR_TAG]
            if name not in tensors:
                raise CheckpointCorruptError(f"payload {path}: structure names tensor {name!r}, which is not in the file", path)
            return tensors[name]
        return {key: _decode_value(item, tensors, path) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode_value(item, tensors, path) for item in value]
    return value


def _parse_safetensors(buffer: torch.Tensor, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    total = buffer.numel()
    raw = memoryview(buffer.numpy())
    if total < 8:
        raise CheckpointCorruptError(f"payload {path} is truncated ({total} bytes)", path)
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > min(total - 8, _MAX_HEADER):
        raise CheckpointCorruptError(f"payload {path}: header length {header_len} exceeds the file ({total} bytes)", path)
    try:
        header = json.loads(bytes(raw[8 : 8 + header_len]))
    except ValueError as exc:
        raise CheckpointCorruptError(f"payload {path}: header is not JSON ({exc})", path) from None
    if not isinstance(header, dict):
        raise CheckpointCorruptError(f"payload {path}: header is not an object", path)
    metadata = header.pop("__metadata__", {}) or {}
    start = 8 + header_len
    spans = []
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        try:
            dtype = _CODES[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointCorruptError(f"payload {path}: bad header entry {name!r} ({exc!r})", path) from None
        itemsize = dtype.itemsize
        if min(shape, default=0) < 0 or end - begin != math.prod(shape) * itemsize or begin < 0 or start + end > total:
            raise CheckpointCorruptError(f"payload {path}: tensor {name!r} has inconsistent shape/offsets", path)
        spans.append((begin, end))
        data = buffer[start + begin : start + end]
        if (start + begin) % itemsize:  # misaligned: copy instead of viewing
            data = data.clone()
        tensors[name] = data.view(dtype).reshape(shape)
    spans.sort()
    covered = 0
    for begin, end in spans:
        if begin != covered:
            raise CheckpointCorruptError(f"payload {path}: tensor data overlaps or leaves gaps", path)
        covered = end
    if start + covered != total:
        raise CheckpointCorruptError(f"payload {path}: {total - start - covered} unexpected bytes after the tensor data", path)
    return tensors, metadata


# ---- sidecar ---------------------------------------------------------------------------
# The sidecar's canonical JSON (what parse_sidecar checks) is written through one template:
# its keys in the sorted order of json.dumps(sort_keys=True), each value as that encoder
# writes it. Cheaper than building the dict and encoding it, which a small save pays for.
_SIDECAR_KEYS = (
    "checkpoint_id", "created_ms", "created_utc", "format", "kind", "layer_id", "lifecycle_state",
    "lifecycle_state_name", "number", "payload_file", "payload_size", "priority", "seed_id", "seq", "sha256",
    "timestamp", "version",
)  # fmt: skip
if list(_SIDECAR_KEYS) != sorted({*CheckpointInfo._fields, "format", "created_utc", "lifecycle_state_name"} - {"location"}):
    raise AssertionError("_SIDECAR_KEYS must list CheckpointInfo's fields, sorted")  # caught by any import
_SIDECAR_TEMPLATE = "{" + ",".join(f'"{key}":%s' for key in _SIDECAR_KEYS) + "}"


def build_sidecar(info: CheckpointInfo) -> bytes:
    """The sidecar JSON of ``info`` (location is not stored: it is where the file is): its
    canonical JSON (sorted keys, compact: what :func:`parse_sidecar` checks) with
    ``sidecar_sha256`` of that text appended."""
    state = info.lifecycle_state
    created = _utc_text(info.created_ms) if info.created_ms / 1000 == info.timestamp else _utc_iso(info.timestamp)
    canonical = (
        _SIDECAR_TEMPLATE
        % (
            _escape(info.checkpoint_id),
            int.__repr__(info.created_ms),
            _escape(created),
            _FORMAT_JSON,
            _escape(info.kind),
            _escape(info.layer_id),
            "null" if state is None else int.__repr__(state),
            "null" if state is None else _escape(info.lifecycle_state_name),
            int.__repr__(info.number),
            _escape(info.payload_file),
            int.__repr__(info.payload_size),
            _escape(info.priority),
            "null" if info.seed_id is None else int.__repr__(info.seed_id),
            int.__repr__(info.seq),
            "null" if info.sha256 is None else _escape(info.sha256),
            _json_float(info.timestamp),
            int.__repr__(info.version),
        )
    ).encode()
    return b'%s,"sidecar_sha256":"%s"}' % (canonical[:-1], sha256_hex((canonical,)).encode())


def _json_float(value: float) -> str:
    """``value`` as Python's JSON encoder writes a float."""
    if math.isfinite(value):
        return float.__repr__(value)
    return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")


def _utc_iso(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc).isoformat(timespec="milliseconds")


_utc_second: list[tuple[int, str]] = [(-1, "")]  # the last whole second formatted (one tuple: read atomically)


def _utc_text(ms: int) -> str:
    """``_utc_iso(ms / 1000)``, formatting each whole second once."""
    second, milli = divmod(ms, 1000)
    cached = _utc_second[0]
    if cached[0] != second:
        cached = (second, _utc_iso(second)[:-10])  # without ".000+00:00"
        _utc_second[0] = cached
    return f"{cached[1]}.{milli:03d}+00:00"


def load_json(raw: bytes, path: Path) -> dict[str, Any]:
    """A sidecar's JSON object; :class:`CheckpointCorruptError` naming ``path`` if garbled."""
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise CheckpointCorruptError(f"sidecar {path} is garbled: not JSON ({exc})", path) from None
    if not isinstance(body, dict):
        raise CheckpointCorruptError(f"sidecar {path} is garbled: not a JSON object", path)
    return body


def is_v2_sidecar(body: Mapping[str, Any]) -> bool:
    return body.get("format") == SIDECAR_FORMAT


def parse_sidecar(body: dict[str, Any], path: Path, *, location: str, strict: bool) -> CheckpointInfo:
    """Parse a v2 sidecar's JSON object. ``strict`` also checks its own checksum.
    Anything wrong raises :class:`CheckpointCorruptError` naming ``path``."""
    if not is_v2_sidecar(body):
        raise CheckpointCorruptError(f"sidecar {path} is garbled: not a Kasmina checkpoint sidecar", path)
    body = dict(body)
    if strict:
        claimed = body.pop("sidecar_sha256", None)
        if claimed != _canonical_sha(body):
            raise CheckpointCorruptError(f"sidecar {path} is garbled: its sidecar_sha256 does not match its content", path)
    try:
        info = CheckpointInfo(
            checkpoint_id=_typed(body, "checkpoint_id", str),
            kind=_typed(body, "kind", str),
            layer_id=_typed(body, "layer_id", str),
            seed_id=_typed(body, "seed_id", int, optional=True),
            number=_typed(body, "number", int),
            created_ms=_typed(body, "created_ms", int),
            seq=_typed(body, "seq", int),
            timestamp=float(_typed(body, "timestamp", (int, float))),
            priority=_typed(body, "priority", str),
            lifecycle_state=_typed(body, "lifecycle_state", int, optional=True),
            payload_file=_typed(body, "payload_file", str),
            payload_size=_typed(body, "payload_size", int),
            sha256=_typed(body, "sha256", str),
            version=_typed(body, "version", int),
            location=location,
        )
    except (KeyError, TypeError) as exc:
        raise CheckpointCorruptError(f"sidecar {path} is garbled: {exc.args[0]}", path) from None
    problem = _semantic_problem(info, path)
    if problem:
        raise CheckpointCorruptError(f"sidecar {path} is garbled: {problem}", path)
    return info


def _semantic_problem(info: CheckpointInfo, path: Path) -> str | None:
    if info.version != FORMAT_VERSION:
        return f"version {info.version} (expected {FORMAT_VERSION})"
    if path.name != f"{info.checkpoint_id}.json":
        return f"it describes checkpoint {info.checkpoint_id!r}, not the one its name says"
    if info.kind not in KINDS or info.priority not in PRIORITIES:
        return f"kind {info.kind!r} / priority {info.priority!r} unknown"
    if info.lifecycle_state is not None and not 0 <= info.lifecycle_state < NUM_STATES:
        return f"lifecycle_state {info.lifecycle_state} out of range"
    if info.payload_file != f"{info.checkpoint_id}.safetensors" or info.payload_size < 8:
        return f"payload entry {info.payload_file!r} ({info.payload_size} bytes) is not valid"
    return None


def _typed(body: dict[str, Any], key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    if key not in body:
        raise KeyError(f"field {key!r} is missing")
    value = body[key]
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"field {key!r} has the wrong type ({value!r})")
    return value


def _canonical_sha(body: Mapping[str, Any]) -> str:
    return sha256_hex((_canonical_json(body).encode(),))
