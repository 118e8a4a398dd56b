// Browser tests: the real package in headless Debian Chromium (playwright-core), syncing through
// a real accord-server binary started here. Run by ../test.sh (or `npm test` after a build).
//
// Env: ACCORD_SERVER (the binary), CHROMIUM (default /usr/bin/chromium).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createServer } from 'node:http';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, extname, normalize, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import net from 'node:net';
import { chromium } from 'playwright-core';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const SERVER_BIN = process.env.ACCORD_SERVER ?? '/work/target-wasm/debug/accord-server';
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const SCHEMA = join(ROOT, '..', 'sync-server', 'examples', 'trip.schema.json');
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'];
const WAIT = 20_000;

let server, serverDir, staticServer, browser, wsUrl, pageUrl, userDirs = [];

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

const MIME = {
  '.html': 'text/html',
  '.js': 'text/javascript',
  '.mjs': 'text/javascript',
  '.wasm': 'application/wasm',
  '.json': 'application/json',
  '.ts': 'text/plain',
};

function serveStatic() {
  return new Promise((resolve) => {
    const s = createServer(async (req, res) => {
      const path = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname));
      if (!/^\/(dist|pkg|test)\//.test(path)) {
        res.writeHead(404).end();
        return;
      }
      try {
        const body = await readFile(join(ROOT, path));
        res.writeHead(200, {
          'content-type': MIME[extname(path)] ?? 'application/octet-stream',
          'cache-control': 'no-store',
        });
        res.end(body);
      } catch {
        res.writeHead(404).end();
      }
    });
    s.listen(0, '127.0.0.1', () => resolve(s));
  });
}

async function waitFor(check, what, timeout = WAIT) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

let serverPort;

async function startServer() {
  server = spawn(
    SERVER_BIN,
    ['serve', '--no-auth', '--listen', `127.0.0.1:${serverPort}`, '--data-dir', serverDir,
     '--schema', SCHEMA, '--reconcile-interval-ms', '500'],
    { stdio: ['ignore', 'inherit', 'inherit'], env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn' } },
  );
  const exited = new Promise((resolve) => server.on('exit', resolve));
  server.exited = exited;
  await waitFor(async () => (await fetch(`http://127.0.0.1:${serverPort}/healthz`)).ok, 'accord-server /healthz');
}

async function stopServer() {
  server.kill('SIGTERM');
  const t = setTimeout(() => server.kill('SIGKILL'), 5000);
  await server.exited;
  clearTimeout(t);
}

before(async () => {
  serverPort = await freePort();
  const port = serverPort;
  serverDir = await mkdtemp(join(tmpdir(), 'accord-wasm-test-'));
  await startServer();
  wsUrl = `ws://127.0.0.1:${port}/sync`;
  staticServer = await serveStatic();
  pageUrl = `http://127.0.0.1:${staticServer.address().port}/test/page.html`;
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ARGS });
});

after(async () => {
  await browser?.close();
  staticServer?.close();
  server?.kill('SIGTERM');
  await rm(serverDir, { recursive: true, force: true });
  for (const d of userDirs) await rm(d, { recursive: true, force: true });
});

/** Loads the test page and opens a repo in it (window.repo). */
async function openRepo(page, opts = {}) {
  page.on('pageerror', (e) => console.error('[page error]', e));
  page.on('console', (m) => {
    const quiet = /WebSocket connection to|Failed to load resource/.test(m.text()); // expected while offline
    if ((m.type() === 'error' || m.type() === 'warning') && !quiet) console.error(`[browser ${m.type()}]`, m.text());
  });
  await page.goto(pageUrl);
  await page.waitForFunction(() => window.accordLoaded === true);
  return page.evaluate(async ({ url, opts }) => {
    window.repo = await window.Accord.Repo.open({ url, backoff: { baseMs: 100, maxMs: 1000 }, ...opts });
    window.states = [window.repo.connectionState];
    window.repo.on('connection', (s) => window.states.push(s));
    return { replicaId: window.repo.replicaId, slot: window.repo.storageSlot };
  }, { url: wsUrl, opts });
}

const state = (page) => page.evaluate(() => window.repo.connectionState);
const docOf = (page, id, kind) =>
  page.evaluate(({ id, kind }) => window.repo.find(id, { kind }).doc(), { id, kind });
const change = (page, id, ops) =>
  page.evaluate(({ id, ops }) => window.repo.find(id).change(ops), { id, ops });
const connected = (page) => waitFor(async () => (await state(page)) === 'connected', 'connected');

