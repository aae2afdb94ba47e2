#!/usr/bin/env node
// cross_entropy and its gradient with respect to `input`, computed by a remoteloss server.
//
// Built from protos/remoteloss/v1/loss.proto alone: no generated code and no reflection.
//
//   node index.mjs [--target HOST:PORT] [--timeout SECONDS] [JSON]
//
// JSON (the argument, or standard input when there is none) holds nested arrays and torch's
// keyword arguments of torch.nn.functional.cross_entropy:
//
//   {"input": [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]],   logits, (C), (N, C) or (N, C, d1, ...)
//    "target": [0, 2],                             class indices; or probabilities shaped like input
//    "weight": [1.0, 2.0, 1.0],                    optional, (C)
//    "reduction": "mean",                          optional: "none", "mean" or "sum"
//    "ignore_index": -100, "label_smoothing": 0.0, optional
//    "dtype": "float32"}                           optional: "float32" or "float64" for input/weight
//
// It prints {"loss": ..., "grad_input": ..., "warnings": [...]} as JSON: numbers for a 0-d
// tensor, nested arrays otherwise. The server is --target, else $REMOTELOSS_TARGET, else
// localhost:50051. Exit status: 0 on success, 1 when the server refuses or fails (its status
// and message on stderr), 2 for bad usage.

import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const PROTOS = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "protos");

// Wire dtypes this example sends and reads: [enum value name, bytes per element].
const DTYPES = {
  float32: ["DTYPE_FLOAT32", 4],
  float64: ["DTYPE_FLOAT64", 8],
  int64: ["DTYPE_INT64", 8],
};

class UsageError extends Error {}

function parseArgs(argv) {
  const options = { target: process.env.REMOTELOSS_TARGET || "localhost:50051", timeout: 30, json: null };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--target" || arg === "--timeout") {
      if (i + 1 >= argv.length) throw new UsageError(`${arg} needs a value`);
      options[arg.slice(2)] = argv[++i];
    } else if (arg === "-h" || arg === "--help") {
      process.stdout.write("usage: node index.mjs [--target HOST:PORT] [--timeout SECONDS] [JSON]\n");
      process.exit(0);
    } else if (arg.startsWith("--")) {
      throw new UsageError(`unknown option ${arg}`);
    } else if (options.json === null) {
      options.json = arg;
    } else {
      throw new UsageError("give the JSON once, as one argument or on standard input");
    }
  }
  options.timeout = Number(options.timeout);
  if (!(options.timeout > 0)) throw new UsageError("--timeout must be a positive number of seconds");
  return options;
}

// Nested arrays -> {shape, values} in C (row-major) order; rejects ragged arrays.
function flatten(name, nested) {
  const shape = [];
  for (let level = nested; Array.isArray(level); level = level[0]) shape.push(level.length);
  const values = [];
  const walk = (value, depth) => {
    if (depth === shape.length) {
      if (typeof value !== "number") throw new UsageError(`${name}: expected a number, got ${JSON.stringify(value)}`);
      values.push(value);
    } else {
      if (!Array.isArray(value) || value.length !== shape[depth]) throw new UsageError(`${name}: ragged nested array`);
      value.forEach((item) => walk(item, depth + 1));
    }
  };
  walk(nested, 0);
  return { shape, values };
}

// A Tensor message: dtype, shape and the values' little-endian bytes.
function encode(name, nested, dtype, requiresGrad = false) {
  const { shape, values } = flatten(name, nested);
  const [enumName, itemsize] = DTYPES[dtype];
  const view = new DataView(new ArrayBuffer(values.length * itemsize));
  values.forEach((value, i) => {
    if (dtype === "float32") view.setFloat32(i * itemsize, value, true);
    else if (dtype === "float64") view.setFloat64(i * itemsize, value, true);
    else {
      if (!Number.isInteger(value)) throw new UsageError(`${name}: class indices must be integers, got ${value}`);
      view.setBigInt64(i * itemsize, BigInt(value), true);
    }
  });
  return { dtype: enumName, shape, data: Buffer.from(view.buffer), requires_grad: requiresGrad };
}

