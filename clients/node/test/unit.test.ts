// The thin layer without a TenSafe stack: tensors byte for byte, URL forms, and the call layer (metadata,
// idempotency keys, retries, typed errors) against a real gRPC server over HTTP/2 on loopback, served by
// connect-node from the generated AccountantService descriptor, that answers as the services do
// (google.rpc.Status with ErrorInfo, RetryInfo, BadRequest in grpc-status-details-bin).
import assert from "node:assert/strict";
import * as http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { after, before, describe, test } from "node:test";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type ConnectRouter, type HandlerContext } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { BadRequestSchema, ErrorInfoSchema, RetryInfoSchema } from "../src/gen/google/rpc/error_details_pb.js";
import { AccountantService, BudgetSchema } from "../src/gen/tensafe/api/accountant/v1/accountant_pb.js";
import { ErrorDetailSchema, ErrorReason } from "../src/gen/tensafe/api/common/v1/common_pb.js";
import {
  REASON_TO_ERROR, DPBudgetExceededError, Dtype, FutureCancelledError, QuotaExceededError, RateLimitedError, ServerError,
  ServiceUnavailableError, TenSafeClient, ValidationError, fromErrorDetail, parseEndpoint, resolveConfig, tensor,
  tensorToNested, tensorValues,
} from "../src/index.js";

describe("tensors on the wire", () => {
  test("int64 [2, 3] is 48 little-endian bytes, rows first", () => {
    const t = tensor(Dtype.INT64, [[1n, 2n, 3n], [-1n, 256n, 2n ** 40n]]);
    assert.equal(t.dtype, Dtype.INT64);
    assert.deepEqual(t.shape, [2n, 3n]);
    assert.equal(t.data.length, 48);
    assert.deepEqual([...t.data.subarray(0, 8)], [1, 0, 0, 0, 0, 0, 0, 0]);
    assert.deepEqual([...t.data.subarray(24, 32)], [255, 255, 255, 255, 255, 255, 255, 255]);
    assert.deepEqual([...t.data.subarray(32, 40)], [0, 1, 0, 0, 0, 0, 0, 0]);
    assert.deepEqual([...t.data.subarray(40, 48)], [0, 0, 0, 0, 0, 1, 0, 0]);
    assert.deepEqual(tensorToNested(t), [[1n, 2n, 3n], [-1n, 256n, 2n ** 40n]]);
  });

  test("float32, float64, int32, int8, uint8 and bool round-trip with their item sizes", () => {
    const cases: [Dtype, (number | boolean)[], number][] = [
      [Dtype.FLOAT32, [0.5, -1.25, 3], 4], [Dtype.FLOAT64, [Math.PI, -0.1], 8], [Dtype.INT32, [-7, 2 ** 31 - 1], 4],
      [Dtype.INT8, [-128, 127], 1], [Dtype.UINT8, [0, 255], 1], [Dtype.BOOL, [true, false, true], 1],
    ];
    for (const [dtype, values, size] of cases) {
      const t = tensor(dtype, values);
      assert.equal(t.data.length, values.length * size, Dtype[dtype]);
      assert.deepEqual(tensorValues(t).values, values, Dtype[dtype]);
    }
    assert.deepEqual([...tensor(Dtype.FLOAT32, [1]).data], [0x00, 0x00, 0x80, 0x3f]);
  });

  test("float16 and bfloat16 are IEEE half and the top half of float32, rounded to nearest even", () => {
    const bits = (dtype: Dtype, v: number) => {
      const d = tensor(dtype, [v]).data;
      return (d[0] as number) | ((d[1] as number) << 8);
    };
    assert.equal(bits(Dtype.FLOAT16, 1), 0x3c00);
    assert.equal(bits(Dtype.FLOAT16, -2), 0xc000);
    assert.equal(bits(Dtype.FLOAT16, 65504), 0x7bff);
    assert.equal(bits(Dtype.FLOAT16, 1e6), 0x7c00);
    assert.equal(bits(Dtype.FLOAT16, 2 ** -24), 0x0001);
    assert.equal(bits(Dtype.FLOAT16, 1 + 2 ** -11), 0x3c00); // a tie: rounds to even
    assert.equal(bits(Dtype.BFLOAT16, 1), 0x3f80);
    assert.equal(bits(Dtype.BFLOAT16, -0.5), 0xbf00);
    assert.deepEqual(tensorValues(tensor(Dtype.FLOAT16, [0.333251953125, -65504])).values, [0.333251953125, -65504]);
    assert.deepEqual(tensorValues(tensor(Dtype.BFLOAT16, [3.140625])).values, [3.140625]);
  });

  test("a scalar has an empty shape; ragged arrays and wrong byte counts are refused", () => {
    const scalar = tensor(Dtype.FLOAT64, 2.5);
    assert.deepEqual(scalar.shape, []);
    assert.equal(tensorToNested(scalar), 2.5);
    assert.throws(() => tensor(Dtype.INT64, [[1n, 2n], [3n]]), /ragged/);
    assert.throws(() => tensor(Dtype.FLOAT32, [1, 2, 3], [2, 2]), /holds 4 elements, not 3/);
    const t = tensor(Dtype.FLOAT32, [1, 2]);
    assert.throws(() => tensorValues({ ...t, data: t.data.subarray(1) }), /needs 8 bytes, not 7/);
  });
});