test('two browser contexts sync both document kinds through the server', async () => {
  const [ca, cb] = [await browser.newContext(), await browser.newContext()];
  const [a, b] = [await ca.newPage(), await cb.newPage()];
  const ra = await openRepo(a);
  const rb = await openRepo(b);
  assert.notEqual(ra.replicaId, rb.replicaId);
  await connected(a);
  await connected(b);
  for (const kind of ['automerge', 'yrs']) {
    const id = await a.evaluate((kind) => {
      const h = window.repo.create({ kind });
      h.change((d) => d.put(['doc'], { title: 'hello', items: [] }).increment(['doc', 'n'], 2));
      return h.documentId;
    }, kind);
    // B subscribes through the JS API and watches changes.
    await b.evaluate(({ id, kind }) => {
      window.seen = [];
      window.repo.find(id, { kind }).on('change', (e) => window.seen.push(e.origin));
    }, { id, kind });
    await waitFor(async () => (await docOf(b, id, kind)).doc?.title === 'hello', `${kind}: B sees A's edit`);
    // The event follows the IndexedDB write of what arrived, so it may trail the state by a moment.
    await waitFor(async () => (await b.evaluate(() => window.seen)).includes('remote'), `${kind}: B's change event says remote`);
    const cid = await change(b, id, [{ op: 'increment', path: ['doc', 'n'], by: 3 }, { op: 'put', path: ['doc', 'by'], value: 'b' }]);
    assert.match(cid, /^[0-9a-f]{64}$/);
    const status = await b.evaluate(({ id, cid }) => window.repo.find(id).whenSettled(cid), { id, cid });
    assert.equal(status.status, 'confirmed', `${kind}: ${JSON.stringify(status)}`);
    assert.ok(status.seq >= 1);
    await waitFor(async () => (await docOf(a, id, kind)).doc.by === 'b', `${kind}: A sees B's edit`);
    const [da, db] = [await docOf(a, id, kind), await docOf(b, id, kind)];
    assert.deepEqual(da, db);
    assert.equal(da.doc.n, 5, `${kind}: counters add up`);
  }
  await ca.close();
  await cb.close();
});

test('offline edits survive a reload and converge when the connection returns', async () => {
  const [ca, cb] = [await browser.newContext(), await browser.newContext()];
  const [a, b] = [await ca.newPage(), await cb.newPage()];
  await openRepo(a);
  const rb = await openRepo(b);
  await connected(a);
  await connected(b);
  const id = await a.evaluate(() => {
    const h = window.repo.create();
    h.change((d) => d.put(['notes'], {}).splice(['text'], 0, 0, 'hello'));
    return h.documentId;
  });
  await waitFor(async () => (await docOf(b, id)).text === 'hello', 'B has the document');

  await cb.setOffline(true);
  await waitFor(async () => (await state(b)) === 'offline', 'B offline');
  const offlineChange = await change(b, id, [
    { op: 'put', path: ['notes', 'b1'], value: 'written offline' },
    { op: 'splice', path: ['text'], index: 5, delete: 0, insert: ' world' },
  ]);
  await change(b, id, [{ op: 'put', path: ['notes', 'b2'], value: 'second offline edit' }]);
  await b.evaluate(() => window.repo.flush());
  assert.equal(await b.evaluate(() => window.repo.outboxSize), 2);
  await change(a, id, [{ op: 'put', path: ['notes', 'a1'], value: 'written online' }]);

  // Reload while offline: leave the page (its socket and lock go with it), then come back.
  await b.goto('about:blank');
  await cb.setOffline(false);
  const again = await openRepo(b, { autoConnect: false });
  assert.equal(again.replicaId, rb.replicaId, 'the replica id survives a reload');
  const reloaded = await b.evaluate((id) => {
    const h = window.repo.find(id);
    return { doc: h.doc(), pending: h.pending(), outbox: window.repo.outboxSize };
  }, id);
  assert.equal(reloaded.doc.notes.b1, 'written offline');
  assert.equal(reloaded.doc.notes.b2, 'second offline edit');
  assert.equal(reloaded.doc.text, 'hello world');
  assert.equal(reloaded.outbox, 2, 'the outbox survived the reload');
  assert.ok(reloaded.pending.includes(offlineChange));
  assert.equal((await docOf(a, id)).notes.b1, undefined, 'A has not seen the offline edit yet');

  await b.evaluate(() => window.repo.connect());
  await connected(b);
  await b.evaluate(() => window.repo.whenSynced());
  const status = await b.evaluate(({ id, c }) => window.repo.find(id).whenSettled(c), { id, c: offlineChange });
  assert.equal(status.status, 'confirmed');
  await waitFor(async () => (await docOf(a, id)).notes.b2 === 'second offline edit', 'A converges');
  await waitFor(async () => (await docOf(b, id)).notes.a1 === 'written online', 'B converges');
  assert.deepEqual(await docOf(a, id), await docOf(b, id));
  assert.equal((await docOf(a, id)).text, 'hello world');

  // A settled status is stored with the change's settlement: it reads the same after a reload.
  await b.evaluate(() => window.repo.flush());
  await b.goto('about:blank');
  await openRepo(b, { autoConnect: false });
  const after = await b.evaluate(({ id, c }) => window.repo.find(id).status(c), { id, c: offlineChange });
  assert.equal(after.status, 'confirmed', JSON.stringify(after));
  assert.equal(after.seq, status.seq);
  await ca.close();
  await cb.close();
});

