// Client settings, as the Python SDK reads them: options win over the environment.
//
//   TS_BASE_URL         where the services listen (default localhost:50051); TS_<SERVICE>_URL per service
//   TS_API_KEY          sent as `authorization: Bearer <key>` on every call
//   TS_TENANT_ID        optional; sent as x-tenant-id (the server refuses a key of another tenant)
//   TS_TIMEOUT          seconds per unary call (default 300); streams have no default deadline
//   TS_RETRY_COUNT      extra attempts on UNAVAILABLE / RESOURCE_EXHAUSTED (default 3)
//   TS_CA_FILE, TS_CLIENT_CERT_FILE, TS_CLIENT_KEY_FILE   TLS: the CA, and a client certificate for mTLS
//
// URL forms (the SDK's): host:port, [ipv6]:port, http://host[:port] (plaintext, port 80),
// https://host[:port] (TLS, 443), grpc://host:port (plaintext), grpcs://host[:port] (TLS, 443).
import { ValidationError } from "./errors.js";
import { Code } from "@connectrpc/connect";

export const SERVICE_NAMES = ["trainer", "accountant", "he", "vault", "ledger", "inference"] as const;
export type ServiceName = (typeof SERVICE_NAMES)[number];

export const DEFAULT_BASE_URL = "localhost:50051";

export interface RetryOptions {
  /** Extra attempts after the first (default 3; 0 disables retries). */
  count: number;
  initialBackoffMs: number;
  maxBackoffMs: number;
  multiplier: number;
  /** A server RetryInfo delay above this is not waited for: the error is raised at once (default 60 s). */
  maxServerDelayMs: number;
}

export const DEFAULT_RETRY: RetryOptions = {
  count: 3, initialBackoffMs: 200, maxBackoffMs: 5000, multiplier: 2, maxServerDelayMs: 60_000,
};

export interface Endpoint {
  /** host:port, as gRPC targets are written. */
  target: string;
  tls: boolean;
  /** The URL the HTTP/2 transport connects to: http://host:port or https://host:port. */
  url: string;
}

export interface ClientOptions {
  apiKey?: string;
  baseUrl?: string;
  tenantId?: string;
  /** Per-service URLs, e.g. { vault: "vault.internal:50054" }; TS_VAULT_URL etc. otherwise. */
  endpoints?: Partial<Record<ServiceName, string>>;
  timeoutMs?: number;
  retry?: Partial<RetryOptions>;
  caFile?: string;
  clientCertFile?: string;
  clientKeyFile?: string;
  /** Read instead of process.env (tests). */
  env?: Record<string, string | undefined>;
}

export interface ClientConfig {
  apiKey: string | undefined;
  tenantId: string | undefined;
  baseUrl: string;
  endpoints: Record<ServiceName, Endpoint>;
  timeoutMs: number;
  retry: RetryOptions;
  caFile: string | undefined;
  clientCertFile: string | undefined;
  clientKeyFile: string | undefined;
}

const SCHEMES: Record<string, { tls: boolean; port: number | undefined }> = {
  grpc: { tls: false, port: undefined }, http: { tls: false, port: 80 },
  grpcs: { tls: true, port: 443 }, https: { tls: true, port: 443 },
};
const ACCEPTED = "host:port, [ipv6]:port, http://host[:port], https://host[:port], grpc://host:port, " +
  "grpcs://host[:port]";
const LABEL = /^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$/;
const IPV6 = /^[0-9A-Fa-f:.]+$/;

function invalid(field: string, message: string): ValidationError {
  return new ValidationError(message, { reason: "INVALID_ARGUMENT", grpcCode: Code.InvalidArgument, field });
}

