// Accord in the browser: a thin TypeScript layer over the engine compiled to WebAssembly.
//
// The engine (Rust, `WasmReplica`) decides everything: documents, sync, outbox, change status,
// invariants and conflicts. This file only does I/O: IndexedDB, the WebSocket, timers,
// randomness, browser events, and it fans engine events out to listeners.
//
// Durability: after every call into the engine, its storage writes, frames and events are taken
// together and handled on one queue: first the writes are committed to IndexedDB, then the
// frames are sent, then the events are delivered. Nothing leaves the tab before it is durable.

import init, { WasmReplica } from '../pkg/accord_client_wasm.js';
import { KvDatabase, type KvWrite } from './idb.js';
import { acquireSlot, type Slot } from './locks.js';

export type DocKind = 'automerge' | 'yrs';
export type Path = (string | number)[];
export type Op =
  | { op: 'put'; path: Path; value: unknown }
  | { op: 'delete'; path: Path }
  | { op: 'insert'; path: Path; index: number; value: unknown }
  | { op: 'increment'; path: Path; by: number }
  | { op: 'splice'; path: Path; index: number; delete: number; insert?: string };

export type ChangeStatus =
  | { status: 'pending' }
  | { status: 'confirmed'; seq: number }
  | { status: 'rejected'; code: string; reason: string }
  | { status: 'compensated'; violation: string; invariant: string; reason: string; by: string }
  | { status: 'unknown' };

export interface ConflictOption {
  entry?: string | null;
  value: unknown;
  author?: string | null;
  at?: unknown;
  change?: string | null;
  seq?: number | null;
}
export interface Conflict {
  key: string;
  invariant: string;
  path: Path;
  question: string;
  options: ConflictOption[];
  escalated: boolean;
}
export interface Violation {
  invariant: string;
  reason: string;
}

/** offline: the browser says so; connecting: a socket is opening or the handshake runs;
 * connected: the server welcomed us; disconnected: waiting to retry; closed: repo closed. */
export type ConnectionState = 'offline' | 'connecting' | 'connected' | 'disconnected' | 'closed';

export interface RepoOptions {
  /** WebSocket URL of the server's /sync endpoint, e.g. ws://127.0.0.1:8787/sync. */
  url: string;
  /** Access token (omit with a --no-auth server). */
  token?: string;
  /** Storage name (one IndexedDB database per slot): repos with other names share nothing. */
  name?: string;
  /** Tabs of one origin: 'separate' (default) gives a busy tab its own slot and replica id;
   * 'wait' waits until the tab holding slot 0 closes. */
  tabs?: 'separate' | 'wait';
  /** Connect right away (default true). */
  autoConnect?: boolean;
  /** Reconnect delays: full jitter, random(0, min(maxMs, baseMs * 2^attempt)). */
  backoff?: { baseMs?: number; maxMs?: number };
  /** Schemas (JSON) checked locally to warn early ('violations'); the server decides. */
  schemas?: (string | object)[];
  /** Where the .wasm is, if not next to the generated JS. */
  wasmUrl?: string | URL;
}

type Listener<T> = (value: T) => void;

class Emitter<M extends Record<string, unknown>> {
  private listeners = new Map<keyof M, Set<Listener<any>>>();
  on<K extends keyof M>(event: K, cb: Listener<M[K]>): () => void {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(cb);
    return () => set!.delete(cb);
  }
  off<K extends keyof M>(event: K, cb: Listener<M[K]>): void {
    this.listeners.get(event)?.delete(cb);
  }
  protected emit<K extends keyof M>(event: K, value: M[K]): void {
    for (const cb of [...(this.listeners.get(event) ?? [])]) {
      try {
        cb(value);
      } catch (e) {
        console.error(e);
      }
    }
  }
}

interface EngineEvent {
  type:
    | 'change'
    | 'confirmed'
    | 'rejected'
    | 'compensated'
    | 'connected'
    | 'subscribed'
    | 'violations'
    | 'peerError';
  violation?: string;
  document?: string;
  origin?: 'local' | 'remote';
  change?: string;
  seq?: number;
  code?: string;
  reason?: string;
  message?: string;
  violations?: Violation[];
  headSeq?: number;
  readOnly?: boolean;
}

export interface DocChangeEvent<T> {
  handle: DocHandle<T>;
  doc: T;
  origin: 'local' | 'remote';
}

type DocEvents<T> = {
  change: DocChangeEvent<T>;
  confirmed: { change: string; seq: number };
  rejected: { change: string; code: string; reason: string };
  /** A resolution of the invariant layer voided or overrode one of this replica's changes. */
  compensated: { change: string; violation: string; reason: string };
  violations: Violation[];
  /** The server accepted this document's subscription (on every (re)connect). */
  subscribed: { headSeq: number; readOnly: boolean };
};

