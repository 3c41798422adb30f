// The thin layer over the generated code: one gRPC (HTTP/2) transport per endpoint, and on every call
//   - `authorization: Bearer <api key>` (and `x-tenant-id` when set), as sdk/tg_tinker/_transport.py sends them;
//   - a fresh `x-request-id` per attempt;
//   - one `x-idempotency-key` per logical state-changing call (every RPC the protos do not mark
//     NO_SIDE_EFFECTS), kept across retries, so the server applies a retried call once;
//   - retries of unary calls on UNAVAILABLE and RESOURCE_EXHAUSTED (never QUOTA_EXCEEDED), with exponential
//     backoff and jitter, waiting at least the server's google.rpc.RetryInfo delay;
//   - failures as typed errors (errors.ts), for unary calls and while iterating a stream.
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import type * as http2 from "node:http2";
import { create, fromBinary, type DescMethod, type DescService } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema, MethodOptions_IdempotencyLevel, type FileDescriptorProto } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type CallOptions, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import { parseEndpoint, resolveConfig, type ClientConfig, type ClientOptions, type Endpoint, type RetryOptions, type ServiceName } from "./config.js";
import { ErrorDetailSchema } from "./gen/tensafe/api/common/v1/common_pb.js";
import { fromConnectError, fromErrorDetail, QuotaExceededError, ServiceUnavailableError, toTenSafeError } from "./errors.js";
import { Health, HealthCheckResponse_ServingStatus } from "./gen/grpc/health/v1/health_pb.js";
import { ServerReflection, type ServerReflectionRequest } from "./gen/grpc/reflection/v1alpha/reflection_pb.js";
import { AccountantService } from "./gen/tensafe/api/accountant/v1/accountant_pb.js";
import { HeService } from "./gen/tensafe/api/he/v1/he_pb.js";
import { InferenceService } from "./gen/tensafe/api/inference/v1/inference_pb.js";
import { LedgerService } from "./gen/tensafe/api/ledger/v1/ledger_pb.js";
import { FutureState, TrainerService, type FutureEvent, type FutureRef } from "./gen/tensafe/api/trainer/v1/trainer_pb.js";
import type { Artifact } from "./gen/tensafe/api/vault/v1/vault_pb.js";
import { VaultService } from "./gen/tensafe/api/vault/v1/vault_pb.js";

/** The six services by their short name (as the SDK and `tensafe serve` name them). */
export const SERVICES = {
  trainer: TrainerService,
  accountant: AccountantService,
  he: HeService,
  vault: VaultService,
  ledger: LedgerService,
  inference: InferenceService,
} as const satisfies Record<ServiceName, DescService>;

/** Codes a unary call is retried on. */
export const RETRYABLE: ReadonlySet<Code> = new Set([Code.Unavailable, Code.ResourceExhausted]);

const MAX_MESSAGE_BYTES = 64 << 20; // as the SDK's channels

/** Whether the proto marks the method NO_SIDE_EFFECTS (read-only: no idempotency key needed). */
export function isReadOnly(method: DescMethod): boolean {
  return method.idempotency === MethodOptions_IdempotencyLevel.NO_SIDE_EFFECTS;
}

/** A new id for x-request-id / x-idempotency-key (32 hex characters, as the SDK's uuid4().hex). */
export function newId(): string {
  return randomBytes(16).toString("hex");
}

function abortError(signal: AbortSignal): unknown {
  return signal.reason ?? new ConnectError("the operation was aborted", Code.Canceled);
}

/** Waits `ms`, or rejects when the call's signal aborts (its deadline passed or it was cancelled). */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(abortError(signal));
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(abortError(signal as AbortSignal));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

export interface RetryHooks {
  /** How the client waits between attempts (tests pass one that records the delays). */
  sleep?: (ms: number, signal: AbortSignal) => Promise<void>;
  /** Jitter source in [0, 1). */
  random?: () => number;
}

/** The delay before the next attempt: jittered backoff, at least the server's RetryInfo delay. */
export function retryDelayMs(retry: RetryOptions, backoffMs: number, serverDelayMs: number | undefined,
  random: () => number): number {
  const jittered = Math.min(backoffMs * (0.5 + 0.5 * random()), retry.maxBackoffMs);
  return serverDelayMs === undefined ? jittered : Math.max(jittered, serverDelayMs);
}

