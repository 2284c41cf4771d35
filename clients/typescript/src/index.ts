/**
 * Weir's TypeScript client, on `@grpc/grpc-js`.
 *
 * ```ts
 * import { Weir } from "@weir/client";
 * const weir = new Weir("127.0.0.1:50051", { apiKey: process.env.WEIR_API_KEY });
 * console.log((await weir.complete("What is a weir?")).text);
 * for await (const text of weir.stream("Tell me about rivers")) process.stdout.write(text);
 * ```
 *
 * Why grpc-js: it is the reference gRPC implementation for Node, speaks the gRPC protocol
 * (HTTP/2, trailers, server streaming) to Weir's tonic servers as they are, with no proxy, and with
 * `@grpc/proto-loader` it reads the API from the `.proto` files this package ships, so there is no
 * code generation step to keep in sync. (Connect's `@connectrpc/connect-node` would add generated
 * types, at the cost of `protoc-gen-es` output to regenerate and commit.)
 */
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const PROTO = join(dirname(dirname(fileURLToPath(import.meta.url))), "proto");
const LOADER_OPTIONS: protoLoader.Options = {
  includeDirs: [PROTO],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
};

/** Tokens an answer used. */
export interface Usage {
  input_tokens: number;
  output_tokens: number;
  cached_input_tokens: number;
  total_tokens: number;
}

/** A whole answer. */
export interface Completion {
  text: string;
  model: string;
  usage: Usage;
  cost_micros: number;
  trace_id: string;
  /** The `CompleteResponse` as received. */
  response: Record<string, unknown>;
}

/** A message: `{ role: "user" | "system" | "assistant", content }`. */
export interface Message {
  role: "system" | "user" | "assistant";
  content: string;
}

/** Options of a call. */
export interface CallOptions {
  model?: string;
  system?: string;
  sessionId?: string;
  maxTokens?: number;
  temperature?: number;
  /** Idempotency key: a retry is answered once and paid once. */
  requestId?: string;
  /** Deadline in milliseconds (default: the client's `timeoutMs`). */
  timeoutMs?: number;
}

/** Options of a client. */
export interface WeirOptions {
  /** Sent as `authorization: Bearer <key>`. */
  apiKey?: string;
  /** `weir-criticality` of every call: CRITICAL_PLUS, CRITICAL, SHEDDABLE_PLUS, SHEDDABLE. */
  criticality?: string;
  /** Each call's deadline unless the call gives its own (default 30 s). */
  timeoutMs?: number;
  /** The session service's host:port, for `createSession`. */
  sessionTarget?: string;
  /** How many times a call pushed back with `grpc-retry-pushback-ms` is sent again (default 3). */
  maxPushbackRetries?: number;
}

/**
 * A call Weir refused or could not serve, with the `google.rpc` details it sent: `reason`
 * (ErrorInfo), `retryDelayMs` (RetryInfo), `quotaViolations` and `fieldViolations`.
 */
export class WeirError extends Error {
  constructor(
    readonly code: grpc.status,
    readonly details: string,
    readonly reason: string,
    readonly retryDelayMs: number | undefined,
    readonly quotaViolations: Array<{ subject: string; description: string }>,
    readonly fieldViolations: Array<{ field: string; description: string }>,
    readonly metadata: grpc.Metadata,
  ) {
    super(`${grpc.status[code]}${reason ? ` (${reason})` : ""}: ${details}`);
    this.name = "WeirError";
  }

  /** The name of the gRPC code (`NOT_FOUND`, ...). */
  get codeName(): string {
    return grpc.status[this.code];
  }
}

let rpcTypes: protobuf.Root | undefined;

function rpcRoot(): protobuf.Root {
  if (!rpcTypes) {
    const root = new protobuf.Root();
    root.resolvePath = (_origin, target) =>
      target.startsWith("google/protobuf/") ? target : join(PROTO, target);
    root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
    rpcTypes = root;
  }
  return rpcTypes;
}