type RepoEvents = {
  connection: ConnectionState;
  change: { documentId: string; origin: 'local' | 'remote' };
  error: Error;
  peerError: { code: string; document?: string; message: string };
};

/** Records ops for one change: `handle.change(d => d.put(['title'], 'Hi').increment(['n'], 1))`. */
export class ChangeBuilder {
  readonly ops: Op[] = [];
  put(path: Path, value: unknown): this {
    this.ops.push({ op: 'put', path, value });
    return this;
  }
  delete(path: Path): this {
    this.ops.push({ op: 'delete', path });
    return this;
  }
  insert(path: Path, index: number, value: unknown): this {
    this.ops.push({ op: 'insert', path, index, value });
    return this;
  }
  push(path: Path, value: unknown, length: number): this {
    return this.insert(path, length, value);
  }
  increment(path: Path, by = 1): this {
    this.ops.push({ op: 'increment', path, by });
    return this;
  }
  splice(path: Path, index: number, del: number, insert = ''): this {
    this.ops.push({ op: 'splice', path, index, delete: del, insert });
    return this;
  }
}

/** One document, like automerge-repo's DocHandle. */
export class DocHandle<T = any> extends Emitter<DocEvents<T>> {
  /** @internal */
  constructor(
    private readonly repo: Repo,
    readonly documentId: string,
    readonly kind: DocKind,
  ) {
    super();
  }

  /** The document's state as plain JSON (a fresh copy). */
  doc(): T {
    return JSON.parse(this.repo.engine.json(this.documentId));
  }

  /** The declared type (e.g. "trip"), if any. */
  type(): string | undefined {
    return this.repo.engine.docType(this.documentId) ?? undefined;
  }

  /** Edits the document as one change; returns its id, or undefined if nothing changed. The
   * change is visible at once; it is durable when `repo.flush()` resolves. */
  change(edit: ((d: ChangeBuilder) => void) | Op[]): string | undefined {
    let ops: Op[];
    if (typeof edit === 'function') {
      const b = new ChangeBuilder();
      edit(b);
      ops = b.ops;
    } else ops = edit;
    return this.repo.call(() => this.repo.engine.change(this.documentId, JSON.stringify(ops)));
  }

  /** Where one of this replica's changes stands. */
  status(change: string): ChangeStatus {
    return JSON.parse(this.repo.engine.changeStatus(this.documentId, change));
  }

  /** Resolves once the server confirmed or rejected `change`. */
  whenSettled(change: string): Promise<ChangeStatus> {
    const now = this.status(change);
    if (now.status !== 'pending') return Promise.resolve(now);
    return new Promise((resolve) => {
      const check = () => {
        const s = this.status(change);
        if (s.status !== 'pending') {
          offA();
          offB();
          resolve(s);
        }
      };
      const offA = this.on('confirmed', check);
      const offB = this.on('rejected', check);
    });
  }

  /** Local changes the server has not confirmed yet (ids, oldest first). */
  pending(): string[] {
    return JSON.parse(this.repo.engine.pending(this.documentId));
  }

  /** The open conflicts (the conflict inbox). */
  conflicts(): Conflict[] {
    return JSON.parse(this.repo.engine.conflicts(this.documentId));
  }

  /** Settles conflict `key` with option `choice` (an index into its options). */
  resolveConflict(key: string, choice: number, by = this.repo.replicaId): string | undefined {
    return this.repo.call(() => this.repo.engine.resolveConflict(this.documentId, key, choice, by));
  }

  /** Open violations under the schemas given to the repo (a local warning). */
  violations(): Violation[] {
    return JSON.parse(this.repo.engine.checkInvariants(this.documentId));
  }

  /** @internal */
  dispatch(e: EngineEvent): void {
    switch (e.type) {
      case 'change':
        this.emit('change', { handle: this, doc: this.doc(), origin: e.origin! });
        break;
      case 'confirmed':
        this.emit('confirmed', { change: e.change!, seq: e.seq! });
        break;
      case 'rejected':
        this.emit('rejected', { change: e.change!, code: e.code!, reason: e.reason! });
        break;
      case 'compensated':
        this.emit('compensated', { change: e.change!, violation: e.violation!, reason: e.reason! });
        break;
      case 'violations':
        this.emit('violations', e.violations!);
        break;
      case 'subscribed':
        this.emit('subscribed', { headSeq: e.headSeq!, readOnly: e.readOnly! });
        break;
    }
  }
}

function random16(): Uint8Array {
  return crypto.getRandomValues(new Uint8Array(16));
}

