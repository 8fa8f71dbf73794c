"""An int8-cache graph run as two graphs that share their packed weights: no If per layer.

An int8 KV cache's graph wraps each layer's attention in If(a call brings more than
`float_prefill_above` tokens to some row; float32 form; int8 GroupQueryAttention) (quantize/kv.py). A
decode step takes the int8 branch, and the 30 Ifs cost ~7% of its time (~15 µs each, whatever the
context: onnxruntime sets up the branch's execution on every call). Two graphs, one with each branch
in place of its If, would need no If, but onnxruntime packs weights once per session: two sessions
would hold int4 SmolLM2's ~100 MB of packed weights twice. Its C API shares them between sessions built
with one prepacked-weights container whose weights the caller supplies (`ortc`).

`SplitSession` does that: at load it cuts the bundle's graph into its decode form (the int8 branches)
and its prefill form (the float32 branches), maps the bundle's external data once and hands the same
tensors to both sessions, and runs each call on the form the If would have chosen, so every output is
what the If graph gives (to rounding where a large weight is cut into column slices, below). It
stands in for the InferenceSession a Model holds (the calls a Model makes: get_inputs / get_outputs /
get_providers, run, io_binding / run_with_iobinding), and binds host arrays as they are, so a process
running it never loads onnxruntime's Python binding. The graph is read with protobuf alone
(bundle.outline_class): onnx stays unimported in a serving process. It is the default on the CPU
provider (session.split_wanted).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..bundle import EXTERNAL, outline_class
from . import ortc
from .session import SHRINK_ARENA, SHRINK_FROM

IF_SUFFIX = "/float_prefill"  # the name quantize/kv.py gives each layer's If
DECODE, PREFILL = "else_branch", "then_branch"
CPU = "CPUExecutionProvider"
# the session config key that resolves external data of a graph built from bytes
EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"
STOP_SPINNING = "session.force_spinning_stop"

_TABLE = {  # what cutting the graph reads and edits; every other field is kept as it was
    "ModelProto": [("graph", 7, "GraphProto")],
    "GraphProto": [
        ("node", 1, "NodeProto*"),
        ("initializer", 5, "TensorProto*"),
        ("input", 11, "ValueInfoProto*"),
        ("output", 12, "ValueInfoProto*"),
    ],
    "NodeProto": [
        ("input", 1, "string*"),
        ("output", 2, "string*"),
        ("name", 3, "string"),
        ("op_type", 4, "string"),
        ("attribute", 5, "AttributeProto*"),
    ],
    "AttributeProto": [
        ("name", 1, "string"),
        ("i", 3, "int64"),
        ("g", 6, "GraphProto"),
        ("type", 20, "int32"),
    ],
    "TensorProto": [
        ("dims", 1, "int64*"),
        ("data_type", 2, "int32"),
        ("name", 8, "string"),
        ("external_data", 13, "StringStringEntryProto*"),
        ("data_location", 14, "int32"),
    ],
    "ValueInfoProto": [("name", 1, "string"), ("type", 2, "TypeProto")],
    "TypeProto": [("tensor_type", 1, "TensorTypeProto")],
    "TensorTypeProto": [("elem_type", 1, "int32")],
    "StringStringEntryProto": [("key", 1, "string"), ("value", 2, "string")],
}
_TYPE_NAMES = {
    1: "float",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "double",
    12: "uint32",
    13: "uint64",
    16: "bfloat16",
}


def _model_class():
    return outline_class(_TABLE, "onnxlm.split")


def read_graph(path: str | os.PathLike):
    model = _model_class()()
    model.ParseFromString(Path(path).read_bytes())
    return model


def splits(model) -> bool:
    """Whether the graph has an int8 cache's Ifs to cut."""
    return any(n.op_type == "If" and n.name.endswith(IF_SUFFIX) for n in model.graph.node)


