// The live stack the tests talk to. TS_BASE_URL and TS_API_KEY, when both are set, name a running one (as for
// the SDK; TS_TEST_MODEL names a model under its TENSAFE_MODEL_DIR, default "tiny"). Otherwise the tests
// start their own `tensafe up` on a free loopback port with a temporary data dir, the tiny Llama model of
// tests/tiny_model.py built into it, and an API key of a new tenant from `tensafe keys create`.
//
//   TENSAFE_CLI     JSON array: the command that runs the tensafe CLI (default [<repo>/.venv/bin/python, "-m",
//                   "tensafe.cli"]); tests/test_node_client.py passes the suite's own.
//   TENSAFE_PYTHON  the Python that builds the tiny model (default: TENSAFE_CLI's first element).
//   TENSAFE_NODE_SERVER_ENV  JSON object of extra server settings (see serverEnv).
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { SERVICES, TenSafeClient } from "../src/index.js";

export interface LiveStack {
  baseUrl: string;
  apiKey: string;
  /** The tenant of apiKey, when the tests created it. */
  tenant: string | undefined;
  modelRef: string;
  /** Stops the stack the tests started (its exit code; 0 for an external one). */
  stop(): Promise<number>;
  /** The server's log so far (empty for an external stack). */
  log(): string;
}

function repoRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!(existsSync(join(dir, "protos")) && existsSync(join(dir, "pyproject.toml")))) {
    const up = dirname(dir);
    if (up === dir) throw new Error("the TenSafe repository root (protos/, pyproject.toml) is not above this file");
    dir = up;
  }
  return dir;
}

function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const srv = createServer();
    srv.once("error", rej);
    srv.listen(0, "127.0.0.1", () => {
      const address = srv.address();
      const port = typeof address === "object" && address ? address.port : 0;
      srv.close(() => res(port));
    });
  });
}

/**
 * The environment of a server the tests start: none of the caller's TENSAFE_* / TS_* settings, quiet, and no HTTP
 * edge (metrics, OpenAI, Tinker) on a fixed port, so that stacks can run side by side. TENSAFE_NODE_SERVER_ENV (a
 * JSON object; tests/test_node_client.py passes the Python suite's own server settings) is applied on top.
 */
function serverEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (!k.startsWith("TENSAFE_") && !k.startsWith("TS_")) env[k] = v;
  }
  const suite = process.env["TENSAFE_NODE_SERVER_ENV"];
  return { ...env, TENSAFE_METRICS_PORT: "0", TENSAFE_OPENAI_PORT: "0", TENSAFE_TINKER_PORT: "0",
    TENSAFE_LOG_LEVEL: "WARNING", PYTHONUNBUFFERED: "1", TENSAFE_GRACE_SECONDS: "10",
    ...(suite ? (JSON.parse(suite) as Record<string, string>) : {}), ...extra };
}

function run(cmd: string[], env: NodeJS.ProcessEnv, what: string): string {
  const out = spawnSync(cmd[0] as string, cmd.slice(1), { env, encoding: "utf8", timeout: 120_000 });
  if (out.status !== 0) {
    throw new Error(`${what} failed (exit ${out.status}, ${out.error ?? ""}):\n${out.stdout}\n${out.stderr}`);
  }
  return out.stdout;
}

function exited(child: ChildProcess): Promise<number> {
  return new Promise((res) => {
    if (child.exitCode !== null || child.signalCode !== null) res(child.exitCode ?? 128);
    else child.once("exit", (code, signal) => res(code ?? (signal ? 128 : 0)));
  });
}

export async function liveStack(): Promise<LiveStack> {
  const modelRef = process.env["TS_TEST_MODEL"] || "tiny";
  if (process.env["TS_BASE_URL"] && process.env["TS_API_KEY"]) {
    return { baseUrl: process.env["TS_BASE_URL"], apiKey: process.env["TS_API_KEY"], tenant: undefined, modelRef,
      stop: async () => 0, log: () => "" };
  }
  const root = repoRoot();
  const cli: string[] = process.env["TENSAFE_CLI"]
    ? JSON.parse(process.env["TENSAFE_CLI"])
    : [join(root, ".venv", "bin", "python"), "-m", "tensafe.cli"];
  const python = process.env["TENSAFE_PYTHON"] || (cli[0] as string);
  const tmp = mkdtempSync(join(tmpdir(), "tensafe-node-"));
  const dataDir = join(tmp, "data");
  const models = join(tmp, "models");
  const env = serverEnv({ TENSAFE_MODEL_DIR: models });
  // The model is read when a session or a generation first names it, so it is built while the stack starts.
  const build = spawn(python, ["-c",
    "import sys; sys.path.insert(0, sys.argv[1]); from tiny_model import build_tiny_model; build_tiny_model(sys.argv[2])",
    join(root, "tests"), join(models, modelRef)], { env, stdio: ["ignore", "ignore", "pipe"] });
  let buildErr = "";
  build.stderr?.on("data", (d: Buffer) => { buildErr += d.toString(); });
  const port = await freePort();
  const logPath = join(tmp, "up.log");
  const logFd = openSync(logPath, "w");
  const child = spawn(cli[0] as string, [...cli.slice(1), "up", "--data-dir", dataDir, "--port", String(port)],
    { env, cwd: root, stdio: ["ignore", logFd, logFd] });
  closeSync(logFd);
  const log = () => (existsSync(logPath) ? readFileSync(logPath, "utf8") : "");
  const exit = exited(child);
  let stopped: Promise<number> | undefined;
  const stop = () => {
    stopped ??= (async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 60_000);
      const code = await exit;
      clearTimeout(timer);
      rmSync(tmp, { recursive: true, force: true });
      return code;
    })();
    return stopped;
  };
  process.once("exit", () => child.kill("SIGKILL")); // never leave a server behind
  try {
    const baseUrl = `127.0.0.1:${port}`;
    await waitServing(baseUrl, child, log);
    const [buildCode] = await Promise.all([exited(build)]);
    if (buildCode !== 0) throw new Error(`building the tiny model failed:\n${buildErr}`);
    const tenant = `node-${randomBytes(4).toString("hex")}`;
    const out = run([...cli, "keys", "create", "--data-dir", dataDir, "--tenant", tenant], env, "tensafe keys create");
    const apiKey = out.trim().split("\n").at(-1) as string;
    return { baseUrl, apiKey, tenant, modelRef, stop, log };
  } catch (e) {
    build.kill("SIGKILL");
    await stop();
    throw e;
  }
}

/** Until every service's health check answers SERVING (120 s at most: CI machines are busy), through this client. */
async function waitServing(baseUrl: string, child: ChildProcess, log: () => string): Promise<void> {
  const client = new TenSafeClient({ baseUrl, env: {}, retry: { count: 0 } });
  const started = Date.now();
  const deadline = started + 120_000;
  const pending = Object.values(SERVICES).map((s) => s.typeName);
  try {
    while (pending.length) {
      if (child.exitCode !== null) throw new Error(`tensafe up exited with ${child.exitCode}:\n${log()}`);
      if (Date.now() > deadline) throw new Error(`${pending.join(", ")} not serving after 120 s:\n${log()}`);
      try {
        if (await client.serving(pending[0])) {
          pending.shift();
          continue;
        }
      } catch {
        // not listening yet
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  } finally {
    client.close();
  }
}

export const REPO_ROOT = resolve(repoRoot());
