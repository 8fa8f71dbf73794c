"""The bundle: a folder every stage reads and writes, described completely by its manifest.

    model.onnx        the graph, weights in external data
    model.onnx.data   the weights (one file, tied weights stored once)
    tokenizer.json    a `tokenizers` tokenizer
    onnxlm.json       this manifest (written last)

Nothing here imports torch, transformers or onnxruntime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "onnxlm-bundle"
FORMAT_VERSION = 1
MANIFEST = "onnxlm.json"
MODEL = "model.onnx"
MODEL_DATA = "model.onnx.data"
TOKENIZER = "tokenizer.json"
# In a folder that holds a bundle still being made (quantize's staging folder): never load it as one
STAGING_MARK = ".onnxlm-staging"


class BundleError(Exception):
    """A bundle that cannot be used; the message names the file and the problem."""


@dataclass
class ModelFacts:
    """Architecture facts the runtime needs; written by the exporter, never guessed."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    add_bos_token: bool = False


KV_CONCAT = (
    "concat"  # past (batch, kv_heads, past, head_dim) in, present (past + seq) out: a new tensor each step
)
KV_SHARED = (
    "shared_buffer"  # one (batch, kv_heads, capacity, head_dim) buffer per layer, bound as past and present
)
_LEGACY_KV_LAYOUT = "batch,kv_heads,seq,head_dim"  # manifests before shared buffers: the concat layout


