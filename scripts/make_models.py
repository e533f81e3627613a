#!/usr/bin/env python3
"""Make the benchmark's test models offline, deterministically, into OUT_DIR.

    pip install onnx numpy
    python3 scripts/make_models.py OUT_DIR [--seed 7]

Writes:
  resnet50.onnx    ResNet-50 (25.5 M parameters, 1x3x224x224 input), the graph of the `onnx`
                   package's `light_resnet50` test model with seeded random weights.
  squeezenet.onnx  SqueezeNet 1.0 (1.2 M parameters, 1x3x224x224), `light_squeezenet`, same.
  mlp.onnx         A 4-layer MLP (1x1024 -> 3 x 2048 -> 1000, 12.6 M parameters), built here.

The `light` models in onnx/backend/test/data/light/ ship the real graphs with their weights
replaced by ConstantOfShape nodes (every weight 0.02) and, for some, weights declared as
graph inputs. This script turns each such weight into an initializer of seeded random
values, scaled so activations stay in range over 50 layers (He-normal convolutions,
batch-norm scales near 1 and variances near 1), and keeps the image as the only input.
Nothing is downloaded; the same seed always gives the same bytes.
"""

import argparse
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def random_weight(name, shape, rng):
    """Seeded values for one weight, by its role (read from its name and rank)."""
    shape = [int(d) for d in shape]
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if len(shape) == 4:  # convolution kernel
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    if len(shape) == 2:  # fully connected
        return rng.normal(0.0, np.sqrt(1.0 / shape[-1]), shape)
    if name.endswith(("_bn_s_0", "_bn_riv_0")) or "_riv" in name:  # scale, variance
        return rng.uniform(0.5, 1.5, shape)
    return rng.normal(0.0, 0.05, shape)  # biases, means


def seed_light_model(name, seed):
    """A `light` model with seeded random weights as initializers."""
    model = onnx.load(os.path.join(LIGHT, f"light_{name}.onnx"))
    graph = model.graph
    rng = np.random.default_rng(seed)
    # Initializers are either the shapes ConstantOfShape nodes read (dropped below) or
    # small weights stored inline (replaced by seeded values like the others).
    shape_consts = {}
    inline_weights = []
    for t in graph.initializer:
        if t.name.endswith("__SHAPE"):
            shape_consts[t.name] = numpy_helper.to_array(t)
        elif t.data_type == TensorProto.FLOAT:
            inline_weights.append((t.name, list(t.dims)))
    data_inputs = [i for i in graph.input if "data" in i.name]
    if len(data_inputs) != 1:
        sys.exit(f"{name}: expected one image input, found {[i.name for i in data_inputs]}")

    weights = list(inline_weights)
    kept_nodes = []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in shape_consts:
            shape = shape_consts[node.input[0]]
            weights.append((node.output[0], shape))
        else:
            kept_nodes.append(node)
    reshape_shapes = {n.input[1] for n in kept_nodes if n.op_type == "Reshape"}
    initializers = []
    for inp in graph.input:
        if inp is data_inputs[0] or inp.name in shape_consts:
            continue  # the image, or a shape the ConstantOfShape nodes (dropped) read
        if any(inp.name == w for w, _ in weights):
            continue  # an inline weight, also declared as an input (IR 3)
        if inp.name in reshape_shapes:
            # The flatten before the classifier: keep the batch, fold the rest.
            initializers.append(numpy_helper.from_array(np.array([1, -1], np.int64), inp.name))
            continue
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        weights.append((inp.name, dims))

    initializers += [
        numpy_helper.from_array(random_weight(w, s, rng).astype(np.float32), w)
        for w, s in sorted(weights, key=lambda ws: ws[0])
    ]
    new_graph = helper.make_graph(
        kept_nodes,
        graph.name or name,
        [data_inputs[0]],
        list(graph.output),
        initializer=initializers,
    )
    out = helper.make_model(new_graph, opset_imports=list(model.opset_import))
    out.ir_version = 7  # initializers need not be graph inputs from IR 4 on
    onnx.checker.check_model(out)
    return out


def mlp(seed, width=2048, layers=3, inputs=1024, outputs=1000):
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, fan = "x", inputs
    for i in range(layers + 1):
        last = i == layers
        out_width = outputs if last else width
        w = rng.normal(0.0, np.sqrt(2.0 / fan), (fan, out_width)).astype(np.float32)
        b = rng.normal(0.0, 0.01, (out_width,)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"]))
        y = "y" if last else f"add{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [y]))
        if not last:
            nodes.append(helper.make_node("Relu", [y], [f"relu{i}"]))
            x = f"relu{i}"
        fan = out_width
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, outputs])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    models = {
        "resnet50": seed_light_model("resnet50", args.seed),
        "squeezenet": seed_light_model("squeezenet", args.seed + 1),
        "mlp": mlp(args.seed + 2),
    }
    for name, model in models.items():
        path = os.path.join(args.out_dir, f"{name}.onnx")
        onnx.save(model, path)
        params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        print(f"{path}: {params / 1e6:.1f} M parameters, {os.path.getsize(path) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
