// The TypeScript client against a live `tensafe up` (test/stack.ts: a running one named by TS_BASE_URL and
// TS_API_KEY, else one these tests start). The tests share one session, one artifact and one budget, in order.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Code } from "@connectrpc/connect";
import {
  AuthenticationError, DPBudgetExceededError, Dtype, NotFoundError, SERVICES, TenSafeClient, ValidationError,
  accountant, common, inference, tensor, tensorValues, trainer,
} from "../src/index.js";
import { liveStack, type LiveStack } from "./stack.js";

let stack: LiveStack;
let client: TenSafeClient;

before(async () => {
  stack = await liveStack();
  client = new TenSafeClient({ baseUrl: stack.baseUrl, apiKey: stack.apiKey, env: {} });
});

after(async () => {
  client?.close();
  const code = await stack?.stop();
  assert.equal(code, 0, `tensafe up did not stop cleanly:\n${stack?.log()}`);
});

/** Polls `check` until it returns a value (30 s at most); for what arrives later, such as audit entries. */
async function eventually<T>(check: () => Promise<T | undefined>, what: string): Promise<T> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const value = await check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`${what} not seen within 30 s`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

describe("health and reflection", () => {
  test("every service answers its health check SERVING, without an API key", async () => {
    const anonymous = new TenSafeClient({ baseUrl: stack.baseUrl, env: {} });
    try {
      for (const service of Object.values(SERVICES)) {
        assert.equal(await anonymous.serving(service.typeName), true, service.typeName);
      }
      assert.equal(await anonymous.serving(""), true);
    } finally {
      anonymous.close();
    }
  });

  test("reflection lists the six services and describes them as the generated code does", async () => {
    const listed = await client.listServices();
    for (const service of Object.values(SERVICES)) assert.ok(listed.includes(service.typeName), service.typeName);
    for (const service of Object.values(SERVICES)) {
      const [file] = await client.fileContainingSymbol(service.typeName);
      assert.ok(file, service.typeName);
      const served = file.service.find((s) => `${file.package}.${s.name}` === service.typeName);
      assert.ok(served, `${service.typeName} is not in ${file.name}`);
      // The server's contract and this client's generated code name the same methods, types and streaming.
      assert.deepEqual(
        served.method.map((m) => [m.name, m.inputType, m.outputType, m.clientStreaming, m.serverStreaming]),
        service.methods.map((m) => [m.name, `.${m.input.typeName}`, `.${m.output.typeName}`,
          m.methodKind === "client_streaming" || m.methodKind === "bidi_streaming",
          m.methodKind === "server_streaming" || m.methodKind === "bidi_streaming"]));
    }
  });
});

describe("authentication and errors", () => {
  test("a call without an API key is UNAUTHENTICATED, reason API_KEY_MISSING", async () => {
    const anonymous = new TenSafeClient({ baseUrl: stack.baseUrl, env: {} });
    try {
      await assert.rejects(anonymous.trainer.listSessions({}), (err: unknown) => {
        assert.ok(err instanceof AuthenticationError, String(err));
        assert.equal(err.grpcCode, Code.Unauthenticated);
        assert.equal(err.grpcCodeName, "UNAUTHENTICATED");
        assert.equal(err.reason, "API_KEY_MISSING");
        assert.match(err.requestId ?? "", /^[0-9a-f]{32}$/);
        return true;
      });
    } finally {
      anonymous.close();
    }
  });

  test("a forged key is UNAUTHENTICATED, reason API_KEY_INVALID", async () => {
    const forged = new TenSafeClient({ baseUrl: stack.baseUrl, apiKey: `${stack.apiKey.slice(0, -4)}AAAA`, env: {} });
    try {
      await assert.rejects(forged.accountant.listBudgets({}), (err: unknown) =>
        err instanceof AuthenticationError && err.reason === "API_KEY_INVALID");
    } finally {
      forged.close();
    }
  });

  test("an invalid field is a ValidationError naming the field (google.rpc.BadRequest)", async () => {
    await assert.rejects(
      client.accountant.createBudget({ sessionId: "sess_0123456789abcdef", targetEpsilon: 0, targetDelta: 1e-5,
        sampleRate: 0.01 }),
      (err: unknown) => {
        assert.ok(err instanceof ValidationError, String(err));
        assert.equal(err.reason, "INVALID_ARGUMENT");
        assert.equal(err.field, "target_epsilon");
        return true;
      });
  });

  test("another tenant's (or no) resource is NOT_FOUND", async () => {
    await assert.rejects(client.accountant.getBudget({ budgetId: "bud_0123456789abcdef" }),
      (err: unknown) => err instanceof NotFoundError && err.reason === "RESOURCE_NOT_FOUND");
  });
});