let wasmReady: Promise<unknown> | undefined;

/** Many documents on one replica, synced with one server, like automerge-repo's Repo. */
export class Repo extends Emitter<RepoEvents> {
  /** @internal */ engine: WasmReplica;
  private handles = new Map<string, DocHandle>();
  private queue: Promise<void> = Promise.resolve();
  private socket: WebSocket | null = null;
  private state: ConnectionState = 'disconnected';
  private attempt = 0;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private wanted: boolean;
  private failed: Error | null = null;
  private readonly onOnline = () => this.online();
  private readonly onOffline = () => this.offline();

  private constructor(
    private readonly options: RepoOptions,
    private readonly db: KvDatabase,
    private readonly slot: Slot,
    engine: WasmReplica,
  ) {
    super();
    this.engine = engine;
    this.wanted = options.autoConnect !== false;
  }

  /** Opens (or creates) the local replica, loads it from IndexedDB and connects. */
  static async open(options: RepoOptions): Promise<Repo> {
    wasmReady ??= init(options.wasmUrl ? { module_or_path: options.wasmUrl } : undefined);
    await wasmReady;
    const name = options.name ?? 'default';
    const slot = await acquireSlot(name, options.tabs ?? 'separate');
    try {
      const db = await KvDatabase.open(`accord:${name}:${slot.index}`);
      const { keys, values } = await db.loadAll();
      const engine = new WasmReplica(keys, values, random16());
      for (const s of options.schemas ?? []) {
        engine.addSchema(typeof s === 'string' ? s : JSON.stringify(s));
      }
      const repo = new Repo(options, db, slot, engine);
      repo.pump(); // a fresh store wrote its replica id
      await repo.flush();
      addEventListener('online', repo.onOnline);
      addEventListener('offline', repo.onOffline);
      if (repo.wanted) repo.connect();
      return repo;
    } catch (e) {
      slot.release();
      throw e;
    }
  }

  /** This replica's id (stored with the slot; the Automerge actor of its changes). */
  get replicaId(): string {
    return this.engine.replicaId();
  }

  /** Which storage slot this tab holds (0 unless another tab holds the lower ones). */
  get storageSlot(): number {
    return this.slot.index;
  }

  get connectionState(): ConnectionState {
    return this.state;
  }

  /** Local changes not yet confirmed by the server, across documents. */
  get outboxSize(): number {
    return this.engine.outboxLen();
  }

  /** Creates a document. With `type`, it declares its type so the server's schema governs it. */
  create<T = any>(opts: { kind?: DocKind; type?: string } = {}): DocHandle<T> {
    const kind = opts.kind ?? 'automerge';
    const id = this.call(() => this.engine.create(random16(), kind, opts.type));
    return this.handle<T>(id, kind);
  }

  /** A document by id: the local copy, or an empty one of `kind` that sync fills. */
  find<T = any>(documentId: string, opts: { kind?: DocKind } = {}): DocHandle<T> {
    const existing = this.handles.get(documentId);
    if (existing) return existing as DocHandle<T>;
    const kind = this.call(() => this.engine.ensure(documentId, opts.kind ?? 'automerge')) as DocKind;
    return this.handle<T>(documentId, kind);
  }

  /** Every document this replica holds. */
  documents(): { documentId: string; kind: DocKind }[] {
    return (JSON.parse(this.engine.documents()) as [string, DocKind][]).map(([documentId, kind]) => ({
      documentId,
      kind,
    }));
  }

  private handle<T>(id: string, kind: DocKind): DocHandle<T> {
    let h = this.handles.get(id);
    if (!h) this.handles.set(id, (h = new DocHandle<T>(this, id, kind)));
    return h as DocHandle<T>;
  }

  /** Resolves when everything done so far is durable in IndexedDB and its frames were sent. */
  flush(): Promise<void> {
    return this.queue.then(() => {
      if (this.failed) throw this.failed;
    });
  }

