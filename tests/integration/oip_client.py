"""Runs under .venv-oip (scripts/install_oip_clients.sh), not under the suite's Python: drives
tritonclient's gRPC and HTTP clients against a server, as a caller who uses Triton would.

Reads a job (JSON) on stdin: {"grpc": "host:port", "http": "host:port", "headers": {...},
"calls": [{"id", "model", "inputs": [{"name", "datatype", "array", "requires_grad"}],
"parameters": {...}, "outputs": [...] or null, "binary": bool}], "info": [model, ...]}; arrays
travel as {"dtype", "shape", "b64"}. Writes {"grpc": {id: answer}, "http": {id: answer},
"info": {...}} on stdout, an answer being {"outputs": {name: array}, "parameters": {...}} or
{"error": message, "status": status}. Imports only numpy and tritonclient.
"""

import base64
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def array(sent):
    data = base64.b64decode(sent["b64"])
    return np.frombuffer(data, dtype=sent["dtype"]).reshape(sent["shape"])


def encode(value):
    value = np.ascontiguousarray(value)
    return {"dtype": value.dtype.str, "shape": list(value.shape), "b64": base64.b64encode(value.tobytes()).decode()}


def tensors(module, job):
    inputs = []
    for sent in job["inputs"]:
        value = array(sent["array"])
        tensor = module.InferInput(sent["name"], list(value.shape), sent["datatype"])
        if module is httpclient:
            tensor.set_data_from_numpy(value, binary_data=job.get("binary", True))
            if sent.get("requires_grad"):
                tensor._parameters["requires_grad"] = True
        else:
            tensor.set_data_from_numpy(value)
            if sent.get("requires_grad"):
                tensor._input.parameters["requires_grad"].bool_param = True
        inputs.append(tensor)
    return inputs


def requested(module, job):
    outputs = None
    if job.get("outputs") is not None:
        if module is httpclient:
            outputs = [module.InferRequestedOutput(n, binary_data=job.get("binary", True)) for n in job["outputs"]]
        else:
            outputs = [module.InferRequestedOutput(n) for n in job["outputs"]]
    return outputs


def call(module, client, job, headers):
    inputs, outputs = tensors(module, job), requested(module, job)
    try:
        result = client.infer(job["model"], inputs, outputs=outputs, parameters=job.get("parameters") or None,
                              headers=headers, request_id=job["id"])
    except InferenceServerException as exc:
        return {"error": exc.message(), "status": str(exc.status())}
    return answer(module, result)


def answer(module, result):
    response = result.get_response(as_json=True) if module is grpcclient else result.get_response()
    names = [o["name"] for o in response["outputs"]]
    return {"outputs": {n: encode(result.as_numpy(n)) for n in names}, "parameters": response.get("parameters", {}),
            "id": response.get("id", "")}


def stream(client, calls, headers):
    """Every call on one ModelStreamInfer stream (gRPC only), answers matched by request id."""
    import queue

    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers)
    for job in calls:
        client.async_stream_infer(job["model"], tensors(grpcclient, job), outputs=requested(grpcclient, job),
                                  parameters=job.get("parameters") or None, request_id=job["id"])
    found = {}
    for _ in calls:
        result, error = answers.get(timeout=60)
        if error is not None:
            found[f"error-{len(found)}"] = {"error": error.message(), "status": str(error.status())}
        else:
            found[result.get_response().id] = answer(grpcclient, result)
    client.stop_stream()
    return found


def info(module, client, model, headers):
    as_json = {"as_json": True} if module is grpcclient else {}
    return {
        "live": client.is_server_live(headers=headers),
        "ready": client.is_server_ready(headers=headers),
        "model_ready": client.is_model_ready(model, headers=headers),
        "server": client.get_server_metadata(headers=headers, **as_json),
        "metadata": client.get_model_metadata(model, headers=headers, **as_json),
        "config": client.get_model_config(model, headers=headers, **as_json),
        "stats": client.get_inference_statistics(model, headers=headers, **as_json),
    }


def main():
    job = json.load(sys.stdin)
    headers = job.get("headers") or None
    out = {}
    for name, module in (("grpc", grpcclient), ("http", httpclient)):
        client = module.InferenceServerClient(job[name])
        answers = {c["id"]: call(module, client, c, headers) for c in job.get("calls", [])}
        details = {}
        for model in job.get("info", []):
            try:
                details[model] = info(module, client, model, headers)
            except InferenceServerException as exc:
                details[model] = {"error": exc.message(), "status": str(exc.status())}
        out[name] = {"answers": answers, "info": details}
        if module is grpcclient and job.get("stream"):
            out["stream"] = stream(client, job["calls"], headers)
        client.close()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