/** The interceptor that adds the metadata and retries unary calls (see the top of this file). */
export function callInterceptor(config: ClientConfig, hooks: RetryHooks = {}): Interceptor {
  const wait = hooks.sleep ?? sleep;
  const random = hooks.random ?? Math.random;
  return (next) => async (req) => {
    if (config.apiKey && !req.header.has("authorization")) req.header.set("authorization", `Bearer ${config.apiKey}`);
    if (config.tenantId && !req.header.has("x-tenant-id")) req.header.set("x-tenant-id", config.tenantId);
    if (!isReadOnly(req.method) && !req.header.has("x-idempotency-key")) req.header.set("x-idempotency-key", newId());
    if (req.stream) {
      // A stream's messages cannot be sent twice, and a server stream's reader decides what a retry means.
      req.header.set("x-request-id", newId());
      return next(req);
    }
    const retry = config.retry;
    let backoff = retry.initialBackoffMs;
    for (let attempt = 0; ; attempt++) {
      req.header.set("x-request-id", newId());
      try {
        return await next(req);
      } catch (e) {
        const err = ConnectError.from(e);
        if (!RETRYABLE.has(err.code) || attempt >= retry.count || req.signal.aborted) throw err;
        const typed = fromConnectError(err);
        if (typed instanceof QuotaExceededError) throw err; // waiting does not free a quota
        if (typed.retryAfterMs !== undefined && typed.retryAfterMs > retry.maxServerDelayMs) throw err;
        await wait(retryDelayMs(retry, backoff, typed.retryAfterMs, random), req.signal);
        backoff = Math.min(backoff * retry.multiplier, retry.maxBackoffMs);
      }
    }
  };
}

type AnyFn = (input: unknown, options?: CallOptions) => unknown;

/**
 * A streaming call whose errors are typed, and which is cancelled when the reader stops early (a `break` out of
 * `for await`), as the SDK cancels a call it stops reading. Its deadline (`timeoutMs`) is kept here rather than
 * by connect, whose timer would outlive a stream that is not read to its end; the server is told it as
 * grpc-timeout all the same.
 */
async function* cancellable(call: AnyFn, input: unknown, options: CallOptions = {}): AsyncGenerator<unknown> {
  const controller = new AbortController();
  const { timeoutMs, signal: outer, ...rest } = options;
  const onAbort = () => controller.abort(outer?.reason);
  if (outer?.aborted) controller.abort(outer.reason);
  outer?.addEventListener("abort", onAbort, { once: true });
  let timer: NodeJS.Timeout | undefined;
  const headers = new Headers(rest.headers);
  if (timeoutMs !== undefined) {
    timer = setTimeout(() => controller.abort(new ConnectError("the operation timed out", Code.DeadlineExceeded)),
      timeoutMs);
    headers.set("grpc-timeout", `${Math.max(1, Math.ceil(timeoutMs))}m`);
  }
  try {
    yield* call(input, { ...rest, headers, signal: controller.signal }) as AsyncIterable<unknown>;
  } catch (e) {
    throw toTenSafeError(controller.signal.aborted && controller.signal.reason instanceof ConnectError
      ? controller.signal.reason : e);
  } finally {
    clearTimeout(timer);
    outer?.removeEventListener("abort", onAbort);
    controller.abort();
  }
}

/**
 * A connect client for `service` whose calls throw TenSafeError subclasses; unary and client-streaming calls
 * get the configured timeout unless the call gives its own `timeoutMs`.
 */
function typedClient<S extends DescService>(service: S, transport: ReturnType<typeof createGrpcTransport>,
  timeoutMs: number): Client<S> {
  const inner = createClient(service, transport) as unknown as Record<string, AnyFn>;
  const out: Record<string, AnyFn> = {};
  for (const method of service.methods) {
    const call = inner[method.localName] as AnyFn;
    if (method.methodKind === "unary" || method.methodKind === "client_streaming") {
      out[method.localName] = async (input, options) => {
        try {
          return await call(input, { timeoutMs, ...options });
        } catch (e) {
          throw toTenSafeError(e);
        }
      };
    } else {
      out[method.localName] = (input, options) => cancellable(call, input, options);
    }
  }
  return out as unknown as Client<S>;
}