describe("a training session on the tiny model", () => {
  let session: trainer.Session;
  let saved: trainer.SaveStateResult;
  const rows = [[1n, 17n, 42n, 99n, 123n, 200n, 7n, 2n], [1n, 55n, 66n, 77n, 88n, 99n, 111n, 2n]];
  const batch = () => ({
    inputIds: tensor(Dtype.INT64, rows),
    attentionMask: tensor(Dtype.INT64, rows.map((r) => r.map(() => 1n))),
    labels: tensor(Dtype.INT64, rows),
  });

  test("CreateSession, ForwardBackward + OptimStep, results read from WatchFutures", async () => {
    const created = await client.trainer.createSession({ config: {
      modelRef: stack.modelRef, batchSize: 2, seed: 0n,
      loraConfig: { rank: 4, alpha: 8, targetModules: ["q_proj", "v_proj"] },
      optimizer: { name: "adamw", learningRate: 0.01 },
    } });
    assert.ok(created.session);
    session = created.session;
    assert.equal(session.state, trainer.SessionState.ACTIVE);
    assert.equal(session.config?.modelRef, stack.modelRef);

    const fb = await client.trainer.forwardBackward({ sessionId: session.sessionId, batch: batch(),
      returnLogprobs: true });
    const step = await client.trainer.optimStep({ sessionId: session.sessionId });
    const after = await client.trainer.forward({ sessionId: session.sessionId, batch: batch() });
    assert.ok(fb.future && step.future && after.future);
    assert.deepEqual([fb.future.sequence, step.future.sequence, after.future.sequence], [1n, 2n, 3n]);
    const [fbEvent, stepEvent, afterEvent] = await client.awaitFutures([fb.future, step.future, after.future]);

    assert.equal(fbEvent?.state, trainer.FutureState.SUCCEEDED);
    assert.equal(fbEvent?.result.case, "forwardBackward");
    const fbResult = fbEvent.result.value as trainer.ForwardBackwardResult;
    assert.ok(Number.isFinite(fbResult.loss) && fbResult.loss > 0, `loss ${fbResult.loss}`);
    assert.equal(fbResult.numSequences, 2n);
    // Causal LM: each row's first label predicts nothing, so 2 rows of 8 give 14 tokens.
    assert.equal(fbResult.numTokens, 14n);
    // The log-probabilities come back as a float32 tensor [batch, seq] of little-endian bytes.
    assert.ok(fbResult.logprobs);
    assert.equal(fbResult.logprobs.dtype, Dtype.FLOAT32);
    const { shape, values } = tensorValues(fbResult.logprobs);
    assert.deepEqual(shape, [2, 8]);
    assert.ok(values.every((v) => typeof v === "number" && v <= 0), "log-probabilities are <= 0");

    assert.equal(stepEvent?.result.case, "optimStep");
    assert.equal((stepEvent.result.value as trainer.OptimStepResult).step, 1n);
    assert.ok((stepEvent.result.value as trainer.OptimStepResult).gradNorm > 0);
    // The step moved the adapter: the same batch now has a lower loss.
    assert.equal(afterEvent?.result.case, "forward");
    assert.ok((afterEvent.result.value as trainer.ForwardResult).loss < fbResult.loss,
      `loss after the step ${(afterEvent.result.value as trainer.ForwardResult).loss} >= ${fbResult.loss}`);
  });

  test("a tensor one byte short is refused at once, naming the field", async () => {
    const bad = batch();
    bad.inputIds = { ...bad.inputIds, data: bad.inputIds.data.subarray(1) };
    await assert.rejects(client.trainer.forwardBackward({ sessionId: session.sessionId, batch: bad }),
      (err: unknown) => {
        assert.ok(err instanceof ValidationError, String(err));
        assert.equal(err.field, "batch.input_ids.data");
        assert.match(err.message, /127 bytes, but shape \[2, 8\] of int64 needs 128/);
        return true;
      });
  });

  test("SaveState, then PullArtifact returns the encrypted container", async () => {
    const resp = await client.trainer.saveState({ sessionId: session.sessionId, name: "node-client-test" });
    assert.ok(resp.future);
    const [event] = await client.awaitFutures([resp.future]);
    assert.equal(event?.result.case, "saveState");
    saved = event.result.value as trainer.SaveStateResult;
    assert.equal(saved.step, 1n);
    assert.equal(saved.sha256.length, 32);
    assert.equal(saved.encryption?.algorithm, "AES-256-GCM");

    const { artifact, data } = await client.pullArtifact(saved.artifactId);
    assert.equal(artifact.artifactId, saved.artifactId);
    // docs/artifact-format.md: magic "TSAF", version 1, segment size (u32 BE), then the tenant and artifact ids.
    const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
    assert.equal(Buffer.from(data.subarray(0, 4)).toString("latin1"), "TSAF");
    assert.equal(data[4], 1);
    const segment = view.getUint32(5, false);
    const tenantLen = view.getUint16(32, false);
    const tenant = Buffer.from(data.subarray(34, 34 + tenantLen)).toString("utf8");
    const idLen = view.getUint16(34 + tenantLen, false);
    const id = Buffer.from(data.subarray(36 + tenantLen, 36 + tenantLen + idLen)).toString("utf8");
    if (stack.tenant) assert.equal(tenant, stack.tenant);
    assert.equal(id, saved.artifactId);
    const plain = Number(saved.sizeBytes);
    const header = 36 + tenantLen + idLen;
    assert.equal(data.length, header + plain + 16 * Math.max(1, Math.ceil(plain / segment)));
  });

  test("an idempotency key makes a repeated state-changing call apply once", async () => {
    const key = "node-test-" + session.sessionId;
    const info = (await client.trainer.getInfo({ sessionId: session.sessionId })).future; // read-only: never keyed
    assert.ok(info);
    const a = await client.trainer.saveState({ sessionId: session.sessionId }, { headers: { "x-idempotency-key": key } });
    const b = await client.trainer.saveState({ sessionId: session.sessionId }, { headers: { "x-idempotency-key": key } });
    assert.equal(a.future?.futureId, b.future?.futureId, "the second call was applied again");
    // The same key with another request is refused, naming the metadata entry.
    await assert.rejects(client.trainer.saveState({ sessionId: session.sessionId, name: "other" },
      { headers: { "x-idempotency-key": key } }), (err: unknown) =>
      err instanceof ValidationError && err.field === "x-idempotency-key");
    const c = await client.trainer.saveState({ sessionId: session.sessionId });
    assert.ok(a.future && c.future);
    assert.notEqual(c.future.futureId, a.future.futureId);
    await client.awaitFutures([info, a.future, c.future]);
  });

  test("the inference service streams generation from the saved adapter and the base model", async () => {
    const loaded = await client.inference.loadAdapter({ artifactId: saved.artifactId });
    assert.ok(loaded.adapter);
    assert.equal(loaded.adapter.artifactId, saved.artifactId);
    assert.equal(loaded.adapter.rank, 4);
    for (const request of [
      { adapterId: loaded.adapter.adapterId, prompts: ["Once upon a time", "The quick brown fox"] },
      { modelRef: stack.modelRef, prompts: ["Hello, world!", "The cat"] },
    ]) {
      const messages: inference.GenerateResponse[] = [];
      for await (const msg of client.inference.generate({ ...request,
        sampling: { maxTokens: 6, temperature: 0, seed: 1n } })) {
        messages.push(msg);
      }
      for (const index of [0, 1]) {
        const mine = messages.filter((m) => m.promptIndex === index);
        const last = mine.at(-1);
        assert.ok(last, `no message for prompt ${index}`);
        assert.notEqual(last.finishReason, common.FinishReason.UNSPECIFIED, "the last message has finish_reason");
        assert.ok(mine.slice(0, -1).every((m) => m.finishReason === common.FinishReason.UNSPECIFIED));
        const tokens = mine.flatMap((m) => m.tokenIds);
        assert.ok(tokens.length >= 1 && tokens.length <= 6, `${tokens.length} tokens`);
        if (last.finishReason === common.FinishReason.LENGTH) assert.equal(tokens.length, 6);
      }
      assert.ok(messages.length > 2, "generation is streamed in increments, not one message per prompt");
    }
    await client.inference.unloadAdapter({ adapterId: loaded.adapter.adapterId });
  });

  test("CloseSession", async () => {
    const closed = await client.trainer.closeSession({ sessionId: session.sessionId });
    assert.equal(closed.session?.state, trainer.SessionState.CLOSED);
  });
});