/** The error of a failed call, with its details decoded. */
export function weirError(error: grpc.ServiceError): WeirError {
  let reason = "";
  let retryDelayMs: number | undefined;
  const quotas: Array<{ subject: string; description: string }> = [];
  const fields: Array<{ field: string; description: string }> = [];
  const raw = error.metadata?.get("grpc-status-details-bin")[0];
  if (raw instanceof Buffer) {
    const root = rpcRoot();
    const status = root.lookupType("google.rpc.Status").decode(raw) as unknown as {
      details: Array<{ type_url: string; value: Uint8Array }>;
    };
    for (const detail of status.details ?? []) {
      const name = detail.type_url.split("/").pop() ?? "";
      const type = root.lookupType(name);
      const value = type.toObject(type.decode(detail.value), { longs: Number }) as Record<string, any>;
      if (name === "google.rpc.ErrorInfo") reason = value.reason ?? "";
      if (name === "google.rpc.RetryInfo") {
        const delay = value.retry_delay ?? {};
        retryDelayMs = (delay.seconds ?? 0) * 1000 + (delay.nanos ?? 0) / 1e6;
      }
      if (name === "google.rpc.QuotaFailure") quotas.push(...(value.violations ?? []));
      if (name === "google.rpc.BadRequest") fields.push(...(value.field_violations ?? []));
    }
  }
  return new WeirError(
    error.code,
    error.details,
    reason,
    retryDelayMs,
    quotas,
    fields,
    error.metadata ?? new grpc.Metadata(),
  );
}

/** Milliseconds to wait before sending again, when the server said so. */
function pushbackMs(error: WeirError): number | undefined {
  if (error.code !== grpc.status.UNAVAILABLE && error.code !== grpc.status.RESOURCE_EXHAUSTED) {
    return undefined;
  }
  const value = error.metadata.get("grpc-retry-pushback-ms")[0];
  const ms = typeof value === "string" ? Number.parseInt(value, 10) : Number.NaN;
  return Number.isFinite(ms) && ms >= 0 ? ms : undefined;
}

function loadService(file: string, path: string[]): grpc.ServiceClientConstructor {
  const definition = protoLoader.loadSync(file, LOADER_OPTIONS);
  let node: any = grpc.loadPackageDefinition(definition);
  for (const part of path) node = node[part];
  return node as grpc.ServiceClientConstructor;
}

function messages(prompt: string | Message[], system?: string) {
  const out: Array<{ role: string; content: string }> = [];
  if (system) out.push({ role: "ROLE_SYSTEM", content: system });
  const list = typeof prompt === "string" ? [{ role: "user", content: prompt }] : prompt;
  for (const message of list) {
    out.push({ role: `ROLE_${message.role.toUpperCase()}`, content: message.content });
  }
  return out;
}

function request(prompt: string | Message[], options: CallOptions) {
  const params: Record<string, unknown> = {};
  if (options.maxTokens !== undefined) params.max_tokens = options.maxTokens;
  if (options.temperature !== undefined) params.temperature = options.temperature;
  return {
    model: options.model ?? "auto",
    messages: messages(prompt, options.system),
    session_id: options.sessionId ?? "",
    params,
    request_id: options.requestId ?? "",
  };
}

/** A streamed answer: `for await (const text of stream)`; then `usage` and `costMicros`. */
export class Stream implements AsyncIterable<string> {
  model = "";
  traceId = "";
  usage: Usage | undefined;
  costMicros = 0;

  constructor(private readonly call: grpc.ClientReadableStream<any>) {}

  async *[Symbol.asyncIterator](): AsyncIterator<string> {
    try {
      for await (const event of this.call) {
        if (event.start) {
          this.model = event.start.model;
          this.traceId = event.start.trace_id;
        } else if (event.delta) {
          yield event.delta.text;
        } else if (event.done) {
          this.usage = event.done.usage;
          this.costMicros = event.done.cost_micros;
        }
      }
    } catch (error) {
      throw weirError(error as grpc.ServiceError);
    }
  }

  /** Stops the stream (and the model call upstream). */
  cancel(): void {
    this.call.cancel();
  }
}