export interface TenSafeClientOptions extends ClientOptions {
  /** Retry hooks (tests). */
  retryHooks?: RetryHooks;
}

export interface AwaitFuturesOptions {
  /** Give up after this long (default: the client's timeout). */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** Throw the first failed or cancelled future's error, in submission order (default true). */
  throwOnFailure?: boolean;
}

const TERMINAL = new Set([FutureState.SUCCEEDED, FutureState.FAILED, FutureState.CANCELLED]);

/** One client for all six services, their health checks and reflection. Call close() when done. */
export class TenSafeClient {
  readonly config: ClientConfig;
  readonly trainer: Client<typeof TrainerService>;
  readonly accountant: Client<typeof AccountantService>;
  readonly he: Client<typeof HeService>;
  readonly vault: Client<typeof VaultService>;
  readonly ledger: Client<typeof LedgerService>;
  readonly inference: Client<typeof InferenceService>;
  /** grpc.health.v1.Health on the base URL (no API key needed). */
  readonly health: Client<typeof Health>;
  /** grpc.reflection.v1alpha.ServerReflection on the base URL (no API key needed). */
  readonly reflection: Client<typeof ServerReflection>;
  private readonly sessions = new Map<string, Http2SessionManager>();
  private readonly transports = new Map<string, ReturnType<typeof createGrpcTransport>>();

  constructor(options: TenSafeClientOptions = {}) {
    this.config = resolveConfig(options);
    const interceptor = callInterceptor(this.config, options.retryHooks);
    const client = <S extends DescService>(service: S, endpoint: Endpoint) =>
      typedClient(service, this.transport(endpoint, interceptor), this.config.timeoutMs);
    const ep = this.config.endpoints;
    this.trainer = client(TrainerService, ep.trainer);
    this.accountant = client(AccountantService, ep.accountant);
    this.he = client(HeService, ep.he);
    this.vault = client(VaultService, ep.vault);
    this.ledger = client(LedgerService, ep.ledger);
    this.inference = client(InferenceService, ep.inference);
    const base = parseEndpoint(this.config.baseUrl);
    this.health = client(Health, base);
    this.reflection = client(ServerReflection, base);
  }

  private transport(endpoint: Endpoint, interceptor: Interceptor): ReturnType<typeof createGrpcTransport> {
    const existing = this.transports.get(endpoint.url);
    if (existing) return existing;
    const nodeOptions: http2.SecureClientSessionOptions = {};
    if (endpoint.tls) {
      const cfg = this.config;
      if (Boolean(cfg.clientCertFile) !== Boolean(cfg.clientKeyFile)) {
        throw new Error("TS_CLIENT_CERT_FILE and TS_CLIENT_KEY_FILE must be set together");
      }
      if (cfg.caFile) nodeOptions.ca = readFileSync(cfg.caFile);
      if (cfg.clientCertFile && cfg.clientKeyFile) {
        nodeOptions.cert = readFileSync(cfg.clientCertFile);
        nodeOptions.key = readFileSync(cfg.clientKeyFile);
      }
    }
    const sessionManager = new Http2SessionManager(endpoint.url, { pingIntervalMs: 30_000 }, nodeOptions);
    this.sessions.set(endpoint.url, sessionManager);
    const transport = createGrpcTransport({
      baseUrl: endpoint.url, sessionManager, interceptors: [interceptor],
      readMaxBytes: MAX_MESSAGE_BYTES, writeMaxBytes: MAX_MESSAGE_BYTES,
    });
    this.transports.set(endpoint.url, transport);
    return transport;
  }