  /** Resolves when the outbox is empty (every local change confirmed or rejected). */
  async whenSynced(timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.outboxSize > 0) {
      if (Date.now() > deadline) throw new Error(`outbox still holds ${this.outboxSize} changes`);
      await new Promise((r) => setTimeout(r, 25));
    }
    await this.flush();
  }

  /** Starts (or keeps) connecting, with reconnects. */
  connect(): void {
    this.wanted = true;
    if (this.state === 'closed' || this.failed) return;
    if (!navigator.onLine) return this.setState('offline');
    if (this.socket) return;
    clearTimeout(this.timer);
    this.timer = undefined;
    this.openSocket();
  }

  /** Closes the connection and stops reconnecting (edits stay local until connect()). */
  disconnect(): void {
    this.wanted = false;
    clearTimeout(this.timer);
    this.timer = undefined;
    this.dropSocket();
    if (this.state !== 'closed') this.setState(navigator.onLine ? 'disconnected' : 'offline');
  }

  /** Disconnects, waits for pending writes, closes the database and releases the tab lock. */
  async close(): Promise<void> {
    this.disconnect();
    removeEventListener('online', this.onOnline);
    removeEventListener('offline', this.onOffline);
    await this.queue;
    this.setState('closed');
    this.db.close();
    this.slot.release();
  }

  /** @internal Runs an engine call, then drains what it produced. */
  call<R>(f: () => R): R {
    if (this.failed) throw this.failed;
    try {
      return f();
    } finally {
      this.pump();
    }
  }

  /** Takes writes, frames and events now (in the engine's order) and handles them in order:
   * commit the writes, then send the frames, then deliver the events. */
  private pump(): void {
    const writes = this.engine.takeWrites() as KvWrite[];
    const frames = this.engine.takeFrames() as Uint8Array[];
    const events = JSON.parse(this.engine.takeEvents()) as EngineEvent[];
    const socket = this.socket;
    if (writes.length === 0 && frames.length === 0 && events.length === 0) return;
    this.queue = this.queue.then(async () => {
      if (this.failed) return;
      if (writes.length > 0) {
        try {
          await this.db.apply(writes);
        } catch (e) {
          return this.fail(e);
        }
      }
      if (socket && socket === this.socket && socket.readyState === WebSocket.OPEN) {
        for (const f of frames) socket.send(f);
      }
      for (const e of events) this.deliver(e);
    });
  }

  private fail(e: unknown): void {
    // Memory is now ahead of IndexedDB: stop sending anything; the app must reopen the repo.
    this.failed = e instanceof Error ? e : new Error(String(e));
    this.dropSocket();
    this.setState('closed');
    this.emit('error', this.failed);
  }

  private deliver(e: EngineEvent): void {
    if (e.type === 'connected') {
      this.attempt = 0;
      this.setState('connected');
      return;
    }
    if (e.type === 'peerError') {
      this.emit('peerError', { code: e.code!, document: e.document, message: e.message! });
      return;
    }
    if (e.type === 'change') this.emit('change', { documentId: e.document!, origin: e.origin! });
    if (e.document) this.handles.get(e.document)?.dispatch(e);
  }

  private setState(s: ConnectionState): void {
    if (this.state === s) return;
    this.state = s;
    this.emit('connection', s);
  }

  private openSocket(): void {
    this.setState('connecting');
    let ws: WebSocket;
    try {
      ws = new WebSocket(this.options.url);
    } catch (e) {
      this.emit('error', e as Error);
      return this.scheduleReconnect();
    }
    ws.binaryType = 'arraybuffer';
    this.socket = ws;
    ws.onopen = () => {
      if (this.socket !== ws) return;
      this.call(() => this.engine.connect(this.options.token));
    };
    ws.onmessage = (m) => {
      if (this.socket !== ws || !(m.data instanceof ArrayBuffer)) return;
      try {
        this.call(() => this.engine.handleFrame(new Uint8Array(m.data)));
      } catch (e) {
        // A frame the engine refused: drop the session, start again later.
        console.warn('accord: closing the connection:', e);
        this.dropSocket();
        this.scheduleReconnect();
      }
    };
    ws.onclose = () => {
      if (this.socket !== ws) return;
      this.dropSocket();
      this.scheduleReconnect();
    };
    ws.onerror = () => {
      /* onclose follows */
    };
  }

  private dropSocket(): void {
    const ws = this.socket;
    this.socket = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING) ws.close();
    }
    this.engine.disconnect();
  }

  private scheduleReconnect(): void {
    if (!this.wanted || this.state === 'closed' || this.failed) return;
    if (!navigator.onLine) return this.setState('offline');
    this.setState('disconnected');
    const base = this.options.backoff?.baseMs ?? 250;
    const max = this.options.backoff?.maxMs ?? 30_000;
    const delay = Math.random() * Math.min(max, base * 2 ** this.attempt); // full jitter
    this.attempt = Math.min(this.attempt + 1, 30);
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = undefined;
      if (this.wanted && !this.socket) this.openSocket();
    }, delay);
  }

  private online(): void {
    if (!this.wanted || this.state === 'closed') return;
    this.attempt = 0;
    this.connect();
  }

  private offline(): void {
    if (this.state === 'closed') return;
    clearTimeout(this.timer);
    this.timer = undefined;
    this.dropSocket();
    this.setState('offline');
  }
}

export { WasmReplica };
