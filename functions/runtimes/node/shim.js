// The Nimbus Node.js runtime shim: serves a function's `handle(event, context)` over HTTP.
// Node's standard library only, so it runs unchanged in the local engine's sandbox
// (unix socket, NIMBUS_SOCKET) and as the entrypoint of the runtime image on Knative (PORT).
// Log lines are JSON objects on stdout, tagged with the invocation they belong to.
"use strict";

const http = require("http");
const fs = require("fs");
const path = require("path");
const crypto = require("crypto");
const util = require("util");
const { AsyncLocalStorage } = require("async_hooks");

// The function's own variables: the local engine hands them over inside the sandbox through an
// inherited file (NIMBUS_ENV_FD), never through the launcher's environment.
if (process.env.NIMBUS_ENV_FD) {
  const fd = Number(process.env.NIMBUS_ENV_FD);
  delete process.env.NIMBUS_ENV_FD;
  const values = JSON.parse(fs.readFileSync(fd, "utf8") || "{}");
  fs.closeSync(fd);
  for (const [name, value] of Object.entries(values)) process.env[name] = String(value);
}
const env = process.env;
const CODE_DIR = env.NIMBUS_CODE_DIR || "/var/nimbus/code";
const HANDLER = env.NIMBUS_HANDLER || "handler.handle";
const TIMEOUT_SECONDS = Number(env.NIMBUS_TIMEOUT_SECONDS || "30");
const DEBUG = ["1", "true", "yes"].includes(env.NIMBUS_DEBUG || "");
const MEMORY_MB = Number(env.NIMBUS_MEMORY_MB || "0");
const MAX_LOG_MESSAGE = 16000;
const MAX_BODY = Number(env.NIMBUS_MAX_BODY_BYTES || String(16 * 1024 * 1024));
const invocationStore = new AsyncLocalStorage();
const stdoutWrite = process.stdout.write.bind(process.stdout);

function emit(level, message, extra) {
  const store = invocationStore.getStore();
  let text = typeof message === "string" ? message : util.inspect(message);
  if (text.length > MAX_LOG_MESSAGE) {
    text = text.slice(0, MAX_LOG_MESSAGE) + `... [${text.length - MAX_LOG_MESSAGE} characters cut]`;
  }
  const record = {
    time: new Date().toISOString(), level, message: text,
    invocation_id: store ? store.invocationId : null,
    function: env.NIMBUS_FUNCTION || "", revision: env.NIMBUS_REVISION || "",
  };
  if (env.NIMBUS_INSTANCE) record.instance = env.NIMBUS_INSTANCE;
  Object.assign(record, extra || {});
  stdoutWrite(JSON.stringify(record) + "\n");
}

// console.* becomes structured lines, attributed to the current invocation.
const levels = { log: "INFO", info: "INFO", debug: "DEBUG", warn: "WARNING", error: "ERROR" };
for (const [name, level] of Object.entries(levels)) {
  console[name] = (...args) => emit(level, util.format(...args));
}

function makeLogger() {
  const logger = {};
  for (const [name, level] of Object.entries({ debug: "DEBUG", info: "INFO", warn: "WARNING", warning: "WARNING", error: "ERROR" })) {
    logger[name] = (...args) => emit(level, util.format(...args), { logger: "function" });
  }
  logger.log = logger.info;
  return logger;
}

let handler = null;
let loadError = null;
// This instance's cold start: ms from the process's start (performance.timeOrigin, taken as Node
// starts, so its own start-up counts) to the handler being loaded; reported with the first
// invocation only (null once that one has it).
let initMs = null;
let coldPending = true;

function loadHandler() {
  const dot = HANDLER.lastIndexOf(".");
  const moduleName = dot > 0 ? HANDLER.slice(0, dot) : "handler";
  const exportName = dot > 0 ? HANDLER.slice(dot + 1) : HANDLER;
  try {
    const mod = require(path.join(CODE_DIR, moduleName));
    const fn = mod[exportName];
    if (typeof fn !== "function") throw new TypeError(`${HANDLER} is not a function`);
    handler = fn;
  } catch (err) {
    loadError = (err && err.stack) || String(err);
    emit("ERROR", `could not import handler ${HANDLER}:\n${loadError}`);
  }
  initMs = performance.now();
}

