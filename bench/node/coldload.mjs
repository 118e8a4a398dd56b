// Cold load (bench/run.sh workload 3): a document built from the automerge-paper trace sits on a
// server (its seeding client stays connected, so every server keeps it loaded); fresh clients
// join one after another and we time from creating the client until it holds the full text.
// Next to it: the same client library's own decode of the whole document, in this process.
//
//   node --expose-gc coldload.mjs --kind yjs --server-url ws://127.0.0.1:P/yjs --label accord
//   node --expose-gc coldload.mjs --kind yjs --server-url 'ws://127.0.0.1:P/d/{room}/ws' --label y-sweet
//   node coldload.mjs --kind automerge --server-url ws://127.0.0.1:P/automerge --label accord
//
// Prints one line `RESULT coldload ...`.
import fs from 'node:fs'
import path from 'node:path'
import { performance } from 'node:perf_hooks'
import WebSocket from 'ws'
import { args, median, mustBeLocal, readTrace, withTimeout, sleep } from './common.mjs'

const a = args()
const kind = a.kind || 'yjs'
const label = a.label || 'server'
const trials = Number(a.trials || (kind === 'yjs' ? 41 : 5))
const tracePath = a.trace || path.resolve(process.cwd(), '../../shared/data/traces/automerge-paper.json.gz')
const cacheDir = a['cache-dir'] || '/tmp/accord-bench-cache'
const room = `cold-${kind}-${Date.now().toString(36)}`
const serverUrl = String(a['server-url']).replaceAll('{room}', room)
mustBeLocal(serverUrl)

const trace = readTrace(tracePath)
// With `node --expose-gc` (bench/run.sh passes it): an empty young generation before each timed
// step, as a fresh client's is. Without it, V8's scavenges (6-9 ms each, with a half-built
// document alive in the young generation) landed in some loads and some decodes, one every few
// steps: the loads of every server were bimodal (10-11 or 15-20 ms) and which steps caught one
// decided the ratio. `node --trace-gc` showed a scavenge inside each slow load and in no fast
// one. A minor collection only: a full one before each step (tried in session 19) left the heap
// small and every decode took 51-66 ms.
const minorGc = typeof globalThis.gc === 'function' ? () => globalThis.gc({ type: 'minor' }) : () => {}
if (kind === 'yjs' && typeof globalThis.gc !== 'function') {
  console.error('coldload: run with `node --expose-gc` (as bench/run.sh does); without it, scavenges land in loads and decodes by chance')
}
const expected = trace.endContent.length