def cut(model, branch: str):
    """A copy of the graph with each layer's If replaced by its `branch` (DECODE or PREFILL): the
    branch's nodes, writing the If's outputs under the If's names, and its constants join the graph;
    nodes left with no reader (the If's condition) go. ValueError if two branches name a value alike
    (it would be written twice)."""
    out = _model_class()()
    out.CopyFrom(model)
    g = out.graph
    nodes, have = [], {t.name for t in g.initializer}
    for n in g.node:
        if n.op_type != "If" or not n.name.endswith(IF_SUFFIX):
            nodes.append(n)
            continue
        body = next(a.g for a in n.attribute if a.name == branch)
        rename = {o.name: outer for o, outer in zip(body.output, n.output, strict=True)}
        for m in body.node:
            copy = type(m)()
            copy.CopyFrom(m)
            for names in (copy.input, copy.output):
                for i, name in enumerate(names):
                    names[i] = rename.get(name, name)
            nodes.append(copy)
        for t in body.initializer:
            if t.name not in have:
                g.initializer.append(t)
                have.add(t.name)
    written = [o for n in nodes for o in n.output if o]
    if len(set(written)) != len(written):
        twice = sorted({o for o in written if written.count(o) > 1})[:3]
        raise ValueError(f"the {branch} form would write {', '.join(twice)} more than once")
    nodes = _slice_large_matmuls(nodes, g)
    needed = {o.name for o in g.output}
    kept = []
    for n in reversed(nodes):  # nodes are in order: a node's readers come after it
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(n.input)
            needed.update(_subgraph_reads(n))
    del g.node[:]
    g.node.extend(reversed(kept))
    keep = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(keep)
    return out


# A weight packed by both sessions is packed twice while the second is built (onnxruntime packs, then
# finds the same bytes in the container and frees its copy): that copy of SmolLM2's tied 8-bit head
# (~35 MB) was the process's peak. A MatMulNBits whose weight is larger than this is cut into column
# slices of about this size, a Concat joining their outputs (the kernel tiles a slice's columns its own
# way: SmolLM2's 8-bit head moves a logit by up to 4e-6, its 4-bit head not at all).
SLICE_BYTES = 4 << 20
_ROWS_OF = (1, 2, 3, 5)  # MatMulNBits inputs with one entry per output column: B, scales, zero points, bias
_ATTR_INT, _ATTR_N = 2, "N"