function cloudEventOf(headers, body) {
  const contentType = headers["content-type"] || "";
  if (contentType.startsWith("application/cloudevents+json")) {
    try {
      const event = JSON.parse(body.toString("utf8") || "{}");
      return event && typeof event === "object" && event.type ? event : null;
    } catch (err) {
      return null;
    }
  }
  if (headers["ce-type"] && headers["ce-id"]) {
    const event = {};
    for (const [name, value] of Object.entries(headers)) {
      if (name.startsWith("ce-")) event[name.slice(3)] = value;
    }
    let data = body;
    if (contentType.startsWith("application/json") || contentType.endsWith("+json")) {
      try { data = JSON.parse(body.toString("utf8") || "null"); } catch (err) { /* keep the bytes */ }
    } else if (contentType.startsWith("text/")) {
      data = body.toString("utf8");
    }
    if (contentType) event.datacontenttype = contentType;
    event.data = data;
    return event;
  }
  return null;
}

function parseTraceparent(value) {
  const parts = (value || "").split("-");
  if (parts.length === 4 && parts[1].length === 32 && parts[2].length === 16) return [parts[1], parts[2]];
  return [crypto.randomBytes(16).toString("hex"), ""];
}

function encodeBody(body) {
  if (body === undefined || body === null) return [Buffer.alloc(0), "text/plain; charset=utf-8"];
  if (Buffer.isBuffer(body) || body instanceof Uint8Array) return [Buffer.from(body), "application/octet-stream"];
  if (typeof body === "string") return [Buffer.from(body, "utf8"), "text/plain; charset=utf-8"];
  return [Buffer.from(JSON.stringify(body), "utf8"), "application/json"];
}

function toResponse(result) {
  const keys = result && typeof result === "object" && !Array.isArray(result) && !Buffer.isBuffer(result)
    ? Object.keys(result) : null;
  if (keys && Number.isInteger(result.status) && keys.every((k) => ["status", "headers", "body"].includes(k))) {
    const [body, contentType] = encodeBody(result.body);
    const headers = Object.assign({}, result.headers || {});
    if (!Object.keys(headers).some((k) => k.toLowerCase() === "content-type")) headers["Content-Type"] = contentType;
    return [result.status, headers, body];
  }
  const [body, contentType] = encodeBody(result);
  return [result === undefined || result === null ? 204 : 200, { "Content-Type": contentType }, body];
}

async function invoke(req, body) {
  const url = new URL(req.url, "http://instance");
  const invocationId = req.headers["x-nimbus-invocation-id"] || crypto.randomBytes(16).toString("hex");
  const [traceId, parentSpan] = parseTraceparent(req.headers["traceparent"]);
  const spanId = crypto.randomBytes(8).toString("hex");
  const query = {};
  for (const [key, value] of url.searchParams) {
    if (key in query) query[key] = [].concat(query[key], value); else query[key] = value;
  }
  const event = {
    method: req.method, path: decodeURIComponent(url.pathname), query, rawQuery: url.search.slice(1),
    headers: req.headers, body,
    json() { return JSON.parse(body.toString("utf8") || "null"); },
    text() { return body.toString("utf8"); },
    cloudevent: cloudEventOf(req.headers, body),
  };
  const started = Date.now();
  const spans = [];
  const context = {
    function: env.NIMBUS_FUNCTION || "", revision: env.NIMBUS_REVISION || "", tenant: env.NIMBUS_TENANT || "",
    invocationId, invocation_id: invocationId, traceId, spanId, parentSpan, memoryMb: MEMORY_MB,
    remainingTime() { return Math.max(0, started + TIMEOUT_SECONDS * 1000 - Date.now()) / 1000; },
    get remainingMs() { return Math.max(0, started + TIMEOUT_SECONDS * 1000 - Date.now()); },
    logger: makeLogger(),
    async span(name, fn, attributes) {
      const span = { name: String(name), span_id: crypto.randomBytes(8).toString("hex"), parent_id: spanId,
                     start: new Date().toISOString(), attributes: attributes || {} };
      const t0 = process.hrtime.bigint();
      try {
        return await fn(span);
      } catch (err) {
        span.error = `${err && err.name}: ${err && err.message}`;
        throw err;
      } finally {
        span.duration_ms = Number(process.hrtime.bigint() - t0) / 1e6;
        spans.push(span);
      }
    },
  };
  const cold = coldPending;  // taken before any await: one invocation alone is the first
  coldPending = false;
  const handlerStarted = process.hrtime.bigint();
  let status, headers, out, failed = null;
  try {
    if (!handler) throw new Error(`The handler could not be imported.\n${loadError || ""}`);
    [status, headers, out] = toResponse(await handler(event, context));
  } catch (err) {
    failed = err;
    const stack = (err && err.stack) || String(err);
    emit("ERROR", `handler raised ${stack}`);
    const payload = { error: "The function failed.", invocation_id: invocationId };
    if (DEBUG) { payload.detail = String(err && err.message); payload.traceback = stack; }
    [status, headers, out] = [500, { "Content-Type": "application/json", "X-Nimbus-Error": "handler" },
                              Buffer.from(JSON.stringify(payload))];
  }
  // What only the instance knows: the Knative engine records cold starts and queueing from these.
  headers["X-Nimbus-Handler-Ms"] = (Number(process.hrtime.bigint() - handlerStarted) / 1e6).toFixed(3);
  if (cold) {
    headers["X-Nimbus-Cold-Start"] = "1";
    headers["X-Nimbus-Init-Ms"] = (initMs === null ? performance.now() : initMs).toFixed(3);
  }
  headers["X-Nimbus-Invocation-Id"] = invocationId;
  // Which revision answered: behind Knative's traffic split only the instance knows.
  if (env.NIMBUS_REVISION) headers["X-Nimbus-Revision"] = env.NIMBUS_REVISION;
  headers["traceparent"] = `00-${traceId}-${spanId}-01`;
  if (spans.length) {
    emit("INFO", `${spans.length} span(s) recorded`, { spans });
    const text = JSON.stringify(spans);
    if (text.length < 8000) headers["X-Nimbus-Spans"] = text;
  }
  return [status, headers, out, failed];
}