/** A client of Weir's router (and, for sessions, its session service). */
export class Weir {
  private readonly router: any;
  private readonly sessions: any;
  private readonly timeoutMs: number;
  private readonly maxPushbackRetries: number;
  private readonly apiKey?: string;
  private readonly criticality?: string;

  constructor(target = "127.0.0.1:50051", options: WeirOptions = {}) {
    const credentials = grpc.credentials.createInsecure();
    const Router = loadService("weir/router/v1/router.proto", ["weir", "router", "v1", "RouterService"]);
    this.router = new Router(target, credentials);
    if (options.sessionTarget) {
      const Sessions = loadService("weir/session/v1/session.proto", ["weir", "session", "v1", "SessionService"]);
      this.sessions = new Sessions(options.sessionTarget, credentials);
    }
    this.timeoutMs = options.timeoutMs ?? 30_000;
    this.maxPushbackRetries = options.maxPushbackRetries ?? 3;
    this.apiKey = options.apiKey;
    this.criticality = options.criticality;
  }

  private metadata(): grpc.Metadata {
    const metadata = new grpc.Metadata();
    if (this.apiKey) metadata.set("authorization", `Bearer ${this.apiKey}`);
    if (this.criticality) metadata.set("weir-criticality", this.criticality);
    return metadata;
  }

  private deadline(timeoutMs?: number): Date {
    return new Date(Date.now() + (timeoutMs ?? this.timeoutMs));
  }

  private async unary(client: any, method: string, body: unknown, timeoutMs?: number): Promise<any> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await new Promise((resolve, reject) =>
          client[method](body, this.metadata(), { deadline: this.deadline(timeoutMs) }, (error: any, response: any) =>
            error ? reject(weirError(error)) : resolve(response),
          ),
        );
      } catch (error) {
        const wait = error instanceof WeirError ? pushbackMs(error) : undefined;
        if (wait === undefined || attempt >= this.maxPushbackRetries) throw error;
        await new Promise((resolve) => setTimeout(resolve, wait));
      }
    }
  }

  /** The whole answer to `prompt`. */
  async complete(prompt: string | Message[], options: CallOptions = {}): Promise<Completion> {
    const response = await this.unary(this.router, "Complete", request(prompt, options), options.timeoutMs);
    return {
      text: response.message?.content ?? "",
      model: response.model,
      usage: response.usage,
      cost_micros: response.cost_micros,
      trace_id: response.trace_id,
      response,
    };
  }

  /** The answer to `prompt` token by token: `for await (const text of weir.stream(...))`. */
  stream(prompt: string | Message[], options: CallOptions = {}): Stream {
    const { request_id: _ignored, ...body } = request(prompt, options);
    const call = this.router.CompleteStream(body, this.metadata(), { deadline: this.deadline(options.timeoutMs) });
    return new Stream(call);
  }

  /** A new conversation (needs `sessionTarget`): its id, to pass as `sessionId`. */
  async createSession(userId = "", model = ""): Promise<string> {
    if (!this.sessions) throw new Error("sessions need the sessionTarget option: the session service's host:port");
    const response = await this.unary(this.sessions, "CreateSession", { user_id: userId, model });
    return response.session.id;
  }

  /** Deletes a conversation and its history. */
  async deleteSession(sessionId: string): Promise<void> {
    if (!this.sessions) throw new Error("sessions need the sessionTarget option: the session service's host:port");
    await this.unary(this.sessions, "DeleteSession", { session_id: sessionId });
  }

  /** Queues `prompt` as an asynchronous job; a retry with `requestId` returns the same job. */
  async submitJob(prompt: string | Message[], options: CallOptions = {}): Promise<any> {
    const { request_id: _ignored, ...body } = request(prompt, options);
    const response = await this.unary(this.router, "SubmitJob", { request: body, request_id: options.requestId ?? "" });
    return response.job;
  }

  /** A job, with its result once it has ended. */
  async getJob(jobId: string): Promise<any> {
    return (await this.unary(this.router, "GetJob", { job_id: jobId })).job;
  }

  /** Closes the connections. */
  close(): void {
    this.router.close();
    this.sessions?.close();
  }
}