test('edits made offline survive a browser restart (persistent profile)', async () => {
  const userDir = await mkdtemp(join(tmpdir(), 'accord-wasm-profile-'));
  userDirs.push(userDir);
  const ca = await browser.newContext();
  const a = await ca.newPage();
  await openRepo(a);
  await connected(a);
  const id = await a.evaluate(() => {
    const h = window.repo.create({ kind: 'yrs' });
    h.change((d) => d.put(['list'], {}));
    return h.documentId;
  });
  await a.evaluate(() => window.repo.whenSynced());

  const launch = () =>
    chromium.launchPersistentContext(userDir, { executablePath: CHROMIUM, headless: true, args: ARGS });
  let p = await launch();
  let page = p.pages()[0] ?? (await p.newPage());
  const first = await openRepo(page, { autoConnect: false });
  await page.evaluate((id) => {
    const h = window.repo.find(id, { kind: 'yrs' });
    h.change((d) => d.put(['list', 'x'], 'made before the restart'));
  }, id);
  await page.evaluate(() => window.repo.flush());
  await p.close(); // the whole browser goes away

  p = await launch();
  page = p.pages()[0] ?? (await p.newPage());
  const second = await openRepo(page, { autoConnect: false });
  assert.equal(second.replicaId, first.replicaId);
  assert.equal(await page.evaluate(() => window.repo.outboxSize), 1);
  assert.equal((await docOf(page, id, 'yrs')).list.x, 'made before the restart');
  await page.evaluate(() => window.repo.connect());
  await page.evaluate(() => window.repo.whenSynced());
  await waitFor(async () => (await docOf(a, id, 'yrs')).list?.x === 'made before the restart', 'A sees it');
  await p.close();
  await ca.close();
});

test('a seat booked twice becomes a conflict in the JS API; resolving it converges', async () => {
  for (const kind of ['automerge', 'yrs']) {
    const [ca, cb] = [await browser.newContext(), await browser.newContext()];
    const [a, b] = [await ca.newPage(), await cb.newPage()];
    const schema = JSON.parse(await readFile(SCHEMA, 'utf8'));
    await openRepo(a, { schemas: [schema] });
    await openRepo(b, { schemas: [schema] });
    await connected(a);
    await connected(b);
    const id = await a.evaluate((kind) => {
      const h = window.repo.create({ kind, type: 'trip' });
      h.change((d) => d.put(['trip'], { status: 'planning', bookings: {}, payments: {}, bus: {} }));
      return h.documentId;
    }, kind);
    await a.evaluate(() => window.repo.whenSynced());
    await waitFor(async () => (await docOf(b, id, kind)).trip?.status === 'planning', 'B has the trip');
    assert.equal(await b.evaluate((id) => window.repo.find(id).type(), id), 'trip');

    await ca.setOffline(true);
    await cb.setOffline(true);
    await waitFor(async () => (await state(a)) === 'offline' && (await state(b)) === 'offline', 'both offline');
    const anaChange = await change(a, id, [{ op: 'put', path: ['trip', 'bookings', 'b-ana'], value: { seat: '12A', by: 'ana' } }]);
    const benChange = await change(b, id, [{ op: 'put', path: ['trip', 'bookings', 'b-ben'], value: { seat: '12A', by: 'ben' } }]);
    await ca.setOffline(false);
    await cb.setOffline(false);

    const conflictsOf = (page) => page.evaluate((id) => window.repo.find(id).conflicts(), id);
    const [ofA, ofB] = await Promise.all([
      waitFor(async () => { const c = await conflictsOf(a); return c.length === 1 && c; }, `${kind}: conflict on A`),
      waitFor(async () => { const c = await conflictsOf(b); return c.length === 1 && c; }, `${kind}: conflict on B`),
    ]);
    assert.deepEqual(ofA, ofB);
    const conflict = ofB[0];
    assert.equal(conflict.invariant, 'seat-once');
    assert.match(conflict.question, /(ana and ben|ben and ana) all claimed seat "12A"/);
    const anaOption = conflict.options.findIndex((o) => o.author === 'ana');
    assert.ok(anaOption >= 0, JSON.stringify(conflict));

    // Ben gives the seat to Ana.
    const choice = await b.evaluate(({ id, key, anaOption }) =>
      window.repo.find(id).resolveConflict(key, anaOption, 'ben'), { id, key: conflict.key, anaOption });
    assert.ok(choice);
    for (const page of [a, b]) {
      await waitFor(async () => (await conflictsOf(page)).length === 0, `${kind}: conflict closed`);
      await page.evaluate(() => window.repo.whenSynced());
    }
    await waitFor(async () => JSON.stringify(await docOf(a, id, kind)) === JSON.stringify(await docOf(b, id, kind)), `${kind}: converged`);
    const status = (page, c) => page.evaluate(({ id, c }) => window.repo.find(id).status(c), { id, c });
    await waitFor(async () => (await status(b, benChange)).status === 'compensated', `${kind}: Ben's booking compensated`);
    const ben = await status(b, benChange);
    assert.equal(ben.invariant, 'seat-once');
    assert.equal(ben.by, 'ben');
    assert.equal((await status(a, anaChange)).status, 'confirmed');
    assert.ok(JSON.stringify(await docOf(a, id, kind)).includes('chose'));
    await ca.close();
    await cb.close();
  }
});

