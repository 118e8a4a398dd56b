import path from 'node:path'
import { performance } from 'node:perf_hooks'
import WebSocket from 'ws'
import { args, readTrace, withTimeout, sleep } from './common.mjs'
const a = args()
const serverUrl = String(a['server-url']).replaceAll('{room}', 'probe-room')
const trace = readTrace('/work/shared/data/traces/automerge-paper.json.gz')
const expected = trace.endContent.length
const Y = await import('yjs')
const { WebsocketProvider } = await import('y-websocket')
const seed = new Y.Doc(); seed.clientID = 0x2f5a17
const t = seed.getText('t')
for (const txn of trace.txns) seed.transact(() => { for (const [pos, del, ins] of txn.patches) { if (del) t.delete(pos, del); if (ins) t.insert(pos, ins) } })
let T0 = 0; let log = []
class LoggingWS extends WebSocket {
  constructor (...args) { super(...args); const me = this
    this.on('upgrade', () => log.push(['upgrade', performance.now() - T0]))
    this.on('open', () => log.push(['open', performance.now() - T0]))
    this.on('message', (m) => log.push(['msg ' + (m.byteLength ?? m.length), performance.now() - T0]))
    const send = this.send.bind(this); this.send = (d, ...r) => { log.push(['send ' + d.length + ' ' + d[0] + '/' + d[1], performance.now() - T0]); return send(d, ...r) }
  }
}
const opts = { WebSocketPolyfill: LoggingWS, disableBc: true, connect: true }
const seeder = new WebsocketProvider(serverUrl, 'probe-room', seed, { ...opts, WebSocketPolyfill: WebSocket })
await withTimeout(new Promise((r) => seeder.once('sync', r)), 30000, 'seeder sync')
for (let i = 0; i < 12; i++) {
  const doc = new Y.Doc(); const text = doc.getText('t')
  log = []; T0 = performance.now()
  const done = new Promise((resolve) => doc.on('update', () => { if (text.length === expected) resolve() }))
  const p = new WebsocketProvider(serverUrl, 'probe-room', doc, opts)
  await done; log.push(['done', performance.now() - T0])
  console.log(log.map(([k, v]) => `${k}@${v.toFixed(1)}`).join('  '))
  p.destroy(); doc.destroy(); await sleep(200)
}
seeder.destroy(); process.exit(0)