def _slice_large_matmuls(nodes: list, graph) -> list:
    inits = {t.name: t for t in graph.initializer}
    out = []
    for n in nodes:
        attrs = {a.name: a for a in n.attribute}
        weight = inits.get(n.input[1]) if n.op_type == "MatMulNBits" and len(n.input) > 1 else None
        if weight is None or _external(weight) is None or _ATTR_N not in attrs:
            out.append(n)
            continue
        columns = attrs[_ATTR_N].i
        parts = -(-_external(weight)[2] // SLICE_BYTES)
        step = -(-columns // parts)
        sliced = [inits.get(name) if i in _ROWS_OF else None for i, name in enumerate(n.input)]
        if parts < 2 or not all(t is None or _per_column(t, columns) for t in sliced):
            out.append(n)
            continue
        outputs = []
        for j, first in enumerate(range(0, columns, step)):
            width = min(step, columns - first)
            part = type(n)()
            part.CopyFrom(n)
            part.name = f"{n.name}/columns{j}"
            del part.output[:]
            part.output.append(f"{n.output[0]}/columns{j}")
            next(a for a in part.attribute if a.name == _ATTR_N).i = width
            for i, t in enumerate(sliced):
                if t is not None:
                    piece = _rows(t, columns, first, width, f"{t.name}/columns{j}")
                    graph.initializer.append(piece)
                    part.input[i] = piece.name
            outputs.append(part.output[0])
            out.append(part)
        concat = type(n)()
        concat.name, concat.op_type = f"{n.name}/columns", "Concat"
        concat.input.extend(outputs)
        concat.output.append(n.output[0])
        axis = concat.attribute.add()
        axis.name, axis.i, axis.type = "axis", -1, _ATTR_INT
        out.append(concat)
    return out


def _external(t) -> tuple[str, int, int] | None:
    """(location, offset, length) of an external tensor; None for any other, or one whose length is
    not written (it runs to the end of the file)."""
    info = {e.key: e.value for e in t.external_data}
    if t.data_location != EXTERNAL or "location" not in info or "length" not in info:
        return None
    return info["location"], int(info.get("offset", 0)), int(info["length"])


def _per_column(t, columns: int) -> bool:
    """Whether external tensor `t` leads with `columns` equal runs of bytes (MatMulNBits' B, scales,
    zero points and bias all lead with N), so that a range of columns is a range of its bytes."""
    where = _external(t)
    return where is not None and bool(t.dims) and t.dims[0] % columns == 0 and where[2] % columns == 0


def _rows(t, columns: int, first: int, width: int, name: str):
    """Columns [first, first + width) of a per-column external tensor (its leading dimension, or its
    only one holding `columns` equal runs), as a tensor over the same bytes of the same file."""
    location, offset, length = _external(t)
    row = length // columns
    piece = type(t)()
    piece.CopyFrom(t)
    piece.name = name
    del piece.dims[:]
    piece.dims.extend([t.dims[0] // columns * width, *t.dims[1:]])
    del piece.external_data[:]
    for key, value in (("location", location), ("offset", offset + first * row), ("length", width * row)):
        e = piece.external_data.add()
        e.key, e.value = key, str(value)
    return piece


def _subgraph_reads(node) -> set[str]:
    """Names a node's subgraphs read (a remaining If's branches), over-approximated: all their inputs."""
    names = set()
    for a in node.attribute:
        if a.HasField("g"):
            for m in a.g.node:
                names.update(m.input)
                names.update(_subgraph_reads(m))
    return names


def shared_initializers(models: Sequence[Any], root: Path) -> dict[str, ortc.Value]:
    """The graph's external tensors as values over one read-only mapping of each data file, for both
    sessions to use as they are (the mapping's pages are the page cache's: releasing_mapped_files
    reclaims them as it does onnxruntime's own mappings)."""
    maps: dict[str, np.memmap] = {}
    values = {}
    for t in (t for model in models for t in model.graph.initializer):
        where = _external(t)
        if t.name in values or where is None or t.data_type not in ortc.DTYPES:
            continue  # left to onnxruntime (each session then loads its own)
        location, start, length = where
        if location not in maps:
            maps[location] = np.memmap(root / location, dtype=np.uint8, mode="r")
        dtype = np.dtype(ortc.DTYPES[t.data_type])
        if length != int(np.prod(t.dims, dtype=np.int64)) * dtype.itemsize or start % dtype.itemsize:
            continue  # not a plain tensor of its dims: left to onnxruntime
        array = maps[location][start : start + length].view(dtype).reshape(tuple(t.dims))
        values[t.name] = ortc.Value.of(array)
    return values


class Arg(NamedTuple):
    """A graph input or output as InferenceSession.get_inputs() describes it."""

    name: str
    type: str


class SplitSession:
    """An int8-cache graph as its decode and prefill forms (see the module's doc): a call that brings
    more than `above` tokens to some row (`query_input`) runs the prefill form, any other the decode
    form, unless the caller says the call is part of a prefill longer than that (`prefill=True`: a
    prompt's last short chunk then takes the form its other chunks took). idle_spin: the decode form's threads keep spinning between runs (session_options); the
    prefill form's never do (a prefill is long, and its spinning would slow the decode steps after).
    Its binding takes host arrays as they are (binds_arrays): a process running it needs nothing of
    onnxruntime's Python binding."""

    binds_arrays = True
    takes_prefill = True

    def __init__(
        self,
        model_path: str | os.PathLike,
        above: int,
        query_input: str,
        threads: int,
        idle_spin: bool = True,
    ):
        path = Path(model_path)
        model = read_graph(path)
        if not splits(model):
            raise ValueError(f"{path}: no int8-cache Ifs to split")
        self.above, self.query_input, self.idle_spin = above, query_input, idle_spin
        self._inputs = [_arg(v) for v in model.graph.input]
        self._outputs = [_arg(v) for v in model.graph.output]
        root = path.parent
        decode, prefill = cut(model, DECODE), cut(model, PREFILL)
        self.initializers = shared_initializers((decode, prefill), root)
        self.container = ortc.Container()
        base = {EXTERNAL_FOLDER: str(root)}
        self.decode = ortc.Session(
            decode.SerializeToString(),
            threads,
            self.initializers,
            self.container,
            {**base, **({} if idle_spin else {STOP_SPINNING: "1"})},
        )
        self.prefill = ortc.Session(
            prefill.SerializeToString(),
            threads,
            self.initializers,
            self.container,
            {**base, STOP_SPINNING: "1"},
        )
        # A prefill-form call bringing SHRINK_FROM tokens or more to a row ends by handing its arena's
        # free blocks back (onnxruntime's arena shrinkage). A chunk's float32 attention over a long
        # context allocates tens of MB a call (512 queries x 9 heads x 4,000 keys of scores: 74 MB),
        # which the arena otherwise keeps, growing by powers of two as contexts lengthen: a SmolLM2 int4
        # process held +328 MB over its size after load after prompts of up to 4,000 tokens
        # (benchmarks/README.md). Short calls keep their blocks for the next call (what they hold is
        # small); no arena at all raised a short prefill's peak ~5 MB. The decode form's calls are
        # small and many: its arena stays as it is. A server under load may cut chunks shorter than
        # SHRINK_FROM: the arena then keeps what such chunks used until a long call shrinks it.
        self.shrink = ortc.RunOptions({SHRINK_ARENA: "cpu:0"})

    # --- what a Model asks of its session ----------------------------------------------------
    def get_inputs(self) -> list[Arg]:
        return list(self._inputs)

    def get_outputs(self) -> list[Arg]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [CPU]

    def form(self, query_lens: np.ndarray, prefill: bool = False) -> ortc.Session:
        """The session the If graph's condition would pick for these query lengths (with prefill: the
        prefill form whatever the lengths)."""
        return self.prefill if prefill or int(np.max(query_lens)) > self.above else self.decode

    def run(
        self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray], prefill: bool = False
    ) -> list[np.ndarray]:
        names = [o.name for o in self._outputs] if output_names is None else list(output_names)
        form = self.form(feeds[self.query_input], prefill)
        return form.run(feeds, names, self.options(form, feeds[self.query_input]))

    def options(self, form: ortc.Session, query_lens: np.ndarray) -> ortc.RunOptions | None:
        """The run options of a call on `form` bringing `query_lens` tokens to its rows: arena shrinkage
        for a long prefill-form call (SHRINK_FROM), else none."""
        return self.shrink if form is self.prefill and int(np.max(query_lens)) >= SHRINK_FROM else None

    def io_binding(self) -> SplitBinding:
        return SplitBinding(self)

    def run_with_iobinding(self, binding: SplitBinding, prefill: bool = False) -> None:
        binding.run(prefill)


class SplitBinding:
    """InferenceSession.io_binding()'s calls for a SplitSession: each value is bound in the form that
    runs next, when it runs. A small input whose shape and type hold is copied into the array already
    bound: a decode step binds nothing anew."""

    def __init__(self, session: SplitSession):
        self.session = session
        # per form: its binding, and the (name, output) keys bound since it last ran
        self.forms = {s: (ortc.Binding(s), set()) for s in (session.decode, session.prefill)}
        self.values: dict[tuple[str, bool], ortc.Value] = {}
        self.small: dict[str, np.ndarray] = {}  # the host arrays bind_cpu_input copies into
        self.query: np.ndarray | None = None

    def _set(self, key: tuple[str, bool], value: ortc.Value) -> None:
        self.values[key] = value
        for _, stale in self.forms.values():
            stale.add(key)

    def bind_cpu_input(self, name: str, array: np.ndarray) -> None:
        array = np.asarray(array)
        own = self.small.get(name)
        if own is not None and own.shape == array.shape and own.dtype == array.dtype:
            np.copyto(own, array)  # already bound, in both forms
        else:
            own = self.small[name] = np.array(array, order="C", copy=True)
            self._set((name, False), ortc.Value.of(own))
        if name == self.session.query_input:
            self.query = own

    def bind_ortvalue_input(self, name: str, value: Any) -> None:
        self.small.pop(name, None)
        self._set((name, False), _wrap(value))

    def bind_ortvalue_output(self, name: str, value: Any) -> None:
        self._set((name, True), _wrap(value))

    def run(self, prefill: bool = False) -> None:
        if self.query is None:
            raise ValueError(f"SplitBinding.run: {self.session.query_input!r} was never bound")
        form = self.session.form(self.query, prefill)
        binding, stale = self.forms[form]
        for key in stale:
            binding.bind(key[0], self.values[key], output=key[1])
        stale.clear()
        binding.run(self.session.options(form, self.query))


def _wrap(value: Any) -> ortc.Value:
    """An onnxruntime OrtValue in host memory (or a numpy array) as a C API value over the same memory."""
    if isinstance(value, np.ndarray):
        return ortc.Value.of(np.ascontiguousarray(value))
    if value.device_name().lower() != "cpu":
        raise ValueError("a SplitSession binds host memory only")
    return ortc.Value(value.data_ptr(), value.shape(), ortc.DTYPES[value.element_type()], value)


def _arg(info) -> Arg:
    elem = info.type.tensor_type.elem_type
    return Arg(info.name, f"tensor({_TYPE_NAMES.get(elem, 'undefined')})")