describe("settings", () => {
  test("URL forms as the SDK accepts them", () => {
    assert.deepEqual(parseEndpoint("localhost:50051"), { target: "localhost:50051", tls: false, url: "http://localhost:50051" });
    assert.deepEqual(parseEndpoint("https://api.example.com"), { target: "api.example.com:443", tls: true,
      url: "https://api.example.com:443" });
    assert.equal(parseEndpoint("grpcs://h:8443/").url, "https://h:8443");
    assert.equal(parseEndpoint("[::1]:50051").target, "[::1]:50051");
    for (const [bad, why] of [["localhost", /no port/], ["ftp://h:1", /unknown scheme/], ["h:1/path", /path/],
      ["u:p@h:1", /user-info/], ["h:99999", /1-65535/], ["::1:5", /brackets/], ["", /empty/]] as const) {
      assert.throws(() => parseEndpoint(bad, "TS_BASE_URL"), (err: unknown) =>
        err instanceof ValidationError && err.field === "TS_BASE_URL" && why.test(err.message), bad);
    }
  });

  test("options win over TS_* variables; per-service URLs", () => {
    const env = { TS_BASE_URL: "envhost:1", TS_API_KEY: "ts-env", TS_VAULT_URL: "vault:2", TS_TIMEOUT: "7",
      TS_RETRY_COUNT: "5" };
    const cfg = resolveConfig({ env });
    assert.equal(cfg.apiKey, "ts-env");
    assert.equal(cfg.endpoints.trainer.target, "envhost:1");
    assert.equal(cfg.endpoints.vault.target, "vault:2");
    assert.equal(cfg.timeoutMs, 7000);
    assert.equal(cfg.retry.count, 5);
    const mine = resolveConfig({ env, apiKey: "ts-arg", baseUrl: "arg:3", retry: { count: 0 } });
    assert.equal(mine.apiKey, "ts-arg");
    assert.equal(mine.endpoints.trainer.target, "arg:3");
    assert.equal(mine.retry.count, 0);
    assert.throws(() => resolveConfig({ env: { TS_RETRY_COUNT: "-1" } }), (e: unknown) =>
      e instanceof ValidationError && e.field === "TS_RETRY_COUNT");
  });

  test("every ErrorReason of common.proto has its error class", () => {
    const reasons = Object.keys(ErrorReason).filter((k) => Number.isNaN(Number(k)) && k !== "UNSPECIFIED");
    assert.ok(reasons.length >= 23);
    assert.deepEqual(reasons.filter((r) => !(r in REASON_TO_ERROR)), []);
    assert.deepEqual(Object.keys(REASON_TO_ERROR).filter((r) => !reasons.includes(r)), []);
  });

  test("a failed future's ErrorDetail becomes the same typed error as a failed call", () => {
    const err = fromErrorDetail(create(ErrorDetailSchema, { code: Code.FailedPrecondition, reason: "DP_BUDGET_EXCEEDED",
      message: "would pass epsilon", metadata: { budget_id: "bud_1", request_id: "abc" } }));
    assert.ok(err instanceof DPBudgetExceededError);
    assert.equal(err.budgetId, "bud_1");
    assert.equal(err.requestId, "abc");
    assert.ok(fromErrorDetail(create(ErrorDetailSchema, { code: Code.Canceled, reason: "FUTURE_CANCELLED" }))
      instanceof FutureCancelledError);
    // An unknown reason falls back to the gRPC code, as common.proto asks of clients.
    const unknown = fromErrorDetail(create(ErrorDetailSchema, { code: Code.InvalidArgument, reason: "NEW_REASON" }));
    assert.ok(unknown instanceof ValidationError);
    assert.equal(unknown.reason, "NEW_REASON");
  });
});

