// Calls hybridmesh's RouterService from Node with nothing but the .proto files.
// Usage: node examples/node/infer.js <router host:port> <raw 784-byte uint8 image file>
// Prints the answer and its decision as JSON.
"use strict";

const path = require("path");
const fs = require("fs");
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

const [target, imageFile] = process.argv.slice(2);
const client = new RouterService(target, grpc.credentials.createInsecure());
const request = {
  model: "fashion-mnist",
  inputs: [
    {
      name: "image",
      datatype: "DATA_TYPE_UINT8",
      shape: [1, 1, 28, 28],
      raw_contents: fs.readFileSync(imageFile),
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
