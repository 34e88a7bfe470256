"""The whole-transformer graph, assembled from the per-block stage graphs and written block by block.

`stitch_transformer` takes the exported (cleaned) `transformer_embed`, `transformer_block_plain`,
`transformer_block_skip` and `transformer_unembed` graphs and builds the graph of the whole model:

    embed -> Reshape to [B, T, S, D] -> block 0 .. block N-1 (long skips as in RuyiTransformer3D.run_blocks)
          -> Reshape to [B, T, hp, wp, D] -> unembed

Each block is a renamed copy of its block graph whose weight inputs become initializers named by the
checkpoint key (`blocks.7.attn1.to_q.weight`, checkpoint layout), streamed into one external
`<name>.onnx.data` file one tensor at a time from a `ModelSource`. The transformer is therefore never
in memory at once (peak host memory: the stage graphs plus one tensor), and every block weight keeps
its checkpoint name, which is what TensorRT's refitter sees. Block-graph constants are shared by all
copies of a block type. The inputs and outputs are the whole-model `ExportSpec`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..deps import require
from ..models.transformer import TransformerConfig
from .specs import ExportSpec

log = logging.getLogger(__name__)

DATA_ALIGNMENT = 4096  # external tensors start on page boundaries (memory-mapped by ONNX Runtime and TensorRT)
STAGES = ("transformer_embed", "transformer_block_plain", "transformer_block_skip", "transformer_unembed")
_DATA_INPUTS = ("tokens", "temb", "text_states", "clip_states", "rope_cos", "rope_sin", "skip")


def stitch_transformer(stage_files: dict[str, Path], spec: ExportSpec, config: TransformerConfig,
                       tensor: Callable[[str, torch.dtype], torch.Tensor], path: Path, progress: bool = True) -> Path:  # fmt: skip
    """Write the whole-transformer graph `path` (+ `path.name + '.data'`) from the stage graphs; returns the data file.

    `tensor(key, dtype)` returns checkpoint tensor `key` in `dtype` (ModelSource.transformer_tensor)."""
    onnx = require("onnx", "ONNX export")
    embed, plain, skip, unembed = (onnx.load(str(stage_files[name])) for name in STAGES)
    builder = _Builder(onnx)
    embed_out = builder.add(embed.graph, "embed", {name: name for name in spec.input_names})
    flat_shape = builder.constant("stitch/flat_shape", [0, 0, -1, config.inner_dim])
    current = builder.node("Reshape", [embed_out["tokens"], flat_shape], "stitch/tokens_flat")
    shared = {"temb": embed_out["temb"], "text_states": embed_out["text_states"],
              "clip_states": embed_out["clip_states"], "rope_cos": "rope_cos", "rope_sin": "rope_sin"}  # fmt: skip
    sources, kept = config.skip_sources, {}
    data_file = path.with_name(path.name + ".data")
    with open(data_file, "wb") as handle:
        writer = _DataWriter(handle, data_file.name)
        for i in tqdm(range(config.num_layers), desc="stitch transformer", unit="block", disable=not progress):
            block, kind = (skip, "block_skip") if i in sources else (plain, "block_plain")
            mapping = {"tokens": current, **shared}
            if i in sources:
                mapping["skip"] = kept.pop(sources[i])
            for value in block.graph.input:
                if value.name in _DATA_INPUTS:
                    continue
                key = f"blocks.{i}.{value.name}"
                dtype = _torch_dtype(onnx, value.type.tensor_type.elem_type)
                builder.initializers.append(writer.add(onnx, key, tensor(key, dtype)))
                mapping[value.name] = key
            current = builder.add(block.graph, f"blocks.{i}", mapping, shared_prefix=kind)["tokens_out"]
            if i in sources.values():
                kept[i] = current
    grid = builder.node("Shape", [embed_out["tokens"]], "stitch/grid_shape")
    tokens = builder.node("Reshape", [current, grid], "stitch/tokens_grid")
    out = builder.add(unembed.graph, "unembed", {"tokens": tokens, "temb": embed_out["temb"]})
    inputs = {v.name: v for v in list(embed.graph.input) + list(plain.graph.input)}
    builder.rename_outputs(out, spec.output_names)
    graph = onnx.helper.make_graph(
        builder.nodes, "transformer", [inputs[name] for name in spec.input_names],
        [v for v in unembed.graph.output], initializer=builder.initializers,
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=_opsets(onnx, (embed, plain, skip, unembed)),
                                   ir_version=max(m.ir_version for m in (embed, plain, skip, unembed)))  # fmt: skip
    onnx.save_model(model, str(path))
    log.info("stitched %s: %d nodes, %.2f GB of block weights in %s", path.name, len(builder.nodes),
             data_file.stat().st_size / 1e9, data_file.name)  # fmt: skip
    return data_file


class _Builder:
    """Accumulates renamed copies of graphs into one node and initializer list."""

    def __init__(self, onnx) -> None:
        self.onnx = onnx
        self.nodes: list = []
        self.initializers: list = []
        self.shared: set[str] = set()

    def constant(self, name: str, values: list[int]) -> str:
        self.initializers.append(self.onnx.helper.make_tensor(name, self.onnx.TensorProto.INT64, [len(values)], values))
        return name

    def node(self, op_type: str, inputs: list[str], name: str) -> str:
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [name], name=name))
        return name

    def add(self, graph, prefix: str, mapping: dict[str, str], shared_prefix: str | None = None) -> dict[str, str]:
        """Append `graph`'s nodes with every value renamed: inputs by `mapping`, initializers to
        `shared_prefix/name` (added once per graph type) or `prefix/name`, the rest to `prefix/name`;
        returns {graph output name: its new name}."""
        names = dict(mapping)
        for init in graph.initializer:
            if init.name in names:
                continue
            new = f"{shared_prefix or prefix}/{init.name}"
            names[init.name] = new
            if new not in self.shared:
                self.shared.add(new)
                copy = self.onnx.TensorProto()
                copy.CopyFrom(init)
                copy.name = new
                self.initializers.append(copy)
        rename = lambda name: names.get(name, f"{prefix}/{name}") if name else name
        for node in graph.node:
            copy = self.onnx.NodeProto()
            copy.CopyFrom(node)
            _rename_node(copy, rename, prefix)
            self.nodes.append(copy)
        return {value.name: rename(value.name) for value in graph.output}

    def rename_outputs(self, produced: dict[str, str], wanted: list[str]) -> None:
        """Give the last graph's outputs their public names (the producing nodes write them directly)."""
        renames = {produced[name]: name for name in wanted}
        for node in self.nodes:
            for i, name in enumerate(node.output):
                if name in renames:
                    node.output[i] = renames[name]