@dataclass
class GraphIO:
    """Names and layout of the graph's inputs and outputs: declared once, used by export and runtime.

    KV tensors are (batch, kv_heads, seq, head_dim); `{i}` in a template is the layer index. A field set
    to None is an input the graph does not have. `kv_layout` says how the runtime drives the cache:

    concat         input_ids, attention_mask (batch, past + seq), [position_ids]; left padding;
                   present = past + this step's positions; logits (batch, seq, vocab)
    shared_buffer  input_ids (batch, seq) right-padded; seqlens_k (batch,) int32 = tokens held after
                   the step - 1; total_sequence_length () int32 >= every row's tokens after the step;
                   query_seqlens (batch,) int32 = real tokens of this chunk per row (0: idle row);
                   logits_index (batch, n) int64 = chunk positions whose logits come out, as
                   logits (batch, n, vocab); past and present are one buffer per layer whose capacity
                   the runtime chooses (at most context_length), updated in place
    """

    input_ids: str = "input_ids"
    attention_mask: str | None = "attention_mask"
    position_ids: str | None = "position_ids"
    seqlens_k: str | None = None
    total_sequence_length: str | None = None
    query_seqlens: str | None = None
    logits_index: str | None = None
    logits: str = "logits"
    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    present_key: str = "present.{i}.key"
    present_value: str = "present.{i}.value"
    kv_layout: str = KV_CONCAT
    kv_dtype: str = "float32"
    logits_dtype: str = "float32"
    graph: str = "plain"  # how the exporter built it: "plain" ONNX ops or "fused" onnxruntime contrib ops
    # fused only: from this many tokens held, a decode step (one token per row) computes attention with
    # MatMul / Softmax over the buffer instead of GroupQueryAttention (an If per layer; same IO). None: never
    long_decode_from: int | None = None
    # int8 cache only: a call that brings more than this many tokens to some row (a prefill chunk) takes
    # the float32 attention form, fewer (decode steps, verifies) the int8 node (an If per layer). None:
    # no such switch, or a bundle quantized before it was recorded (then 16)
    float_prefill_above: int | None = None
    # longrope (phi3): a row holding more than `long_rope_after` tokens rotates with the long factors,
    # which the runtime says per row in the `long_rope` input ((batch,) int64, 1: long). The keys a row
    # cached before were rotated with the short ones, so at the call that takes it past that length the
    # runtime runs the row's whole sequence again from position 0 (as transformers' generate does)
    long_rope: str | None = None
    long_rope_after: int | None = None
    # dynamic NTK rope: a call whose rows hold more than this many tokens rotates all its tokens with the
    # scaling of its longest row (transformers' semantic), so a several-token call there computes
    # differently from one token a call: speculation drafts only while every row stays within it
    dynamic_rope_from: int | None = None

    def __post_init__(self):
        if self.kv_layout == _LEGACY_KV_LAYOUT:
            self.kv_layout = KV_CONCAT
        if self.kv_layout not in (KV_CONCAT, KV_SHARED):
            raise ValueError(
                f"unknown kv_layout {self.kv_layout!r}; this onnxlm knows {KV_CONCAT}, {KV_SHARED}"
            )
        needs = (
            ("seqlens_k", "total_sequence_length", "query_seqlens", "logits_index")
            if self.kv_layout == KV_SHARED
            else ("attention_mask",)
        )
        missing = [n for n in needs if not getattr(self, n)]
        if missing:
            raise ValueError(f"kv_layout {self.kv_layout} needs the input(s) {', '.join(missing)}")
        if (self.long_rope is None) != (self.long_rope_after is None):
            raise ValueError(
                "long_rope and long_rope_after go together (the input and the length it switches at)"
            )

    @classmethod
    def shared_buffer(cls, graph: str = "fused") -> GraphIO:
        """The IO of a graph whose attention updates one preallocated KV buffer per layer in place."""
        return cls(
            attention_mask=None,
            position_ids=None,
            seqlens_k="seqlens_k",
            total_sequence_length="total_sequence_length",
            query_seqlens="query_seqlens",
            logits_index="logits_index",
            kv_layout=KV_SHARED,
            graph=graph,
        )

    @property
    def shared(self) -> bool:
        return self.kv_layout == KV_SHARED

    def step_inputs(self) -> list[str]:
        """The inputs other than input_ids and the KV tensors, in the graph's order."""
        names = (
            self.attention_mask,
            self.position_ids,
            self.seqlens_k,
            self.total_sequence_length,
            self.query_seqlens,
            self.logits_index,
        )
        return [n for n in names if n]

    def input_names(self, num_layers: int) -> list[str]:
        names = [self.input_ids, *self.step_inputs()]
        for i in range(num_layers):
            names += [self.past_key.format(i=i), self.past_value.format(i=i)]
        return names + ([self.long_rope] if self.long_rope else [])  # a keyword of the module's forward

    def output_names(self, num_layers: int) -> list[str]:
        names = [self.logits]
        for i in range(num_layers):
            names += [self.present_key.format(i=i), self.present_value.format(i=i)]
        return names

    def dynamic_axes(self, num_layers: int) -> dict[str, dict[int, str]]:
        """Symbolic axes of every input and output (the ONNX exporter's `dynamic_axes`)."""
        axes: dict[str, dict[int, str]] = {
            self.input_ids: {0: "batch", 1: "seq"},
            self.logits: {0: "batch", 1: "logits_seq" if self.logits_index else "seq"},
        }
        if self.attention_mask:
            axes[self.attention_mask] = {0: "batch", 1: "total_seq"}
        if self.position_ids:
            axes[self.position_ids] = {0: "batch", 1: "seq"}
        for name in (self.seqlens_k, self.query_seqlens, self.long_rope):
            if name:
                axes[name] = {0: "batch"}
        if self.logits_index:
            axes[self.logits_index] = {0: "batch", 1: "logits_seq"}
        past_seq, present_seq = ("capacity", "capacity") if self.shared else ("past_seq", "total_seq")
        for i in range(num_layers):
            for t in (self.past_key, self.past_value):
                axes[t.format(i=i)] = {0: "batch", 2: past_seq}
            for t in (self.present_key, self.present_value):
                axes[t.format(i=i)] = {0: "batch", 2: present_seq}
        return axes


@dataclass
class Manifest:
    model: ModelFacts
    io: GraphIO = field(default_factory=GraphIO)
    dtype: str = "float32"
    quantization: dict[str, Any] | None = None
    chat_template: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | str = MANIFEST) -> Manifest:
        d = dict(d)
        try:
            d["model"] = ModelFacts(**d["model"])
            d["io"] = GraphIO(**d.get("io", {}))
            return cls(**d)
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{path}: malformed manifest ({e})") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


MAX_MANIFEST_BYTES = 64 * 2**20  # a manifest with a large quantization record is well under 1 MB


