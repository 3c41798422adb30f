// @tensafe/client: the generated messages and services (src/gen, from protos/ by buf) and the thin layer.
export * from "./client.js";
export * from "./config.js";
export * from "./errors.js";
export * from "./tensor.js";
export { Dtype } from "./gen/tensafe/api/common/v1/common_pb.js";
export * as accountant from "./gen/tensafe/api/accountant/v1/accountant_pb.js";
export * as common from "./gen/tensafe/api/common/v1/common_pb.js";
export * as he from "./gen/tensafe/api/he/v1/he_pb.js";
export * as inference from "./gen/tensafe/api/inference/v1/inference_pb.js";
export * as ledger from "./gen/tensafe/api/ledger/v1/ledger_pb.js";
export * as trainer from "./gen/tensafe/api/trainer/v1/trainer_pb.js";
export * as vault from "./gen/tensafe/api/vault/v1/vault_pb.js";