// -- the call layer against a loopback gRPC server ---------------------------------------------------------

interface Seen {
  method: string;
  headers: Record<string, string | null>;
}

const seen: Seen[] = [];
/** What the server answers next for each method: an error to throw, or undefined for success. */
const script = new Map<string, (ConnectError | undefined)[]>();

function failure(code: Code, reason: string, metadata: Record<string, string> = {},
  extra: { retryMs?: number; field?: string } = {}): ConnectError {
  const details: ConstructorParameters<typeof ConnectError>[3] = [
    { desc: ErrorInfoSchema, value: { reason, domain: "tensafe.dev", metadata: { request_id: "rid", ...metadata } } },
  ];
  if (extra.retryMs !== undefined) {
    details.push({ desc: RetryInfoSchema, value: { retryDelay: {
      seconds: BigInt(Math.floor(extra.retryMs / 1000)), nanos: (extra.retryMs % 1000) * 1e6 } } });
  }
  if (extra.field) details.push({ desc: BadRequestSchema, value: { fieldViolations: [{ field: extra.field }] } });
  return new ConnectError(`${reason} from the test server`, code, undefined, details);
}

function answer(method: string, ctx: HandlerContext) {
  const h = ctx.requestHeader;
  seen.push({ method, headers: { authorization: h.get("authorization"), "x-request-id": h.get("x-request-id"),
    "x-idempotency-key": h.get("x-idempotency-key"), "x-tenant-id": h.get("x-tenant-id") } });
  const next = script.get(method)?.shift();
  if (next) throw next;
  return { budget: create(BudgetSchema, { budgetId: "bud_test", targetEpsilon: 1 }) };
}

let server: http2.Http2Server;
let baseUrl: string;
const delays: number[] = [];

function client(options: { retryCount?: number; apiKey?: string } = {}) {
  return new TenSafeClient({ baseUrl, apiKey: options.apiKey ?? "ts-test-key", tenantId: "acme", env: {},
    retry: { count: options.retryCount ?? 3 },
    retryHooks: { sleep: async (ms) => { delays.push(ms); }, random: () => 1 } });
}

before(async () => {
  const routes = (router: ConnectRouter) => router.service(AccountantService, {
    createBudget: (_req, ctx) => answer("createBudget", ctx),
    getBudget: (_req, ctx) => answer("getBudget", ctx),
  });
  server = http2.createServer(connectNodeAdapter({ routes, grpc: true, connect: false, grpcWeb: false }));
  await new Promise<void>((res) => server.listen(0, "127.0.0.1", res));
  baseUrl = `127.0.0.1:${(server.address() as AddressInfo).port}`;
});

after(async () => {
  await new Promise((res) => server.close(res));
});

function reset() {
  seen.length = 0;
  delays.length = 0;
  script.clear();
}

