// Calls hybridmesh's RouterService from Node with nothing but the .proto files.
// Usage: node examples/node/infer.js [ROUTER] [--index N | --image FILE]
//   ROUTER: host:port; default: the running local mesh's router (endpoints.router in
//     $HYBRIDMESH_STATE_DIR/state.json, default var/mesh), so --random-ports works too.
//   --index: a Fashion-MNIST test image (Debian's dataset-fashion-mnist), default 0;
//   --image: a raw 784-byte uint8 28x28 image file instead.
// Prints the answer and its decision as JSON, enums by name.
"use strict";

const path = require("path");
const fs = require("fs");
const zlib = require("zlib");
const { parseArgs } = require("util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.join(__dirname, "..", "..", "protos");
const definition = protoLoader.loadSync("hybridmesh/router/v1/router_service.proto", {
  includeDirs: [PROTOS],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
});
const { RouterService } = grpc.loadPackageDefinition(definition).hybridmesh.router.v1;

const { values: options, positionals } = parseArgs({
  options: { index: { type: "string", default: "0" }, image: { type: "string" } },
  allowPositionals: true,
});

function routerAddress(given) {
  if (given) return given;
  const state = path.join(process.env.HYBRIDMESH_STATE_DIR || "var/mesh", "state.json");
  if (!fs.existsSync(state)) {
    console.error(`no router address given and no mesh is up (${state} is missing)`);
    process.exit(1);
  }
  return JSON.parse(fs.readFileSync(state, "utf8")).endpoints.router;
}

function testImage(index) {
  // IDX: a 16-byte header, then 28x28 uint8 images one after another.
  const file = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz";
  const start = 16 + index * 784;
  return zlib.gunzipSync(fs.readFileSync(file)).subarray(start, start + 784);
}

const target = routerAddress(positionals[0]);
const image = options.image ? fs.readFileSync(options.image) : testImage(Number(options.index));
const client = new RouterService(target, grpc.credentials.createInsecure());
const request = {
  model: "fashion-mnist",
  inputs: [
    {
      name: "image",
      datatype: "DATA_TYPE_UINT8",
      shape: [1, 1, 28, 28],
      raw_contents: image,
    },
  ],
  hints: { privacy_class: "PRIVACY_CLASS_PUBLIC", preference: "ROUTE_PREFERENCE_AUTO" },
  top_k: 3,
};
const deadline = new Date(Date.now() + 5000); // always set a deadline
client.Infer(request, { deadline }, (error, reply) => {
  if (error) {
    console.error(`${grpc.status[error.code]}: ${error.details}`);
    process.exit(1);
  }
  const prediction = reply.predictions[0];
  console.log(
    JSON.stringify({
      label: prediction.classification.top_k[0].label,
      class_index: prediction.classification.top_k[0].class_index,
      served_by: reply.decision.served_by,
      reason: reply.decision.reason,
      data_left_site: reply.decision.data_left_site,
      trace_id: reply.decision.trace_id,
    }),
  );
  client.close();
});
