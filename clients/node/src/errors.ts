// Typed errors: the one translation of a failed call (a google.rpc.Status with its details) or a failed
// future (tensafe.api.common.v1.ErrorDetail) into a TenSafeError subclass, chosen by the server's reason.
//
// The services send every error as a google.rpc.Status in the gRPC trailer `grpc-status-details-bin`,
// carrying a google.rpc.ErrorInfo (reason = an ErrorReason name without "ERROR_REASON_", domain
// "tensafe.dev", string metadata such as "request_id", "field", "budget_id"), plus a google.rpc.RetryInfo
// for RATE_LIMITED and a google.rpc.BadRequest for INVALID_ARGUMENT. The Python SDK (sdk/tg_tinker) maps
// the same reasons to the same classes.
import { Code, ConnectError } from "@connectrpc/connect";
import { BadRequestSchema, ErrorInfoSchema, RetryInfoSchema } from "./gen/google/rpc/error_details_pb.js";
import type { ErrorDetail } from "./gen/tensafe/api/common/v1/common_pb.js";

/** gRPC status names, by code (as the SDK's `grpc_code` and grpcurl show them). */
const CODE_NAMES: Record<number, string> = {
  [Code.Canceled]: "CANCELLED",
  [Code.Unknown]: "UNKNOWN",
  [Code.InvalidArgument]: "INVALID_ARGUMENT",
  [Code.DeadlineExceeded]: "DEADLINE_EXCEEDED",
  [Code.NotFound]: "NOT_FOUND",
  [Code.AlreadyExists]: "ALREADY_EXISTS",
  [Code.PermissionDenied]: "PERMISSION_DENIED",
  [Code.ResourceExhausted]: "RESOURCE_EXHAUSTED",
  [Code.FailedPrecondition]: "FAILED_PRECONDITION",
  [Code.Aborted]: "ABORTED",
  [Code.OutOfRange]: "OUT_OF_RANGE",
  [Code.Unimplemented]: "UNIMPLEMENTED",
  [Code.Internal]: "INTERNAL",
  [Code.Unavailable]: "UNAVAILABLE",
  [Code.DataLoss]: "DATA_LOSS",
  [Code.Unauthenticated]: "UNAUTHENTICATED",
};

export function codeName(code: Code): string {
  return CODE_NAMES[code] ?? "UNKNOWN";
}

export interface TenSafeErrorInit {
  /** The server's reason (e.g. "DP_BUDGET_EXCEEDED"), or the gRPC status name when it gave none. */
  reason: string;
  /** The gRPC status code. */
  grpcCode: Code;
  /** ErrorInfo.metadata: string attributes of the reason (e.g. "budget_id", "quota", "field"). */
  metadata?: Record<string, string>;
  /** The invalid field (BadRequest, or metadata "field"), for INVALID_ARGUMENT. */
  field?: string | undefined;
  /** The server's RetryInfo delay in milliseconds (RATE_LIMITED). */
  retryAfterMs?: number | undefined;
  cause?: unknown;
}

/** Base of every error this client raises for a failed call or future. */
export class TenSafeError extends Error {
  readonly reason: string;
  readonly grpcCode: Code;
  readonly metadata: Readonly<Record<string, string>>;
  readonly field: string | undefined;
  readonly retryAfterMs: number | undefined;
  /** Identifies the call in the server's logs and audit ledger. */
  readonly requestId: string | undefined;

  constructor(message: string, init: TenSafeErrorInit) {
    super(message, init.cause === undefined ? undefined : { cause: init.cause });
    this.name = new.target.name;
    this.reason = init.reason;
    this.grpcCode = init.grpcCode;
    this.metadata = { ...(init.metadata ?? {}) };
    this.field = init.field ?? this.metadata["field"];
    this.retryAfterMs = init.retryAfterMs;
    this.requestId = this.metadata["request_id"];
  }

  /** The gRPC status name, e.g. "FAILED_PRECONDITION". */
  get grpcCodeName(): string {
    return codeName(this.grpcCode);
  }

  override toString(): string {
    const suffix = this.requestId ? ` (request id ${this.requestId})` : "";
    return `${this.name}: [${this.reason}] ${this.message}${suffix}`;
  }
}

/** The API key is missing, malformed, unknown, revoked or expired. */
export class AuthenticationError extends TenSafeError {}
/** The key is valid but may not do this (e.g. x-tenant-id names another tenant). */
export class PermissionDeniedError extends TenSafeError {}
/** The resource does not exist for your tenant. */
export class NotFoundError extends TenSafeError {}
/** A value is invalid; `field` names it. */
export class ValidationError extends TenSafeError {}
/** The request conflicts with the resource's state (already exists, or a precondition failed). */
export class ConflictError extends TenSafeError {}
/** Too many requests for your tenant; retried by the client after `retryAfterMs`. */
export class RateLimitedError extends TenSafeError {}
/** A per-tenant quota or per-call cap is reached (metadata "quota", "limit"); never retried. */
export class QuotaExceededError extends TenSafeError {
  get quota(): string | undefined {
    return this.metadata["quota"];
  }
}
/** The DP step would spend more privacy budget than the target epsilon allows; nothing was recorded. */
export class DPBudgetExceededError extends TenSafeError {
  get budgetId(): string | undefined {
    return this.metadata["budget_id"];
  }
}
/** Stored or transferred data failed an integrity check. */
export class IntegrityError extends TenSafeError {}
/** The operation (a future) was cancelled before it ran. */
export class FutureCancelledError extends TenSafeError {}
/** The service (or a service it needs) could not be reached, or the call timed out. */
export class ServiceUnavailableError extends TenSafeError {}
/** The call's deadline cannot fit its work; metadata "hint" says what to do. */
export class DeadlineTooShortError extends ServiceUnavailableError {
  get hint(): string | undefined {
    return this.metadata["hint"];
  }
}
/** The server failed, or does not implement the call. */
export class ServerError extends TenSafeError {}