def manifest_schema() -> dict[str, Any]:
    """The JSON Schema every manifest is validated against (onnxlm/data/manifest.schema.json)."""
    global _SCHEMA
    if _SCHEMA is None:
        from importlib.resources import files

        _SCHEMA = json.loads((files("onnxlm") / "data" / "manifest.schema.json").read_text("utf-8"))
    return _SCHEMA


_SCHEMA: dict[str, Any] | None = None


def _field(path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif out and part.replace("_", "").isalnum():
            out += f".{part}"
        else:
            out += part if not out else f"[{part!r}]"
    return out or "(the top level)"


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


_validator = None


def _manifest_validator():
    """The schema compiled once (fastjsonschema)."""
    global _validator
    if _validator is None:
        import fastjsonschema

        _validator = fastjsonschema.compile(manifest_schema())
    return _validator


def _where(raw: Any, name: str | None) -> list:
    """The path (keys and indices) of fastjsonschema's dotted name ("data.files.model.onnx",
    "data.model.eos_token_ids[0]") in the document `raw`: a key holding a dot is found by trying the
    longest run of parts that is a key at each level."""
    parts = (name or "data").replace("[", ".[").split(".")[1:]  # after "data", the document's root
    out, node, i = [], raw, 0
    while i < len(parts):
        if parts[i].startswith("[") and parts[i].endswith("]") and parts[i][1:-1].isdigit():
            out.append(int(parts[i][1:-1]))
            node = node[out[-1]] if isinstance(node, list) and out[-1] < len(node) else None
            i += 1
            continue
        for j in range(len(parts), i, -1):
            key = ".".join(parts[i:j])
            if isinstance(node, dict) and key in node:
                break
        else:  # not in the document (a missing key): the rest as one name
            key, j = ".".join(parts[i:]), len(parts)
        out.append(key)
        node = node.get(key) if isinstance(node, dict) else None
        i = j
    return out


def validate_manifest(raw: Any, path: Path | str) -> None:
    """Check a parsed manifest against the schema and the facts that tie fields together; the first
    violation is a one-line BundleError naming the file and the field."""
    import fastjsonschema

    try:
        _manifest_validator()(raw)
    except fastjsonschema.JsonSchemaValueException as e:
        message = e.message
        if e.name and message.startswith(e.name + " "):  # "data.model.x must be ..." -> "must be ..."
            message = message[len(e.name) + 1 :]
        raise BundleError(f"{path}: field {_field(_where(raw, e.name))}: {_short(message)}") from None
    facts = raw["model"]
    ids = [
        ("model.bos_token_id", facts.get("bos_token_id")),
        ("model.pad_token_id", facts.get("pad_token_id")),
    ]
    ids += [(f"model.eos_token_ids[{i}]", t) for i, t in enumerate(facts.get("eos_token_ids", []))]
    for name, token in ids:
        if token is not None and token >= facts["vocab_size"]:
            raise BundleError(
                f"{path}: field {name}: token {token} is outside the vocabulary of {facts['vocab_size']}"
            )
    if facts["num_heads"] % facts["num_kv_heads"]:
        raise BundleError(
            f"{path}: field model.num_kv_heads: {facts['num_kv_heads']} does not divide num_heads "
            f"{facts['num_heads']}"
        )


def read_manifest(bundle_dir: str | os.PathLike, staging_ok: bool = False) -> Manifest:
    """The bundle's validated manifest. A folder marked as staging (a bundle still being made) is refused
    unless `staging_ok` (for the process making it)."""
    path = Path(bundle_dir) / MANIFEST
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"{bundle_dir}: not a bundle folder (it does not exist or is not a folder)")
    if not path.is_file():
        raise BundleError(f"{path}: missing; this folder is not a complete onnxlm bundle")
    if not staging_ok and (Path(bundle_dir) / STAGING_MARK).exists():
        raise BundleError(
            f"{bundle_dir}: an unfinished bundle (a quantize run's staging folder); it is not loaded"
        )
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(
            f"{path}: {path.stat().st_size} bytes, over the {MAX_MANIFEST_BYTES >> 20} MB a manifest may have"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise BundleError(f"{path}: not a manifest (JSON nested too deeply to read)") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(f"{path}: not an onnxlm manifest (format is not {FORMAT!r})")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: unknown format version {version!r}; this onnxlm reads version {FORMAT_VERSION}"
        )
    try:
        validate_manifest(raw, path)
    except RecursionError:
        raise BundleError(f"{path}: not a manifest (nested too deeply to check)") from None
    return Manifest.from_dict(raw, path)