describe("calls", () => {
  test("every call sends the API key and tenant; a new request id per attempt", async () => {
    reset();
    const c = client();
    try {
      await c.accountant.getBudget({ budgetId: "bud_test" });
      await c.accountant.getBudget({ budgetId: "bud_test" });
    } finally {
      c.close();
    }
    assert.equal(seen.length, 2);
    for (const s of seen) {
      assert.equal(s.headers.authorization, "Bearer ts-test-key");
      assert.equal(s.headers["x-tenant-id"], "acme");
      assert.match(s.headers["x-request-id"] ?? "", /^[0-9a-f]{32}$/);
      assert.equal(s.headers["x-idempotency-key"], null, "a NO_SIDE_EFFECTS read carries no idempotency key");
    }
    assert.notEqual(seen[0]?.headers["x-request-id"], seen[1]?.headers["x-request-id"]);
  });

  test("RATE_LIMITED is retried after the server's RetryInfo delay, with one idempotency key", async () => {
    reset();
    script.set("createBudget", [failure(Code.ResourceExhausted, "RATE_LIMITED", { retry_after_s: "1.500" }, { retryMs: 1500 }),
      failure(Code.ResourceExhausted, "RATE_LIMITED", {}, { retryMs: 2750 })]);
    const c = client();
    try {
      const resp = await c.accountant.createBudget({ sessionId: "sess_1", targetEpsilon: 1 });
      assert.equal(resp.budget?.budgetId, "bud_test");
    } finally {
      c.close();
    }
    assert.equal(seen.length, 3);
    // Backoff (random = 1) would wait 200 then 400 ms: the server's delays are longer and win.
    assert.deepEqual(delays, [1500, 2750]);
    const keys = new Set(seen.map((s) => s.headers["x-idempotency-key"]));
    assert.equal(keys.size, 1, "one logical call, one idempotency key");
    assert.match([...keys][0] ?? "", /^[0-9a-f]{32}$/);
    assert.equal(new Set(seen.map((s) => s.headers["x-request-id"])).size, 3);
  });

  test("UNAVAILABLE is retried with exponential backoff, then raised typed", async () => {
    reset();
    script.set("getBudget", [1, 2, 3, 4].map(() => new ConnectError("down", Code.Unavailable)));
    const c = client({ retryCount: 3 });
    try {
      await assert.rejects(c.accountant.getBudget({ budgetId: "bud_test" }), (err: unknown) => {
        assert.ok(err instanceof ServiceUnavailableError, String(err));
        assert.equal(err.reason, "UNAVAILABLE");
        assert.match(err.message, /service unavailable: down/);
        return true;
      });
    } finally {
      c.close();
    }
    assert.equal(seen.length, 4);
    assert.deepEqual(delays, [200, 400, 800]);
  });

  test("QUOTA_EXCEEDED, INVALID_ARGUMENT and DP_BUDGET_EXCEEDED are not retried", async () => {
    reset();
    script.set("createBudget", [
      failure(Code.ResourceExhausted, "QUOTA_EXCEEDED", { quota: "TENSAFE_QUOTA_BUDGETS", limit: "3" }),
      failure(Code.InvalidArgument, "INVALID_ARGUMENT", { field: "target_epsilon" }, { field: "target_epsilon" }),
      failure(Code.FailedPrecondition, "DP_BUDGET_EXCEEDED", { budget_id: "bud_x", epsilon_with_step: "3.1" }),
    ]);
    const c = client();
    try {
      await assert.rejects(c.accountant.createBudget({}), (err: unknown) =>
        err instanceof QuotaExceededError && err.quota === "TENSAFE_QUOTA_BUDGETS" && err.metadata["limit"] === "3");
      await assert.rejects(c.accountant.createBudget({}), (err: unknown) =>
        err instanceof ValidationError && err.field === "target_epsilon" && err.requestId === "rid");
      await assert.rejects(c.accountant.createBudget({}), (err: unknown) =>
        err instanceof DPBudgetExceededError && err.budgetId === "bud_x" && err.grpcCode === Code.FailedPrecondition);
    } finally {
      c.close();
    }
    assert.equal(seen.length, 3);
    assert.deepEqual(delays, []);
  });

  test("a RetryInfo delay beyond maxServerDelayMs is raised at once, with the delay", async () => {
    reset();
    script.set("getBudget", [failure(Code.ResourceExhausted, "RATE_LIMITED", {}, { retryMs: 90_000 })]);
    const c = client();
    try {
      await assert.rejects(c.accountant.getBudget({}), (err: unknown) =>
        err instanceof RateLimitedError && err.retryAfterMs === 90_000);
    } finally {
      c.close();
    }
    assert.equal(seen.length, 1);
  });

  test("an unimplemented method is a ServerError; an unreachable server a ServiceUnavailableError", async () => {
    reset();
    const c = client({ retryCount: 1 });
    try {
      await assert.rejects(c.accountant.closeBudget({ budgetId: "bud_test" }), (err: unknown) =>
        err instanceof ServerError && err.grpcCode === Code.Unimplemented);
    } finally {
      c.close();
    }
    const closed = new TenSafeClient({ baseUrl: "127.0.0.1:1", env: {}, retry: { count: 1 },
      retryHooks: { sleep: async (ms) => { delays.push(ms); } } });
    try {
      await assert.rejects(closed.accountant.getBudget({}), ServiceUnavailableError);
    } finally {
      closed.close();
    }
    assert.equal(delays.length, 1, "retried once");
  });
});
