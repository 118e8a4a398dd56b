// Unmodified automerge-repo clients (WebSocketClientAdapter) against accord-server's /automerge.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { Repo, parseAutomergeUrl, generateAutomergeUrl } from '@automerge/automerge-repo'
import { WebSocketClientAdapter } from '@automerge/automerge-repo-network-websocket'
import { Server, until, sleep, uuidOf } from '../helpers.js'

let server
const repos = []

before(async () => { server = await new Server().start() })
after(async () => {
  for (const repo of repos) await repo.shutdown().catch(() => {})
  await server.cleanup()
})

function repo () {
  const r = new Repo({ network: [new WebSocketClientAdapter(`${server.ws}/automerge`, 300)] })
  repos.push(r)
  return r
}

const accordId = url => uuidOf(parseAutomergeUrl(url).binaryDocumentId)

test('three automerge-repo clients edit concurrently and converge; Accord stores the document', async () => {
  const [a, b, c] = [repo(), repo(), repo()]
  const handle = a.create({ items: [], counters: {} })
  await until(async () => (await server.read(accordId(handle.url)))?.kind === 'automerge', 'created on the server')
  const handles = [handle, await b.find(handle.url), await c.find(handle.url)]
  const rounds = 15
  await Promise.all(handles.map(async (h, i) => {
    for (let n = 0; n < rounds; n++) {
      h.change(d => { d.items.push(`c${i}-${n}`); d.counters[`c${i}`] = n })
      await sleep(Math.random() * 10)
    }
  }))
  const expected = 3 * rounds
  await until(() => handles.every(h => h.doc().items.length === expected), 'every repo has every edit', 20000)
  const [x, y, z] = handles.map(h => h.doc())
  assert.deepEqual(y.items, x.items)
  assert.deepEqual(z.items, x.items)
  assert.deepEqual(x.counters, { c0: rounds - 1, c1: rounds - 1, c2: rounds - 1 })
  const stored = await until(async () => {
    const d = await server.read(accordId(handle.url))
    return d?.state.items?.length === expected && d
  }, 'server holds every edit')
  assert.deepEqual(stored.state.items, x.items)
  assert.ok(stored.head_seq >= expected, `head_seq ${stored.head_seq}`)
})

test('ephemeral messages reach the other peers of the document once each', async () => {
  const [a, b, c] = [repo(), repo(), repo()]
  const ha = a.create({ title: 'presence' })
  await until(async () => (await server.read(accordId(ha.url))) !== null, 'created on the server')
  const [hb, hc] = [await b.find(ha.url), await c.find(ha.url)]
  // Let b and c subscribe on the server (their sync messages go out after find).
  await sleep(300)
  const seen = { b: [], c: [], a: [] }
  hb.on('ephemeral-message', e => seen.b.push(e.message))
  hc.on('ephemeral-message', e => seen.c.push(e.message))
  ha.on('ephemeral-message', e => seen.a.push(e.message))
  ha.broadcast({ cursor: 1 })
  ha.broadcast({ cursor: 2 })
  await until(() => seen.b.length === 2 && seen.c.length === 2, 'b and c get both messages')
  await sleep(300)
  assert.deepEqual(seen.b, [{ cursor: 1 }, { cursor: 2 }])
  assert.deepEqual(seen.c, [{ cursor: 1 }, { cursor: 2 }])
  assert.deepEqual(seen.a, [], 'not echoed to the sender')
})

test('a document nobody has is unavailable', async () => {
  const r = repo()
  const url = generateAutomergeUrl()
  await assert.rejects(r.find(url), /unavailable/i)
  assert.equal(await server.read(accordId(url)), null, 'a request does not create it')
})

test('an automerge-repo client reconnects after the server restarts and nothing acknowledged is lost', async () => {
  const a = repo()
  const handle = a.create({ log: ['before'] })
  const id = accordId(handle.url)
  await until(async () => (await server.read(id))?.state.log?.length === 1, 'before committed')
  await server.kill()
  handle.change(d => { d.log.push('offline') })
  await server.start()
  await until(async () => (await server.read(id))?.state.log?.length === 2, 'offline edit committed after reconnect', 20000)
  handle.change(d => { d.log.push('after') })
  await until(async () => (await server.read(id))?.state.log?.length === 3, 'after committed')
  const fresh = repo()
  const again = await fresh.find(handle.url)
  await until(() => again.doc().log.length === 3, 'fresh repo sees everything')
  assert.deepEqual(again.doc().log, ['before', 'offline', 'after'])
})

test('an Accord client (REST) and automerge-repo see each other\'s edits', async () => {
  const a = repo()
  const handle = a.create({ title: 'from repo' })
  const id = accordId(handle.url)
  await until(async () => (await server.read(id))?.state.title === 'from repo', 'server sees the repo edit')
  await server.apply(id, [{ op: 'put', path: ['fromAccord'], value: 7 }])
  await until(() => handle.doc().fromAccord === 7, 'repo sees the Accord edit')
})
