// What a Y.Doc's own setup adds to decoding the automerge-paper document (BENCHMARKS, session 5):
// `Y.applyUpdate` into a bare document, into one whose text was created first, and into one with
// an `update` listener (as y-websocket's provider installs). Medians of 41, two rounds.
//
//   cd bench/node && node decode-listener.mjs [--trace PATH]
import path from 'node:path'
import { performance } from 'node:perf_hooks'
import * as Y from 'yjs'
import { args, median, readTrace } from './common.mjs'

const a = args()
const trace = readTrace(a.trace || path.resolve(process.cwd(), '../../../shared/data/traces/automerge-paper.json.gz'))
const seed = new Y.Doc()
seed.clientID = 0x2f5a17
const t = seed.getText('t')
for (const txn of trace.txns) {
  seed.transact(() => {
    for (const [pos, del, ins] of txn.patches) {
      if (del) t.delete(pos, del)
      if (ins) t.insert(pos, ins)
    }
  })
}
const update = Y.encodeStateAsUpdate(seed)
const run = (name, f) => {
  const xs = []
  for (let i = 0; i < 41; i++) { const t0 = performance.now(); f(); xs.push(performance.now() - t0) }
  console.log(`${name} ${median(xs).toFixed(2)} ms`)
}
for (let round = 0; round < 2; round++) {
  run('bare', () => { const d = new Y.Doc(); Y.applyUpdate(d, update); d.getText('t').length })
  run('text-first', () => { const d = new Y.Doc(); const x = d.getText('t'); Y.applyUpdate(d, update); x.length })
  run('update-listener', () => { const d = new Y.Doc(); const x = d.getText('t'); d.on('update', () => {}); Y.applyUpdate(d, update); x.length })
}
console.log(`update bytes ${update.length}`)