if (kind === 'yjs') {
  const Y = await import('yjs')
  const { WebsocketProvider } = await import('y-websocket')
  const syncProtocol = await import('y-protocols/sync')
  const encoding = await import('lib0/encoding')
  const decoding = await import('lib0/decoding')
  const seed = new Y.Doc()
  seed.clientID = 0x2f5a17 // fixed, so the encoded size is the same every run
  const t = seed.getText('t')
  for (const txn of trace.txns) {
    seed.transact(() => {
      for (const [pos, del, ins] of txn.patches) {
        if (del) t.delete(pos, del)
        if (ins) t.insert(pos, ins)
      }
    })
  }
  if (t.toString() !== trace.endContent) throw new Error('yjs: final text differs from the trace')
  const update = Y.encodeStateAsUpdate(seed)
  const opts = { WebSocketPolyfill: WebSocket, disableBc: true, connect: true }
  const seeder = new WebsocketProvider(serverUrl, room, seed, opts)
  await withTimeout(new Promise((r) => seeder.once('sync', r)), 30000, 'seeder sync')
  const loadOnce = async () => {
    const doc = new Y.Doc()
    const text = doc.getText('t')
    const t0 = performance.now()
    const done = new Promise((resolve) => {
      doc.on('update', () => { if (text.length === expected) resolve() })
    })
    const p = new WebsocketProvider(serverUrl, room, doc, opts)
    await withTimeout(done, 60000, 'yjs cold load')
    const ms = performance.now() - t0
    p.destroy()
    doc.destroy()
    return ms
  }
  await loadOnce() // warm-up: also proves the server holds the whole document
  // What the server sends a fresh client, as the client receives it: one raw socket asks with an
  // empty state vector (sync step 1, what the provider sends first) and keeps the answer (sync
  // step 2, the whole document). The time from asking to holding the answer is the server's own
  // share of a cold load (its lookup, encode and the transfer), without the client's connect.
  const syncStep2 = async () => {
    const ws = new WebSocket(`${serverUrl.replace(/\/$/, '')}/${room}`) // as the provider builds it
    ws.binaryType = 'arraybuffer'
    try {
      await withTimeout(new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) }), 10000, 'raw open')
      const ask = encoding.createEncoder()
      encoding.writeVarUint(ask, 0) // messageSync
      syncProtocol.writeSyncStep1(ask, new Y.Doc())
      const t0 = performance.now()
      const answer = new Promise((resolve) => {
        ws.on('message', (m) => {
          const msg = new Uint8Array(m)
          const d = decoding.createDecoder(msg)
          if (decoding.readVarUint(d) === 0 && decoding.readVarUint(d) === syncProtocol.messageYjsSyncStep2) resolve(msg)
        })
      })
      ws.send(encoding.toUint8Array(ask))
      const msg = await withTimeout(answer, 10000, 'raw sync step 2')
      return { msg, ms: performance.now() - t0 }
    } finally {
      ws.terminate()
    }
  }
  // The client's own processing of that answer, set up as a provider's client has it: a fresh
  // document whose text the app holds, an update listener (the provider installs one, and so does
  // loadOnce), and y-protocols reading the message. Measured between loads, in the same state of
  // the process (heap, JIT) as the loads, so the difference to a load is what the server and the
  // connection add.
  const { msg } = await syncStep2()
  const decodeOnce = () => {
    const d = new Y.Doc()
    const text = d.getText('t')
    d.on('update', () => {})
    const t0 = performance.now()
    const dec = decoding.createDecoder(msg)
    decoding.readVarUint(dec)
    syncProtocol.readSyncMessage(dec, encoding.createEncoder(), d, 'server')
    const ms = performance.now() - t0
    if (text.length !== expected) throw new Error('yjs: the server sent an incomplete document')
    d.destroy()
    return ms
  }
  const loads = []
  const decodes = []
  const serverMs = []
  for (let i = 0; i < trials; i++) {
    minorGc(); loads.push(await loadOnce()); await sleep(100)
    minorGc(); decodes.push(decodeOnce()); await sleep(100)
    serverMs.push((await syncStep2()).ms); await sleep(100)
  }
  // The library's decode alone, back to back (hot): the lowest the client could ever take.
  const bare = []
  for (let i = 0; i < trials; i++) {
    minorGc()
    const t0 = performance.now()
    const d = new Y.Doc()
    Y.applyUpdate(d, update)
    if (d.getText('t').length !== expected) throw new Error('decode')
    bare.push(performance.now() - t0)
  }
  seeder.destroy()
  const e2e = median(loads), dec = median(decodes), hot = median(bare)
  // Each load and the decode right after it, as a pair: this machine's slow spells last seconds
  // (loads of 10-11 ms, then a run of 15-19 ms), so a ratio within a pair leaves them out, where
  // the ratio of the two medians follows whichever steps they caught.
  const paired = median(loads.map((l, i) => l / decodes[i]))
  console.log(`RESULT coldload ${label} kind=yjs bytes=${update.length} e2e_ms=${e2e.toFixed(1)} decode_ms=${dec.toFixed(1)} ratio=${(e2e / dec).toFixed(2)} paired_ratio=${paired.toFixed(2)} server_ms=${median(serverMs).toFixed(1)} hot_decode_ms=${hot.toFixed(1)} hot_ratio=${(e2e / hot).toFixed(2)} loads=${loads.map((x) => x.toFixed(0)).join('/')}`)
  process.exit(0)
} else {
  const A = await import('@automerge/automerge')
  const { Repo } = await import('@automerge/automerge-repo')
  const { WebSocketClientAdapter } = await import('@automerge/automerge-repo-network-websocket')
  fs.mkdirSync(cacheDir, { recursive: true })
  const cached = path.join(cacheDir, 'automerge-paper.automerge')
  let bytes
  if (fs.existsSync(cached)) {
    bytes = new Uint8Array(fs.readFileSync(cached))
  } else {
    // One change per trace transaction, as the editor made them (cached: it takes a while).
    const t0 = performance.now()
    let doc = A.from({ text: '' })
    for (const txn of trace.txns) {
      doc = A.change(doc, (d) => {
        for (const [pos, del, ins] of txn.patches) A.splice(d, ['text'], pos, del, ins)
      })
    }
    bytes = A.save(doc)
    fs.writeFileSync(cached, bytes)
    console.error(`automerge: built in ${((performance.now() - t0) / 1000).toFixed(1)} s`)
  }
  const seedDoc = A.load(bytes)
  if (seedDoc.text !== trace.endContent) throw new Error('automerge: final text differs from the trace')
  const seedRepo = new Repo({ network: [new WebSocketClientAdapter(serverUrl)] })
  const handle = seedRepo.import(bytes)
  const docUrl = handle.url
  await sleep(500)
  const loadOnce = async () => {
    const t0 = performance.now()
    const repo = new Repo({ network: [new WebSocketClientAdapter(serverUrl)] })
    try {
      const h = await withTimeout(repo.find(docUrl), 120000, 'automerge find')
      const complete = () => (h.doc()?.text?.length ?? 0) === expected
      if (!complete()) {
        await withTimeout(new Promise((resolve) => {
          const on = () => { if (complete()) { h.off('change', on); resolve() } }
          h.on('change', on)
          on()
        }), 120000, 'automerge cold load')
      }
      return performance.now() - t0
    } finally {
      await repo.shutdown().catch(() => {})
    }
  }
  // Warm-up, retried until the server holds the whole document (the seeder uploads it through
  // the sync protocol, which takes a while).
  const seeded = performance.now()
  for (;;) {
    try { await loadOnce(); break } catch (e) {
      if (performance.now() - seeded > 300000) throw e
      await sleep(1000)
    }
  }
  console.error(`automerge: the server held the document after ${((performance.now() - seeded) / 1000).toFixed(1)} s`)
  const loads = []
  let unavailable = 0
  for (let i = 0; i < trials; i++) {
    try { loads.push(await loadOnce()) } catch (e) {
      // A server that answers "unavailable" for a document it holds: counted, then retried.
      if (!/unavailable/.test(String(e)) || ++unavailable > 3 * trials) throw e
      i--
    }
    await sleep(100)
  }
  const decodes = []
  for (let i = 0; i < trials; i++) {
    const t0 = performance.now()
    const d = A.load(bytes)
    if (d.text.length !== expected) throw new Error('decode')
    decodes.push(performance.now() - t0)
  }
  await seedRepo.shutdown().catch(() => {})
  const e2e = median(loads), dec = median(decodes)
  console.log(`RESULT coldload ${label} kind=automerge bytes=${bytes.length} e2e_ms=${e2e.toFixed(1)} decode_ms=${dec.toFixed(1)} ratio=${(e2e / dec).toFixed(2)} loads=${loads.map((x) => x.toFixed(0)).join('/')} unavailable=${unavailable}`)
  process.exit(0)
}