def _inside(root: Path, location: str, owner: Path, what: str) -> Path:
    """Resolve a path `owner` names (an external-data location, a manifest entry), refusing any that
    leaves the bundle; errors name `owner`, the file that holds the bad path."""
    if os.path.isabs(location) or location.startswith(("/", "\\")):
        raise BundleError(f"{owner}: {what} {location!r} is an absolute path")
    target = root / location
    if target.is_symlink():
        raise BundleError(f"{owner}: {what} {location!r} is a symbolic link")
    resolved = target.resolve()
    if resolved.parent != root.resolve() and root.resolve() not in resolved.parents:
        raise BundleError(f"{owner}: {what} {location!r} leaves the bundle")
    return resolved


def load_graph(model_path: Path):
    """The graph's ModelProto without its weights."""
    import onnx

    try:
        return onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, ValueError, ... on damaged files
        raise BundleError(f"{model_path}: not a readable ONNX model ({type(e).__name__}: {e})") from None


# The part of onnx.proto that checking a bundle reads: the graph's inputs, outputs and initializers,
# and every tensor's external-data entries (subgraphs, sparse tensors and functions included). Field
# numbers are onnx's (tests/test_bundle.py compares them with onnx's own descriptor); the parser keeps
# every other field as unknown bytes. Loading a bundle reads the graph with this and protobuf alone:
# importing onnx costs ~17 MB of resident memory that a serving process would hold for nothing.
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_OUTLINE = {  # message: (field, number, type: a message of this table, "string" or "int32"), "*": repeated
    "ModelProto": [("graph", 7, "GraphProto"), ("functions", 25, "FunctionProto*")],
    "GraphProto": [
        ("node", 1, "NodeProto*"),
        ("initializer", 5, "TensorProto*"),
        ("sparse_initializer", 15, "SparseTensorProto*"),
        ("input", 11, "ValueInfoProto*"),
        ("output", 12, "ValueInfoProto*"),
    ],
    "FunctionProto": [("node", 7, "NodeProto*")],
    "NodeProto": [("attribute", 5, "AttributeProto*")],
    "AttributeProto": [
        ("t", 5, "TensorProto"),
        ("g", 6, "GraphProto"),
        ("tensors", 10, "TensorProto*"),
        ("graphs", 11, "GraphProto*"),
        ("sparse_tensor", 22, "SparseTensorProto"),
        ("sparse_tensors", 23, "SparseTensorProto*"),
    ],
    "TensorProto": [
        ("name", 8, "string"),
        ("external_data", 13, "StringStringEntryProto*"),
        ("data_location", 14, "int32"),
    ],
    "SparseTensorProto": [("values", 1, "TensorProto"), ("indices", 2, "TensorProto")],
    "ValueInfoProto": [("name", 1, "string")],
    "StringStringEntryProto": [("key", 1, "string"), ("value", 2, "string")],
}
_outline_classes: dict[str, Any] = {}


def outline_class(table: dict[str, list[tuple[str, int, str]]], package: str):
    """The ModelProto class of a subset of onnx.proto given as `table` (message: [(field, number,
    type)], types "string", "int32", "int64" or a message of the table, "*" for repeated), built once
    per `package` from a descriptor made here. Fields outside the subset are kept as unknown bytes
    and written back as they were."""
    if package not in _outline_classes:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        F = descriptor_pb2.FieldDescriptorProto
        scalars = {"string": F.TYPE_STRING, "int32": F.TYPE_INT32, "int64": F.TYPE_INT64}
        fd = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package, syntax="proto2")
        for message, fields in table.items():
            m = fd.message_type.add(name=message)
            for name, number, kind in fields:
                f = m.field.add(name=name, number=number)
                f.label = F.LABEL_REPEATED if kind.endswith("*") else F.LABEL_OPTIONAL
                kind = kind.rstrip("*")
                if kind in scalars:
                    f.type = scalars[kind]
                else:
                    f.type, f.type_name = F.TYPE_MESSAGE, f".{package}.{kind}"
        pool = descriptor_pool.DescriptorPool()
        pool.Add(fd)
        _outline_classes[package] = message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"{package}.ModelProto")
        )
    return _outline_classes[package]


