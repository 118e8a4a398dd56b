// What a server keeps per connection after large messages (BENCHMARKS, session 12): one client
// uploads a 1 MiB Yjs document to a y-websocket room, then N clients join it (sync step 1 with an
// empty state vector: each is sent the whole document) and stay open; the server's RSS is read
// from /proc before and after. With --upload, the N clients instead each send the same 1 MiB
// update (what a Yjs client holding the document sends when it connects).
//
//   cd bench/node && node large-join.mjs --url ws://127.0.0.1:PORT/yjs/room --server-pid PID [--n 20] [--upload]
import { readFileSync } from 'node:fs'
import WebSocket from 'ws'
import * as Y from 'yjs'
import * as encoding from 'lib0/encoding'
import * as syncProtocol from 'y-protocols/sync'
import { args } from './common.mjs'

const a = args()
const n = Number(a.n || 20)
const rssKb = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${a['server-pid']}/status`, 'utf8'))[1])
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const open = async () => {
  const ws = new WebSocket(a.url)
  await new Promise((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject) })
  return ws
}
const frame = (write) => {
  const e = encoding.createEncoder()
  encoding.writeVarUint(e, 0) // a sync message
  write(e)
  return encoding.toUint8Array(e)
}

const doc = new Y.Doc()
doc.clientID = 4242
doc.getText('t').insert(0, 'x'.repeat(1 << 20))
const upload = frame((e) => syncProtocol.writeUpdate(e, Y.encodeStateAsUpdate(doc)))
const first = await open()
first.on('message', () => {})
first.send(upload)
await sleep(1000)
const before = rssKb()
const sockets = []
for (let i = 0; i < n; i++) {
  const ws = await open()
  let whole = false
  ws.on('message', (m) => { if (m.length >= 1 << 20) whole = true })
  if (a.upload) {
    ws.send(upload)
  } else {
    ws.send(frame((e) => syncProtocol.writeSyncStep1(e, new Y.Doc())))
    for (let t = 0; t < 100 && !whole; t++) await sleep(50)
    if (!whole) throw new Error(`client ${i} was not sent the document`)
  }
  sockets.push(ws)
}
await sleep(3000)
const after = rssKb()
console.log(`RESULT large-join mode=${a.upload ? 'upload' : 'join'} clients=${n} rss_before_kb=${before} rss_after_kb=${after} kb_per_client=${((after - before) / n).toFixed(0)}`)
for (const ws of [first, ...sockets]) ws.terminate()
