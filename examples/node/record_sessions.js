#!/usr/bin/env node
// Records agent sessions from Node.js, for the same workers as the Python SessionTracker.
//
// Each batch of events goes to the workers as one Celery task message, through celery-node's
// Redis broker; its format is the wire contract, whose JSON Schema `sessions schema` prints
// (README: Wire contract). Run it against the broker the workers consume:
//
//   npm ci
//   SESSIONS_BROKER_URL=redis://127.0.0.1:6379/0 node record_sessions.js [--prefix P] [--twice] [--malformed]
//
// It records three sessions (P-1, P-2, P-3; P is "node-demo" unless --prefix says otherwise)
// and prints each batch it sent, one JSON line each. --twice sends each batch a second time,
// as a producer does that retries after a lost reply: the workers count it once. --malformed
// also sends a batch with one event the workers refuse: they dead-letter that event with its
// reason (`sessions health` counts dead letters) and apply the other.
"use strict";

const { randomUUID } = require("node:crypto");
const celery = require("celery-node");

// The task and the queue of the contract's $defs/Task. celery-node's Redis broker pushes a
// message onto the list named by the queue, the list the workers consume.
const TASK = "sessions.ingest";
const QUEUE = "sessions.events";
// Events per batch: one message each (the workers take up to 10,000).
const BATCH_EVENTS = 25;

class SessionRecorder {
  /** @param {string} brokerUrl a redis:// URL, with the database the workers use */
  constructor(brokerUrl) {
    // The second URL is celery-node's result backend, which it connects to on close: the
    // same Redis (sessions.ingest stores no result).
    this.client = celery.createClient(brokerUrl, brokerUrl, QUEUE);
    this.events = [];
  }

  create(sessionId, { userId = null, metadata = null } = {}) {
    this.events.push({ kind: "create", session_id: sessionId, at: now(), user_id: userId, metadata });
  }

  record(sessionId, { processingTime = 0, error = false, inputTokens = 0, outputTokens = 0, cost = 0 } = {}) {
    this.events.push({
      kind: "record",
      session_id: sessionId,
      at: now(),
      processing_time: processingTime,
      error,
      // Integers: the contract refuses 1000.0 for a token count.
      input_tokens: Math.trunc(inputTokens),
      output_tokens: Math.trunc(outputTokens),
      cost,
    });
  }

  end(sessionId, status = "completed") {
    this.events.push({ kind: "end", session_id: sessionId, at: now(), status });
  }

  /** Sends what was recorded since the last flush as one batch; resolves to it (or null). */
  async flush() {
    if (this.events.length === 0) return null;
    // The batch's id is made once: a batch sent again keeps it, and the workers apply it once.
    const batch = { batch_id: randomUUID(), events: this.events };
    this.events = [];
    await this.send(batch);
    return batch;
  }

  /** Publishes `batch` as one sessions.ingest message; resolves once Redis has it. */
  async send(batch, attempts = 5) {
    // celery-node's task.applyAsync() does not wait for the broker (its publish is not
    // returned), so the message is made and published here, and the publish awaited.
    const message = this.client.createTaskMessage(randomUUID(), TASK, [JSON.stringify(batch)], {});
    for (let attempt = 1; ; attempt += 1) {
      try {
        await this.client.broker.publish(message.body, "", QUEUE, message.headers, message.properties);
        return;
      } catch (error) {
        if (attempt >= attempts) throw error;
        await new Promise((resolve) => setTimeout(resolve, 200 * 2 ** attempt));
      }
    }
  }

  close() {
    return this.client.disconnect();
  }
}

function now() {
  return new Date().toISOString(); // RFC 3339, in UTC: "2024-05-01T12:00:00.000Z"
}

async function main(argv) {
  const brokerUrl = process.env.SESSIONS_BROKER_URL;
  if (!brokerUrl || !brokerUrl.startsWith("redis")) {
    throw new Error("SESSIONS_BROKER_URL: set it to the workers' Redis broker (redis://host:port/db)");
  }
  const option = (name) => argv.includes(name);
  const prefixAt = argv.indexOf("--prefix");
  const prefix = prefixAt >= 0 ? argv[prefixAt + 1] : "node-demo";
  const recorder = new SessionRecorder(brokerUrl);
  const sent = [];
  const flush = async () => {
    const batch = await recorder.flush();
    if (batch === null) return;
    sent.push(batch);
    if (option("--twice")) await recorder.send(batch);
  };
  try {
    const sessions = [1, 2, 3].map((n) => `${prefix}-${n}`);
    for (const sessionId of sessions) {
      recorder.create(sessionId, { userId: `${prefix}-user`, metadata: { agent: "node", sdk: "celery-node" } });
    }
    for (let i = 0; i < 40; i += 1) {
      for (const sessionId of sessions) {
        // Multiples of 1/8 add up exactly, so the totals can be checked to the last bit.
        recorder.record(sessionId, {
          processingTime: 0.25 * (1 + (i % 4)),
          error: i % 7 === 0,
          inputTokens: 100 + i,
          outputTokens: 2 * i,
          cost: 0.125 * (i % 3),
        });
        if (recorder.events.length >= BATCH_EVENTS) await flush();
      }
    }
    recorder.end(sessions[0], "completed");
    recorder.end(sessions[1], "failed");
    await flush();
    if (option("--malformed")) {
      recorder.record(sessions[2], { processingTime: 0.5 });
      recorder.record(sessions[2], { processingTime: -1 }); // refused: must be from 0 to 86400
      await flush();
    }
  } finally {
    await recorder.close();
  }
  for (const batch of sent) console.log(JSON.stringify(batch));
}

main(process.argv.slice(2)).catch((error) => {
  console.error(error);
  process.exitCode = 1;
});
