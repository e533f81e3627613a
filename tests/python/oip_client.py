#!/usr/bin/env python3
"""An unmodified Open Inference Protocol client against `shardseal proxy`.

Run by cli/tests/oip_proxy.rs with the pip-installed `tritonclient[grpc]` package:

    oip_client.py --url 127.0.0.1:PORT --model mlp --dir DIR

Reads DIR/input_<i>.npy (one file per model input, in the model metadata's order) and
writes, for the Rust test to check against plain tract:

    DIR/raw_output_<i>.npy    outputs of InferenceServerClient.infer (raw contents)
    DIR/typed_output_<i>.npy  outputs of a ModelInfer request with typed contents, sent
                              through the package's own generated gRPC stub
    DIR/summary.json          liveness, readiness, metadata and the statuses of refused
                              requests
"""

import argparse
import json
import sys

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

# The typed-contents field and numpy type of each datatype ShardSeal carries.
TYPED = {
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
    "INT64": ("int64_contents", np.int64),
    "INT32": ("int_contents", np.int32),
    "UINT8": ("uint_contents", np.uint8),
}


def refusal(call):
    """The gRPC status code name and message of a call that must fail."""
    try:
        call()
    except InferenceServerException as e:
        return {"status": str(e.status()), "message": e.message()}
    return {"status": "OK", "message": ""}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()

    client = grpcclient.InferenceServerClient(url=args.url)
    metadata = client.get_model_metadata(args.model)
    server = client.get_server_metadata()
    summary = {
        "server_live": client.is_server_live(),
        "server_ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(args.model),
        "unknown_model_ready": client.is_model_ready("no-such-model"),
        "server_name": server.name,
        "model_name": metadata.name,
        "versions": list(metadata.versions),
        "platform": metadata.platform,
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape]}
            for t in metadata.inputs
        ],
        "outputs": [
            {"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape]}
            for t in metadata.outputs
        ],
    }

    arrays = [np.load(f"{args.dir}/input_{i}.npy") for i in range(len(metadata.inputs))]

    # The high-level client: raw_input_contents in, raw_output_contents out.
    inputs = []
    for spec, array in zip(metadata.inputs, arrays):
        tensor = grpcclient.InferInput(spec.name, list(array.shape), spec.datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    wanted = [grpcclient.InferRequestedOutput(t.name) for t in metadata.outputs]
    result = client.infer(args.model, inputs, outputs=wanted, request_id="oip-test-1")
    summary["response_id"] = result.get_response().id
    for i, spec in enumerate(metadata.outputs):
        np.save(f"{args.dir}/raw_output_{i}.npy", result.as_numpy(spec.name))

    # The package's generated stub with typed contents: typed contents come back.
    request = service_pb2.ModelInferRequest(model_name=args.model)
    for spec, array in zip(metadata.inputs, arrays):
        field, _ = TYPED[spec.datatype]
        tensor = request.inputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        getattr(tensor.contents, field).extend(array.flatten().tolist())
    with grpc.insecure_channel(args.url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    summary["typed_response_raw_entries"] = len(response.raw_output_contents)
    for i, out in enumerate(response.outputs):
        field, dtype = TYPED[out.datatype]
        values = np.array(getattr(out.contents, field), dtype=dtype).reshape(list(out.shape))
        np.save(f"{args.dir}/typed_output_{i}.npy", values)

    # Refusals, as the client library reports them.
    summary["unknown_model"] = refusal(lambda: client.infer("no-such-model", inputs))
    first = metadata.inputs[0]
    wrong = grpcclient.InferInput(first.name, list(arrays[0].shape), "FP64")
    wrong.set_data_from_numpy(arrays[0].astype(np.float64))
    summary["wrong_datatype"] = refusal(lambda: client.infer(args.model, [wrong] + inputs[1:]))

    with open(f"{args.dir}/summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
