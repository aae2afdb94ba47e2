"""Runs under .venv-oip, in a process of its own (KServe's and tritonclient's generated code
both register the `inference` package in protobuf's default pool): KServe's Python clients,
gRPC and REST, against a server. Argv: GRPC_TARGET HTTP_TARGET. Prints, as JSON, each client's
loss and gradient of mse_loss(x, t, reduction="sum") with respect to x, and the x and t sent.
"""

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def request(x, t):
    inputs = [InferInput("input", list(x.shape), "FP32", parameters={"requires_grad": True}),
              InferInput("target", list(t.shape), "FP32")]
    inputs[0].set_data_from_numpy(x, binary_data=False)
    inputs[1].set_data_from_numpy(t, binary_data=False)
    return InferRequest("mse_loss", inputs, parameters={"reduction": "sum"}, request_id="kserve")


def outputs(response):
    return {o.name: o.as_numpy().tolist() for o in response.outputs}


async def main(grpc_target, http_target):
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    t = np.zeros((2, 3), dtype=np.float32)
    grpc_client = InferenceGRPCClient(grpc_target, timeout=30)
    grpc_answer = outputs(await grpc_client.infer(request(x, t)))
    await grpc_client.close()
    rest_client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    rest_answer = outputs(await rest_client.infer(f"http://{http_target}", request(x, t), model_name="mse_loss"))
    await rest_client.close()
    print(json.dumps({"x": x.tolist(), "t": t.tolist(), "grpc": grpc_answer, "rest": rest_answer}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