def _rename_node(node, rename: Callable[[str], str], prefix: str) -> None:
    node.name = f"{prefix}/{node.name}" if node.name else ""
    for i, name in enumerate(node.input):
        node.input[i] = rename(name)
    for i, name in enumerate(node.output):
        node.output[i] = rename(name)
    for attr in node.attribute:  # If/Loop/Scan bodies: their own values and outer-scope reads alike
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for value in list(sub.input) + list(sub.output):
                value.name = rename(value.name)
            for init in sub.initializer:
                init.name = rename(init.name)
            for inner in sub.node:
                _rename_node(inner, rename, prefix)


class _DataWriter:
    """Appends tensors to one external-data file and returns their TensorProtos pointing into it."""

    def __init__(self, handle, location: str) -> None:
        self.handle, self.location, self.offset = handle, location, 0

    def add(self, onnx, name: str, tensor: torch.Tensor):
        pad = -self.offset % DATA_ALIGNMENT
        self.handle.write(bytes(pad))
        self.offset += pad
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.handle.write(memoryview(data))
        proto = onnx.TensorProto(name=name, data_type=_onnx_dtype(onnx, tensor.dtype), dims=list(tensor.shape))
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", self.offset), ("length", data.nbytes)):
            entry = proto.external_data.add()
            entry.key, entry.value = key, str(value)
        self.offset += data.nbytes
        return proto


_DTYPES = (("FLOAT", torch.float32), ("FLOAT16", torch.float16), ("BFLOAT16", torch.bfloat16), ("INT64", torch.int64))


def _torch_dtype(onnx, elem_type: int) -> torch.dtype:
    for name, dtype in _DTYPES:
        if getattr(onnx.TensorProto, name) == elem_type:
            return dtype
    raise ValueError(f"block weight input of ONNX type {onnx.TensorProto.DataType.Name(elem_type)} is not supported")


def _onnx_dtype(onnx, dtype: torch.dtype) -> int:
    return next(getattr(onnx.TensorProto, name) for name, torch_type in _DTYPES if torch_type == dtype)


def _opsets(onnx, models) -> list:
    versions: dict[str, int] = {}
    for model in models:
        for entry in model.opset_import:
            versions[entry.domain] = max(versions.get(entry.domain, 0), entry.version)
    return [onnx.helper.make_opsetid(domain, version) for domain, version in sorted(versions.items())]