  /** Closes every HTTP/2 connection (open streams end with CANCELLED). */
  close(): void {
    for (const manager of this.sessions.values()) manager.abort();
    this.sessions.clear();
    this.transports.clear();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  /** Whether `service` (a full name such as "tensafe.api.trainer.v1.TrainerService"; "" = the server) serves. */
  async serving(service = ""): Promise<boolean> {
    const resp = await this.health.check({ service }, { timeoutMs: 5000 });
    return resp.status === HealthCheckResponse_ServingStatus.SERVING;
  }

  private async reflect(request: ServerReflectionRequest["messageRequest"]) {
    async function* one() {
      yield { messageRequest: request };
    }
    for await (const resp of this.reflection.serverReflectionInfo(one(), { timeoutMs: 10_000 })) {
      if (resp.messageResponse.case === "errorResponse") {
        const { errorCode, errorMessage } = resp.messageResponse.value;
        throw fromConnectError(new ConnectError(errorMessage, errorCode as Code));
      }
      return resp.messageResponse;
    }
    throw new ServiceUnavailableError("reflection answered nothing", {
      reason: "UNAVAILABLE", grpcCode: Code.Unavailable,
    });
  }

  /** The services the server lists by reflection. */
  async listServices(): Promise<string[]> {
    const resp = await this.reflect({ case: "listServices", value: "" });
    if (resp.case !== "listServicesResponse") throw new Error(`unexpected reflection answer ${resp.case}`);
    return resp.value.service.map((s) => s.name);
  }

  /** The file descriptors (the file first, then its imports) that define a fully qualified symbol. */
  async fileContainingSymbol(symbol: string): Promise<FileDescriptorProto[]> {
    const resp = await this.reflect({ case: "fileContainingSymbol", value: symbol });
    if (resp.case !== "fileDescriptorResponse") throw new Error(`unexpected reflection answer ${resp.case}`);
    return resp.value.fileDescriptorProto.map((b) => fromBinary(FileDescriptorProtoSchema, b));
  }

  /**
   * Waits for futures of one session through the WatchFutures stream and returns their final events, in the
   * order given. A failed or cancelled future throws its typed error (unless throwOnFailure is false).
   */
  async awaitFutures(refs: readonly FutureRef[], options: AwaitFuturesOptions = {}): Promise<FutureEvent[]> {
    if (refs.length === 0) return [];
    const sessionId = (refs[0] as FutureRef).sessionId;
    if (refs.some((r) => r.sessionId !== sessionId)) throw new RangeError("awaitFutures: futures of one session only");
    const wanted = new Set(refs.map((r) => r.futureId));
    const done = new Map<string, FutureEvent>();
    const controller = new AbortController();
    const cancel = () => controller.abort(options.signal?.reason);
    options.signal?.addEventListener("abort", cancel, { once: true });
    try {
      const stream = this.trainer.watchFutures({ sessionId, futureIds: [...wanted] },
        { signal: controller.signal, timeoutMs: options.timeoutMs ?? this.config.timeoutMs });
      for await (const { event } of stream) {
        if (event && wanted.has(event.futureId) && TERMINAL.has(event.state)) done.set(event.futureId, event);
        if (done.size === wanted.size) break;
      }
    } finally {
      options.signal?.removeEventListener("abort", cancel);
      controller.abort();
    }
    if (done.size !== wanted.size) {
      throw new ServiceUnavailableError(`WatchFutures ended with ${wanted.size - done.size} future(s) unfinished`, {
        reason: "UNAVAILABLE", grpcCode: Code.Unavailable,
      });
    }
    const events = refs.map((r) => done.get(r.futureId) as FutureEvent);
    if (options.throwOnFailure ?? true) {
      const failed = events.find((e) => e.state !== FutureState.SUCCEEDED);
      if (failed) {
        throw fromErrorDetail(failed.error ?? create(ErrorDetailSchema,
          { code: Code.Unknown, message: `future ${failed.futureId} ended ${FutureState[failed.state]}` }));
      }
    }
    return events;
  }

  /** The encrypted container of an artifact exactly as the vault stores it, and its description. */
  async pullArtifact(artifactId: string, options: CallOptions = {}): Promise<{ artifact: Artifact; data: Uint8Array }> {
    let artifact: Artifact | undefined;
    const chunks: Uint8Array[] = [];
    for await (const msg of this.vault.pullArtifact({ artifactId }, { timeoutMs: this.config.timeoutMs, ...options })) {
      if (msg.part.case === "artifact") artifact = msg.part.value;
      else if (msg.part.case === "chunk") chunks.push(msg.part.value);
    }
    if (!artifact) throw new Error(`PullArtifact of ${artifactId} sent no artifact description`);
    return { artifact, data: Buffer.concat(chunks) };
  }
}