// A Tensor message -> a number (0-d) or nested arrays.
function decode(name, tensor) {
  const shape = (tensor.shape || []).map(Number);
  const reader = {
    DTYPE_FLOAT32: [4, (view, offset) => view.getFloat32(offset, true)],
    DTYPE_FLOAT64: [8, (view, offset) => view.getFloat64(offset, true)],
  }[tensor.dtype];
  if (!reader) throw new Error(`${name}: this example reads float32 and float64, got ${tensor.dtype}`);
  const [itemsize, read] = reader;
  const data = tensor.data;
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const values = Array.from({ length: data.byteLength / itemsize }, (_, i) => read(view, i * itemsize));
  const nest = (depth, start) => {
    if (depth === shape.length) return values[start];
    const stride = shape.slice(depth + 1).reduce((a, b) => a * b, 1);
    return Array.from({ length: shape[depth] }, (_, i) => nest(depth + 1, start + i * stride));
  };
  return nest(0, 0);
}

// The CrossEntropy message of a ComputeRequest, from the JSON's arguments.
function crossEntropy(args) {
  if (args === null || typeof args !== "object" || Array.isArray(args)) throw new UsageError("JSON must be an object");
  for (const key of Object.keys(args)) {
    if (!["input", "target", "weight", "reduction", "ignore_index", "label_smoothing", "dtype"].includes(key)) {
      throw new UsageError(`unknown key ${JSON.stringify(key)}`);
    }
  }
  if (args.input === undefined || args.target === undefined) throw new UsageError("JSON needs input and target");
  const dtype = args.dtype ?? "float32";
  if (!["float32", "float64"].includes(dtype)) throw new UsageError(`dtype must be float32 or float64, got ${dtype}`);
  const input = encode("input", args.input, dtype, true);
  // torch's rule: a target with the input's rank holds probabilities, otherwise class indices.
  const probabilities = flatten("target", args.target).shape.length === input.shape.length;
  const message = {
    input,
    target: encode("target", args.target, probabilities ? dtype : "int64"),
  };
  if (args.weight !== undefined) message.weight = encode("weight", args.weight, dtype);
  if (args.reduction !== undefined) {
    if (!["none", "mean", "sum"].includes(args.reduction)) throw new UsageError(`reduction must be none, mean or sum`);
    message.reduction = `REDUCTION_${args.reduction.toUpperCase()}`;
  }
  // Optional scalars: left out means torch's default.
  if (args.ignore_index !== undefined) message.ignore_index = args.ignore_index;
  if (args.label_smoothing !== undefined) message.label_smoothing = args.label_smoothing;
  return message;
}

function loadService() {
  const definition = protoLoader.loadSync("remoteloss/v1/loss.proto", {
    includeDirs: [PROTOS],
    keepCase: true, // field names as in the .proto: requires_grad, ignore_index
    enums: String,
    longs: Number,
    defaults: false,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).remoteloss.v1.LossService;
}

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks).toString("utf8");
}

async function main(argv) {
  let options;
  let request;
  try {
    options = parseArgs(argv);
    const text = options.json ?? (await readStdin());
    let args;
    try {
      args = JSON.parse(text);
    } catch (error) {
      throw new UsageError(`bad JSON: ${error.message}`);
    }
    request = { cross_entropy: crossEntropy(args) };
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    process.stderr.write(`remoteloss-node: ${error.message}\n`);
    return 2;
  }

  const LossService = loadService();
  const client = new LossService(options.target, grpc.credentials.createInsecure());
  const deadline = new Date(Date.now() + options.timeout * 1000);
  try {
    const response = await new Promise((resolve, reject) =>
      client.Compute(request, { deadline }, (error, reply) => (error ? reject(error) : resolve(reply))),
    );
    const result = {
      loss: decode("loss", response.loss),
      grad_input: decode("grad_input", response.gradients.input),
      warnings: response.warnings || [],
    };
    process.stdout.write(JSON.stringify(result) + "\n");
    return 0;
  } catch (error) {
    if (error.code === undefined) throw error;
    process.stderr.write(`remoteloss-node: ${grpc.status[error.code]}: ${error.details}\n`);
    return 1;
  } finally {
    client.close();
  }
}

process.exitCode = await main(process.argv.slice(2));