function serve(req, res) {
  const chunks = [];
  let size = 0;
  req.on("data", (chunk) => {
    size += chunk.length;
    if (size > MAX_BODY) { res.writeHead(413, { "Content-Type": "text/plain" }); res.end("body too large"); req.destroy(); return; }
    chunks.push(chunk);
  });
  req.on("end", async () => {
    const body = Buffer.concat(chunks);
    if (req.url.split("?")[0] === "/_nimbus/health") {
      const [code, payload] = loadError ? [500, { status: "error", error: loadError }] : [200, { status: "ok" }];
      const text = JSON.stringify(payload);
      res.writeHead(code, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(text) });
      res.end(text);
      return;
    }
    const invocationId = req.headers["x-nimbus-invocation-id"] || crypto.randomBytes(16).toString("hex");
    req.headers["x-nimbus-invocation-id"] = invocationId;
    const [status, headers, out] = await invocationStore.run({ invocationId }, () => invoke(req, body));
    headers["Content-Length"] = out.length;
    res.writeHead(status, headers);
    res.end(out);
  });
}

function main() {
  loadHandler();
  if (env.NIMBUS_CHECK) process.exit(loadError ? 1 : 0);
  const server = http.createServer(serve);
  server.keepAliveTimeout = 0; // the gateway keeps connections; never close them from this side
  server.headersTimeout = 0;
  server.requestTimeout = 0;
  const socketPath = env.NIMBUS_SOCKET;
  const listenFd = env.NIMBUS_LISTEN_FD;
  delete env.NIMBUS_LISTEN_FD;
  const onListening = () => emit("INFO", "listening", { nimbus: "ready" });
  if (listenFd) {
    // The local engine binds the instance's socket itself and hands it over (nothing writable is shared).
    server.listen({ fd: Number(listenFd) }, onListening);
  } else if (socketPath) {
    try { fs.unlinkSync(socketPath); } catch (err) { /* not there */ }
    server.listen(socketPath, onListening);
  } else {
    server.listen(Number(env.PORT || "8080"), "0.0.0.0", onListening);
  }
  // In the local engine stdin is a pipe from the engine: when it closes, the engine is gone.
  if ((socketPath || listenFd) && !process.stdin.isTTY) {
    process.stdin.on("end", () => process.exit(0));
    process.stdin.on("error", () => process.exit(0));
    process.stdin.resume();
  }
}

main();