/** Parse a URL as users paste it (the SDK's forms); anything else is a ValidationError naming `field`. */
export function parseEndpoint(url: string, field = "baseUrl"): Endpoint {
  const refuse = (why: string) => {
    const shown = url.includes("@") ? `***@${url.slice(url.lastIndexOf("@") + 1)}` : url;
    return invalid(field, `${field}=${JSON.stringify(shown.slice(0, 120))}: ${why}; accepted forms: ${ACCEPTED}`);
  };
  let rest = url.trim();
  if (!rest) throw refuse("empty URL");
  if (/[\s\p{Cc}]/u.test(rest)) throw refuse("whitespace or control characters inside the URL");
  let tls = false;
  let defaultPort: number | undefined;
  const sep = rest.indexOf("://");
  if (sep >= 0) {
    const scheme = rest.slice(0, sep).toLowerCase();
    const known = SCHEMES[scheme];
    if (!known) throw refuse(`unknown scheme ${JSON.stringify(scheme)}`);
    ({ tls, port: defaultPort } = known);
    rest = rest.slice(sep + 3);
  }
  rest = rest.replace(/\/+$/, "");
  for (const [char, what] of [["@", "user-info is not accepted"], ["/", "a path is not accepted"],
    ["?", "a query is not accepted"], ["#", "a fragment is not accepted"]] as const) {
    if (rest.includes(char)) throw refuse(what);
  }
  let host: string;
  let port: string | undefined;
  if (rest.startsWith("[")) {
    const close = rest.indexOf("]");
    if (close < 0) throw refuse("unclosed '[' in an IPv6 address");
    const inner = rest.slice(1, close);
    if (!IPV6.test(inner) || !inner.includes(":")) throw refuse(`${JSON.stringify(inner)} is not an IPv6 address`);
    const tail = rest.slice(close + 1);
    if (tail && !tail.startsWith(":")) throw refuse("expected :port after ']'");
    host = `[${inner}]`;
    port = tail ? tail.slice(1) : undefined;
  } else {
    if ((rest.match(/:/g) ?? []).length > 1) throw refuse("an IPv6 address needs brackets, e.g. [::1]:50051");
    const colon = rest.indexOf(":");
    host = colon >= 0 ? rest.slice(0, colon) : rest;
    port = colon >= 0 ? rest.slice(colon + 1) : undefined;
    if (!host) throw refuse("no host");
    const labels = (host.endsWith(".") ? host.slice(0, -1) : host).split(".");
    if (host.length > 253 || !labels.every((l) => LABEL.test(l))) {
      throw refuse(`${JSON.stringify(host)} is not a host name or IPv4 address`);
    }
  }
  let number: number;
  if (port === undefined) {
    if (defaultPort === undefined) throw refuse(sep < 0 ? "no port" : "this scheme needs a port");
    number = defaultPort;
  } else if (!/^[0-9]{1,5}$/.test(port) || Number(port) < 1 || Number(port) > 65535) {
    throw refuse(port ? `port ${JSON.stringify(port.slice(0, 12))} is not in 1-65535` : "empty port");
  } else {
    number = Number(port);
  }
  const target = `${host}:${number}`;
  return { target, tls, url: `${tls ? "https" : "http"}://${target}` };
}

function positiveNumber(raw: string, field: string): number {
  const value = Number(raw);
  if (!Number.isFinite(value) || value <= 0) throw invalid(field, `${field}=${JSON.stringify(raw)} is not a positive number`);
  return value;
}

/** Resolve options and environment into the settings every call uses. */
export function resolveConfig(options: ClientOptions = {}): ClientConfig {
  const env = options.env ?? process.env;
  const pick = (value: string | undefined, name: string) => value ?? (env[name] || undefined);
  const base = options.baseUrl ?? (env["TS_BASE_URL"] || DEFAULT_BASE_URL);
  const baseField = options.baseUrl !== undefined ? "baseUrl" : "TS_BASE_URL";
  parseEndpoint(base, baseField);
  const endpoints = {} as Record<ServiceName, Endpoint>;
  for (const name of SERVICE_NAMES) {
    const explicit = options.endpoints?.[name];
    const envName = `TS_${name.toUpperCase()}_URL`;
    if (explicit !== undefined) endpoints[name] = parseEndpoint(explicit, `endpoints.${name}`);
    else if (env[envName]) endpoints[name] = parseEndpoint(env[envName] as string, envName);
    else endpoints[name] = parseEndpoint(base, baseField);
  }
  let timeoutMs = options.timeoutMs;
  if (timeoutMs === undefined) {
    timeoutMs = env["TS_TIMEOUT"] ? positiveNumber(env["TS_TIMEOUT"], "TS_TIMEOUT") * 1000 : 300_000;
  } else if (!(timeoutMs > 0)) {
    throw invalid("timeoutMs", "timeoutMs must be positive");
  }
  const retry = { ...DEFAULT_RETRY, ...(options.retry ?? {}) };
  if (options.retry?.count === undefined && env["TS_RETRY_COUNT"]) {
    const raw = env["TS_RETRY_COUNT"];
    if (!/^[0-9]+$/.test(raw)) throw invalid("TS_RETRY_COUNT", `TS_RETRY_COUNT=${JSON.stringify(raw)} is not an integer >= 0`);
    retry.count = Number(raw);
  }
  if (!Number.isInteger(retry.count) || retry.count < 0) throw invalid("retry.count", "retry.count must be an integer >= 0");
  return {
    apiKey: pick(options.apiKey, "TS_API_KEY"),
    tenantId: pick(options.tenantId, "TS_TENANT_ID"),
    baseUrl: base,
    endpoints,
    timeoutMs,
    retry,
    caFile: pick(options.caFile, "TS_CA_FILE"),
    clientCertFile: pick(options.clientCertFile, "TS_CLIENT_CERT_FILE"),
    clientKeyFile: pick(options.clientKeyFile, "TS_CLIENT_KEY_FILE"),
  };
}
