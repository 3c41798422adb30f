#!/usr/bin/env node
// Generate the TypeScript code in src/gen from ../../protos (and proto/) with buf and the local
// protoc-gen-es plugin (node_modules/.bin), as buf.gen.yaml says.
//
//   node scripts/generate.mjs           # regenerate src/gen
//   node scripts/generate.mjs --check   # exit 1 if src/gen differs from a fresh generation
//
// buf is the repository's pinned one (the root package.json: `npm ci` at the repository root), or
// $BUF. The output depends only on the .proto files and the versions of buf and protoc-gen-es, so
// the committed code can be checked in CI, as scripts/gen_protos.py --check does for Python.
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { delimiter, dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const generated = "src/gen";

function buf() {
  const candidate = process.env.BUF || resolve(here, "../../node_modules/.bin/buf");
  if (!existsSync(candidate)) {
    console.error(`generate: buf not found at ${candidate}; run \`npm ci\` at the repository root (or set BUF)`);
    process.exit(2);
  }
  return candidate;
}

function plugin() {
  const bin = join(here, "node_modules", ".bin");
  if (!existsSync(join(bin, "protoc-gen-es"))) {
    console.error("generate: protoc-gen-es not found; run `npm ci` in clients/node");
    process.exit(2);
  }
  return bin;
}

function generate(outputBase) {
  const args = ["generate", ...(outputBase ? ["--output", outputBase] : [])];
  const env = { ...process.env, PATH: plugin() + delimiter + (process.env.PATH ?? "") };
  const run = spawnSync(buf(), args, { cwd: here, env, encoding: "utf8" });
  if (run.status !== 0) {
    process.stderr.write((run.stdout ?? "") + (run.stderr ?? ""));
    console.error(`generate: buf generate failed (exit ${run.status})`);
    process.exit(2);
  }
}

function tree(root) {
  const files = new Map();
  const walk = (dir) => {
    if (!existsSync(dir)) return;
    for (const name of readdirSync(dir)) {
      const path = join(dir, name);
      if (statSync(path).isDirectory()) walk(path);
      else files.set(relative(root, path).split("\\").join("/"), path);
    }
  };
  walk(root);
  return files;
}

function check() {
  const tmp = mkdtempSync(join(tmpdir(), "tensafe-node-gen-"));
  try {
    generate(tmp);
    const fresh = tree(join(tmp, generated));
    const committed = tree(join(here, generated));
    const problems = [];
    for (const rel of [...new Set([...fresh.keys(), ...committed.keys()])].sort()) {
      const shown = `clients/node/${generated}/${rel}`;
      if (!committed.has(rel)) problems.push(`missing: ${shown}`);
      else if (!fresh.has(rel)) problems.push(`extra:   ${shown}`);
      else if (!readFileSync(fresh.get(rel)).equals(readFileSync(committed.get(rel)))) problems.push(`differs: ${shown}`);
    }
    if (problems.length) {
      console.log("Generated TypeScript is stale; run `npm run generate` in clients/node (or `make proto`):");
      for (const line of problems) console.log(`  ${line}`);
      return 1;
    }
    console.log(`Generated TypeScript is up to date (${fresh.size} files).`);
    return 0;
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

if (process.argv.includes("--check")) {
  process.exit(check());
}
generate(null);
console.log(`Wrote ${tree(join(here, generated)).size} files to clients/node/${generated}`);