type ErrorClass = new (message: string, init: TenSafeErrorInit) => TenSafeError;

/** ErrorReason name (without "ERROR_REASON_") -> class; the same table as sdk/tg_tinker/_transport.py. */
export const REASON_TO_ERROR: Readonly<Record<string, ErrorClass>> = {
  API_KEY_MISSING: AuthenticationError,
  API_KEY_INVALID: AuthenticationError,
  API_KEY_REVOKED: AuthenticationError,
  API_KEY_EXPIRED: AuthenticationError,
  TENANT_MISMATCH: PermissionDeniedError,
  PERMISSION_DENIED: PermissionDeniedError,
  RESOURCE_NOT_FOUND: NotFoundError,
  INVALID_ARGUMENT: ValidationError,
  INSECURE_PARAMETERS: ValidationError,
  SECRET_KEY_REFUSED: ValidationError,
  ALREADY_EXISTS: ConflictError,
  FAILED_PRECONDITION: ConflictError,
  RATE_LIMITED: RateLimitedError,
  QUOTA_EXCEEDED: QuotaExceededError,
  DP_BUDGET_EXCEEDED: DPBudgetExceededError,
  DP_BATCH_IMPLAUSIBLE: ConflictError,
  INTEGRITY_ERROR: IntegrityError,
  TENANT_SHREDDED: ConflictError,
  FUTURE_CANCELLED: FutureCancelledError,
  DEPENDENCY_UNAVAILABLE: ServiceUnavailableError,
  DEADLINE_TOO_SHORT: DeadlineTooShortError,
  NOT_IMPLEMENTED: ServerError,
  INTERNAL: ServerError,
};

/** gRPC code -> class, when the reason is absent or unknown (as the protos ask of clients). */
const CODE_TO_ERROR: Partial<Record<Code, ErrorClass>> = {
  [Code.Unauthenticated]: AuthenticationError,
  [Code.PermissionDenied]: PermissionDeniedError,
  [Code.NotFound]: NotFoundError,
  [Code.InvalidArgument]: ValidationError,
  [Code.OutOfRange]: ValidationError,
  [Code.AlreadyExists]: ConflictError,
  [Code.FailedPrecondition]: ConflictError,
  [Code.Aborted]: ConflictError,
  [Code.ResourceExhausted]: RateLimitedError,
  [Code.Unavailable]: ServiceUnavailableError,
  [Code.DeadlineExceeded]: ServiceUnavailableError,
  [Code.Canceled]: FutureCancelledError,
  [Code.DataLoss]: IntegrityError,
};

function makeError(message: string, init: TenSafeErrorInit): TenSafeError {
  const known = init.reason in REASON_TO_ERROR ? REASON_TO_ERROR[init.reason] : undefined;
  const cls = known ?? CODE_TO_ERROR[init.grpcCode] ?? ServerError;
  return new cls(message || codeName(init.grpcCode), init);
}

/** A failed call as a typed error, from the google.rpc.Status details the server attached. */
export function fromConnectError(err: ConnectError): TenSafeError {
  let reason: string | undefined;
  let metadata: Record<string, string> = {};
  let field: string | undefined;
  let retryAfterMs: number | undefined;
  const [info] = err.findDetails(ErrorInfoSchema);
  if (info) {
    reason = info.reason || undefined;
    metadata = { ...info.metadata };
  }
  const [retry] = err.findDetails(RetryInfoSchema);
  if (retry?.retryDelay) {
    retryAfterMs = Number(retry.retryDelay.seconds) * 1000 + retry.retryDelay.nanos / 1e6;
  } else if (metadata["retry_after_s"] !== undefined) {
    retryAfterMs = Number(metadata["retry_after_s"]) * 1000;
  }
  const [bad] = err.findDetails(BadRequestSchema);
  field = bad?.fieldViolations[0]?.field || undefined;
  let message = err.rawMessage;
  if (err.code === Code.Unavailable && !reason) {
    message = `service unavailable: ${message}`;
  }
  return makeError(message, {
    reason: reason ?? codeName(err.code), grpcCode: err.code, metadata, field, retryAfterMs, cause: err,
  });
}

/** A failed or cancelled future (FutureEvent.error) as a typed error. */
export function fromErrorDetail(detail: ErrorDetail): TenSafeError {
  const grpcCode = detail.code as Code;
  return makeError(detail.message, {
    reason: detail.reason || codeName(grpcCode), grpcCode, metadata: { ...detail.metadata },
  });
}

/** Anything a call threw, as a TenSafeError (a non-gRPC failure becomes UNKNOWN). */
export function toTenSafeError(err: unknown): TenSafeError {
  if (err instanceof TenSafeError) {
    return err;
  }
  return fromConnectError(ConnectError.from(err));
}