test('two tabs of one origin: Web Locks give each its own storage slot and replica id', async () => {
  const ctx = await browser.newContext();
  const [t1, t2] = [await ctx.newPage(), await ctx.newPage()];
  const r1 = await openRepo(t1, { name: 'tabs' });
  const r2 = await openRepo(t2, { name: 'tabs' });
  assert.equal(r1.slot, 0);
  assert.equal(r2.slot, 1);
  assert.notEqual(r1.replicaId, r2.replicaId);
  await connected(t1);
  await connected(t2);
  const id = await t1.evaluate(() => {
    const h = window.repo.create();
    h.change((d) => d.put(['from'], { t1: true }));
    return h.documentId;
  });
  await waitFor(async () => (await docOf(t2, id)).from?.t1, 'tab 2 sees tab 1');
  await change(t2, id, [{ op: 'put', path: ['from', 't2'], value: true }]);
  await waitFor(async () => (await docOf(t1, id)).from?.t2, 'tab 1 sees tab 2');
  // Tab 1 closes: its slot (and replica id, and documents) go to the next tab that opens.
  await t1.close();
  const t3 = await ctx.newPage();
  const r3 = await openRepo(t3, { name: 'tabs', autoConnect: false });
  assert.equal(r3.slot, 0);
  assert.equal(r3.replicaId, r1.replicaId);
  assert.equal((await docOf(t3, id)).from.t1, true);
  await ctx.close();
});

test("tabs: 'wait' makes a second tab wait for the first one's lock", async () => {
  const ctx = await browser.newContext();
  const [t1, t2] = [await ctx.newPage(), await ctx.newPage()];
  const r1 = await openRepo(t1, { name: 'waiting', tabs: 'wait', autoConnect: false });
  let opened = false;
  const second = openRepo(t2, { name: 'waiting', tabs: 'wait', autoConnect: false }).then((r) => {
    opened = true;
    return r;
  });
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(opened, false, 'the second tab waits');
  await t1.evaluate(() => window.repo.close());
  const r2 = await second;
  assert.equal(r2.slot, 0);
  assert.equal(r2.replicaId, r1.replicaId, 'same slot, same replica id, one tab at a time');
  await ctx.close();
});

test('reconnects with exponential backoff while the server is down', async () => {
  const ctx = await browser.newContext();
  const p = await ctx.newPage();
  await openRepo(p);
  await connected(p);
  const id = await p.evaluate(() => {
    const h = window.repo.create();
    h.change((d) => d.put(['v'], 1));
    return h.documentId;
  });
  await p.evaluate(() => window.repo.whenSynced());
  await stopServer();
  await waitFor(async () => (await state(p)) === 'disconnected', 'disconnected');
  await change(p, id, [{ op: 'put', path: ['v'], value: 2 }]);
  await new Promise((r) => setTimeout(r, 1500)); // several failed attempts (100 ms doubling, max 1 s)
  const attempts = await p.evaluate(() => window.states.filter((s) => s === 'connecting').length);
  assert.ok(attempts >= 3, `retried ${attempts} times`);
  assert.equal(await p.evaluate(() => window.repo.outboxSize), 1);
  await startServer();
  await connected(p);
  await p.evaluate(() => window.repo.whenSynced());
  const fresh = await (await browser.newContext()).newPage();
  await openRepo(fresh);
  await waitFor(async () => (await docOf(fresh, id)).v === 2, 'the edit made while the server was down arrives');
  await ctx.close();
});