def _outline_model_class():
    """The ModelProto class of the subset above."""
    return outline_class(_OUTLINE, "onnxlm.outline")


def load_graph_outline(model_path: Path):
    """What checking a bundle reads of its graph (the subset above), parsed without onnx; the same
    field names as onnx's ModelProto, so external_locations and check_graph_io take either."""
    model = _outline_model_class()()
    try:
        model.ParseFromString(Path(model_path).read_bytes())
    except Exception as e:  # protobuf raises DecodeError on damaged files
        raise BundleError(f"{model_path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    return model


def _graph_tensors(graph) -> Iterator[Any]:
    """Every tensor a graph holds, subgraphs (If / Loop / Scan bodies) included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node) -> Iterator[Any]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
        for sparse in attr.sparse_tensors:
            yield from (sparse.values, sparse.indices)
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for g in attr.graphs:
            yield from _graph_tensors(g)


def external_tensors(model) -> list[Any]:
    """The model's tensors stored as external data, in any subgraph or function."""
    tensors = list(_graph_tensors(model.graph))
    for function in model.functions:
        for node in function.node:
            tensors += _node_tensors(node)
    return [t for t in tensors if t.data_location == EXTERNAL]


def external_locations(model) -> set[str]:
    """Every external-data location the model names (read without loading the weights); `model` is a
    ModelProto (onnx's or the outline's) or the path of one, read as the outline (no onnx import)."""
    if isinstance(model, (str, os.PathLike)):
        model = load_graph_outline(Path(model))
    return {e.value for t in external_tensors(model) for e in t.external_data if e.key == "location"}


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _graph_layers(inputs: list[str], io: GraphIO) -> int:
    """How many layers' past keys the graph takes (0, 1, 2, ... with none skipped)."""
    names, n = set(inputs), 0
    while io.past_key.format(i=n) in names:
        n += 1
    return n


def check_graph_io(model, manifest: Manifest, model_path: Path, manifest_path: Path) -> None:
    """The graph's inputs and outputs are exactly the ones the manifest's IO and layer count name."""
    n = manifest.model.num_layers
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    outputs = [o.name for o in model.graph.output]
    for kind, got, want in (
        ("inputs", inputs, manifest.io.input_names(n)),
        ("outputs", outputs, manifest.io.output_names(n)),
    ):
        missing = [x for x in want if x not in set(got)]
        extra = [x for x in got if x not in set(want)]
        if missing or extra:
            problems = ([f"lacks {_names(missing)}"] if missing else []) + (
                [f"also has {_names(extra)}"] if extra else []
            )
            raise BundleError(
                f"{model_path}: the graph's {kind} do not match {manifest_path.name} (which says {n} "
                f"layers; the graph takes KV for {_graph_layers(inputs, manifest.io)}): it "
                + " and ".join(problems)
            )


def check_bundle(
    bundle_dir: str | os.PathLike, verify_hashes: bool = False, staging_ok: bool = False
) -> Manifest:
    """Read and validate the manifest, check every file it lists (present, right size, optionally right
    hash), every external-data location the graph names (subgraphs included), and that the graph's
    inputs and outputs are the ones the manifest describes."""
    root = Path(bundle_dir)
    manifest = read_manifest(root, staging_ok)
    mpath = root / MANIFEST
    for name in (MODEL, TOKENIZER):
        if name not in manifest.files:
            raise BundleError(f"{mpath}: lists no {name}")
    for name, meta in manifest.files.items():
        path = _inside(root, name, mpath, "the listed file")
        if not path.is_file():
            raise BundleError(f"{root / name}: missing (the manifest lists it)")
        size = path.stat().st_size
        if size != meta["size"]:
            raise BundleError(
                f"{root / name}: {size} bytes, the manifest says {meta['size']} (truncated or replaced)"
            )
        if verify_hashes and sha256_file(path) != meta["sha256"]:
            raise BundleError(f"{root / name}: sha256 differs from the manifest (corrupt or replaced)")
    model = load_graph_outline(root / MODEL)
    for location in sorted(external_locations(model)):
        path = _inside(root, location, root / MODEL, "external data")
        if not path.is_file():
            raise BundleError(f"{root / MODEL}: external data {location!r} is missing")
        if location not in manifest.files:
            raise BundleError(f"{root / MODEL}: external data {location!r} is not listed in the manifest")
    check_graph_io(model, manifest, root / MODEL, mpath)
    return manifest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_graph(model, folder: Path) -> None:
    """Write an onnx ModelProto as the bundle's model.onnx, every weight in the one model.onnx.data."""
    import onnx

    onnx.save_model(
        model,
        str(Path(folder) / MODEL),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=MODEL_DATA,
        size_threshold=1024,
        convert_attribute=False,
    )


def copy_side_files(manifest: Manifest, src: Path, dst: Path) -> None:
    """Copy what a bundle carries beside its graph (the tokenizer, ...) into a bundle being written."""
    for name in manifest.files:
        if name not in (MODEL, MODEL_DATA):
            shutil.copyfile(Path(src) / name, Path(dst) / name)


def swap_in(new: Path, out: Path) -> None:
    """Move the complete folder `new` to `out`; an `out` already there is renamed aside first and removed
    only once `new` is in its place, so a crash leaves the old bundle or the new one, never neither."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        try:
            os.rename(new, out)
        except OSError:
            os.rename(old, out)  # put the old bundle back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, out)
    _fsync_dir(out.parent)


def finish_staging(folder: Path) -> None:
    """Clear a staging folder's mark once its bundle has passed every check (it loads from then on)."""
    (folder / STAGING_MARK).unlink(missing_ok=True)
    _fsync_dir(folder)


def load_weights(model, root: Path) -> None:
    """Read every external tensor of `model` (subgraphs included) from the bundle at `root` into the
    proto. onnx's own loader refuses a data file with more than one hard link; here the bundle's checks
    (inside the folder, not a link, listed with its size and hash) vouch for the file instead."""
    import onnx

    handles: dict[Path, Any] = {}
    try:
        for t in external_tensors(model):
            info = {e.key: e.value for e in t.external_data}
            path = _inside(root, info.get("location", ""), root / MODEL, "external data")
            f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
            f.seek(int(info.get("offset", 0)))
            data = f.read(int(info["length"])) if "length" in info else f.read()
            if "length" in info and len(data) != int(info["length"]):
                raise BundleError(f"{root / MODEL}: tensor {t.name!r} runs past the end of {path.name}")
            t.raw_data = data
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    finally:
        for f in handles.values():
            f.close()


class BundleWriter:
    """Write a bundle atomically: files go into a temporary folder beside the target,
    the manifest is written last, everything is fsynced, then the folder is renamed into place.

        with BundleWriter(out) as tmp:
            ...write files into tmp...
            writer.commit(manifest)
    """

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False, staging: bool = False):
        self.out = Path(out_dir).absolute()
        self.overwrite = overwrite
        self.staging = staging  # mark the result unfinished (see finish_staging): it will not load
        if self.out.exists() and not overwrite:
            raise BundleError(f"{self.out}: already exists (pass overwrite to replace it)")
        if self.out.exists() and not (self.out / MANIFEST).is_file() and any(self.out.iterdir()):
            raise BundleError(f"{self.out}: exists and is not a bundle; refusing to replace it")
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".partial", dir=self.out.parent))
        if self.staging:
            (self.tmp / STAGING_MARK).write_text("a bundle still being made; not to be loaded\n")
        return self.tmp

    def commit(self, manifest: Manifest) -> Path:
        assert self.tmp is not None
        manifest.files = {}
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it private; a bundle is ordinary files
        for path in sorted(self.tmp.iterdir()):
            if path.name in (MANIFEST, STAGING_MARK) or not path.is_file():
                continue
            os.chmod(path, 0o666 & ~umask)
            manifest.files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        mpath = self.tmp / MANIFEST
        with open(mpath, "w", encoding="utf-8") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(mpath, 0o666 & ~umask)
        _fsync_dir(self.tmp)
        swap_in(self.tmp, self.out)
        self.tmp = None
        return self.out

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:  # not committed: leave nothing behind
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
