// Typists (bench/run.sh workload 4): N real automerge-repo clients (one Repo each, all in this
// process) type 6 characters a second each at the end of one shared text for --seconds. Server
// CPU comes from /proc/{--server-pid}. Lag: characters typed but not yet seen by the slowest
// client when typing stops, and how long until every client holds every character (bounded).
//
//   node typists.mjs --server-url ws://127.0.0.1:P/automerge --n 8 --server-pid PID --label accord
import { performance } from 'node:perf_hooks'
import * as A from '@automerge/automerge'
import { Repo } from '@automerge/automerge-repo'
import { WebSocketClientAdapter } from '@automerge/automerge-repo-network-websocket'
import { args, mustBeLocal, procUsage, sleep, withTimeout } from './common.mjs'

const a = args()
const url = String(a['server-url'])
mustBeLocal(url)
const n = Number(a.n || 8)
const seconds = Number(a.seconds || 20)
const rate = Number(a.rate || 6)
const label = a.label || 'server'
const pid = Number(a['server-pid'] || 0)
const catchUpMs = Number(a['catch-up-ms'] || 30000)

const repos = []
const handles = []
const first = new Repo({ network: [new WebSocketClientAdapter(url)] })
repos.push(first)
const h0 = first.create({ text: '' })
handles.push(h0)
await sleep(1000)
for (let i = 1; i < n; i++) {
  const repo = new Repo({ network: [new WebSocketClientAdapter(url)] })
  repos.push(repo)
  handles.push(await withTimeout(repo.find(h0.url), 30000, `typist ${i} find`))
}
await sleep(1000)
const before = procUsage(pid)
const clientBefore = process.cpuUsage()
const t0 = performance.now()
let typed = 0
const period = 1000 / rate
const timers = handles.map((h, i) =>
  setTimeout(function tick() {
    if (performance.now() - t0 >= seconds * 1000) return
    h.change((d) => A.splice(d, ['text'], d.text.length, 0, String.fromCharCode(97 + (i % 26))))
    typed++
    timers[i] = setTimeout(tick, period)
  }, (i * period) / n),
)
const lagSamples = []
while (performance.now() - t0 < seconds * 1000) {
  await sleep(1000)
  const min = Math.min(...handles.map((h) => h.doc().text.length))
  lagSamples.push(typed - min)
}
const elapsed = (performance.now() - t0) / 1000
const after = procUsage(pid)
const clientCpu = process.cpuUsage(clientBefore)
const lagAtStop = typed - Math.min(...handles.map((h) => h.doc().text.length))
const tc = performance.now()
let caughtUp = false
while (performance.now() - tc < catchUpMs) {
  if (handles.every((h) => h.doc().text.length === typed)) { caughtUp = true; break }
  await sleep(50)
}
const catchUp = (performance.now() - tc) / 1000
const cores = before && after ? (after.cpu - before.cpu) / elapsed : NaN
console.log(`RESULT typists ${label} n=${n} typed=${typed} seconds=${elapsed.toFixed(1)} server_cores=${cores.toFixed(3)} cores_per_typist=${(cores / n).toFixed(4)} server_rss_mb=${after ? (after.rss / 1e6).toFixed(1) : 'NaN'} lag_chars_at_stop=${lagAtStop} max_lag_chars=${Math.max(...lagSamples)} caught_up=${caughtUp} catch_up_s=${catchUp.toFixed(2)} client_cores=${((clientCpu.user + clientCpu.system) / 1e6 / elapsed).toFixed(2)}`)
for (const r of repos) r.shutdown().catch(() => {})
await sleep(200)
process.exit(0)