describe("a DP budget", () => {
  let budget: accountant.Budget;

  test("is created once per idempotency key", async () => {
    const request = { sessionId: `sess_${Date.now().toString(16)}0000`, targetEpsilon: 2.5, targetDelta: 1e-5,
      sampleRate: 0.1, accountantType: common.AccountantType.PLD };
    const key = { headers: { "x-idempotency-key": `node-budget-${request.sessionId}` } };
    const a = await client.accountant.createBudget(request, key);
    const b = await client.accountant.createBudget(request, key);
    assert.ok(a.budget && b.budget);
    assert.equal(b.budget.budgetId, a.budget.budgetId);
    budget = a.budget;
    assert.equal(budget.state, accountant.BudgetState.ACTIVE);
    if (stack.tenant) assert.equal(budget.tenantId, stack.tenant);
  });

  test("is exhausted, then refused with a typed DP_BUDGET_EXCEEDED", async () => {
    let steps = 0;
    for (; steps < 50; steps++) {
      const resp = await client.accountant.recordStep({ budgetId: budget.budgetId, stepId: `s${steps}`,
        noiseMultiplier: 1.0 });
      assert.equal(resp.duplicate, false);
      if (resp.budget?.state === accountant.BudgetState.EXHAUSTED) {
        steps++;
        break;
      }
    }
    assert.ok(steps >= 2 && steps < 50, `exhausted after ${steps} steps`);
    await assert.rejects(
      client.accountant.recordStep({ budgetId: budget.budgetId, stepId: `s${steps}`, noiseMultiplier: 1.0 }),
      (err: unknown) => {
        assert.ok(err instanceof DPBudgetExceededError, String(err));
        assert.equal(err.reason, "DP_BUDGET_EXCEEDED");
        assert.equal(err.grpcCode, Code.FailedPrecondition);
        assert.equal(err.budgetId, budget.budgetId);
        assert.ok(Number(err.metadata["epsilon_with_step"]) > 2.5, JSON.stringify(err.metadata));
        return true;
      });
    const after = await client.accountant.getBudget({ budgetId: budget.budgetId });
    assert.equal(after.budget?.numSteps, BigInt(steps), "the refused step was not recorded");
    assert.ok((after.budget?.spentEpsilon ?? Infinity) <= 2.5);
  });
});

describe("the audit ledger", () => {
  test("lists this tenant's entries, page by page", async () => {
    const entries = await eventually(async () => {
      const all: { action: string; resourceId: string; tenantId: string; outcome: number }[] = [];
      let pageToken = "";
      do {
        const page = await client.ledger.listEntries({ pageSize: 5, pageToken, service: "accountant" });
        assert.ok(page.entries.length <= 5);
        for (const e of page.entries) if (e.entry) all.push(e.entry);
        pageToken = page.nextPageToken;
      } while (pageToken);
      const refused = all.find((e) => e.action === "accountant.RecordStep" && e.outcome === 2);
      return all.some((e) => e.action === "accountant.CreateBudget") && refused ? all : undefined;
    }, "the accountant's audit entries");
    if (stack.tenant) assert.ok(entries.every((e) => e.tenantId === stack.tenant), "only this tenant's entries");
  });
});
