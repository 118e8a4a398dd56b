// Unmodified Yjs clients (y-websocket's WebsocketProvider) against accord-server's /yjs endpoint.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'
import { Server, until, sleep, unique, roomDocument } from '../helpers.js'

process.setMaxListeners(100) // every provider adds an exit listener

let server
const providers = []

before(async () => { server = await new Server().start() })
after(async () => {
  for (const p of providers) {
    p.destroy()
    p.doc.destroy() // also stops the awareness timer, which would keep Node alive
  }
  await server.cleanup()
})

/** A Yjs client: its own Y.Doc and provider (no BroadcastChannel: only the server connects them). */
function client (room, options = {}) {
  const doc = new Y.Doc()
  const provider = new WebsocketProvider(`${server.ws}/yjs`, room, doc, {
    WebSocketPolyfill: WebSocket, disableBc: true, maxBackoffTime: 200, ...options
  })
  providers.push(provider)
  return { doc, provider }
}

const synced = provider => until(() => provider.synced, 'provider synced')

test('three Yjs clients edit concurrently and converge; the room is an Accord document', async () => {
  const room = unique('converge')
  const clients = [client(room), client(room), client(room)]
  await Promise.all(clients.map(c => synced(c.provider)))
  const rounds = 20
  await Promise.all(clients.map(async ({ doc }, i) => {
    for (let n = 0; n < rounds; n++) {
      doc.transact(() => {
        doc.getArray('items').push([`c${i}-${n}`])
        doc.getMap('root').set(`c${i}`, n)
        doc.getText('text').insert(0, String(i))
      })
      await sleep(Math.random() * 5)
    }
  }))
  const expected = 3 * rounds
  await until(() => clients.every(({ doc }) => doc.getArray('items').length === expected &&
    doc.getText('text').length === expected), 'every client has every edit')
  const [a, b, c] = clients.map(({ doc }) => doc)
  assert.deepEqual(b.getArray('items').toJSON(), a.getArray('items').toJSON())
  assert.deepEqual(c.getArray('items').toJSON(), a.getArray('items').toJSON())
  assert.equal(b.getText('text').toString(), a.getText('text').toString())
  assert.equal(c.getText('text').toString(), a.getText('text').toString())
  assert.deepEqual(a.getMap('root').toJSON(), { c0: rounds - 1, c1: rounds - 1, c2: rounds - 1 })

  // The room is a Yrs document in Accord's store, with commit numbers.
  const id = roomDocument(room)
  const stored = await until(async () => {
    const d = await server.read(id)
    return d && d.state.items?.length === expected && d
  }, 'the server document to hold every edit')
  assert.equal(stored.kind, 'yrs')
  assert.ok(stored.head_seq >= 1, `head_seq ${stored.head_seq}`)
  assert.deepEqual(stored.state.items, a.getArray('items').toJSON())
  assert.deepEqual(stored.state.root, a.getMap('root').toJSON())

  // A late client gets everything.
  const late = client(room)
  await synced(late.provider)
  await until(() => late.doc.getArray('items').length === expected, 'late client caught up')
  assert.equal(late.doc.getText('text').toString(), a.getText('text').toString())
})

test('a Yjs client reconnects after the server restarts and nothing acknowledged is lost', async () => {
  const room = randomUUID()
  const a = client(room)
  await synced(a.provider)
  a.doc.getMap('root').set('before', 1)
  a.doc.getArray('log').push(['before'])
  // Acknowledged = committed: the server's own view shows it.
  await until(async () => (await server.read(room))?.state.root?.before === 1, 'before committed')
  await server.kill()
  // Edits while the server is down stay in the client.
  a.doc.getMap('root').set('offline', 2)
  a.doc.getArray('log').push(['offline'])
  await server.start()
  await until(async () => (await server.read(room))?.state.log?.length === 2, 'offline edit committed after reconnect')
  a.doc.getMap('root').set('after', 3)
  const b = client(room)
  await synced(b.provider)
  await until(() => b.doc.getMap('root').get('after') === 3, 'fresh client sees everything')
  assert.deepEqual(b.doc.getMap('root').toJSON(), { before: 1, offline: 2, after: 3 })
  assert.deepEqual(b.doc.getArray('log').toJSON(), ['before', 'offline'])
})

test('awareness states appear, reach late joiners, and disappear when a connection drops', async () => {
  const room = unique('awareness')
  const a = client(room)
  const b = client(room)
  await Promise.all([synced(a.provider), synced(b.provider)])
  a.provider.awareness.setLocalStateField('user', { name: 'alice' })
  b.provider.awareness.setLocalStateField('user', { name: 'bob' })
  const aId = a.doc.clientID
  await until(() => b.provider.awareness.getStates().get(aId)?.user?.name === 'alice', 'b sees alice')
  await until(() => a.provider.awareness.getStates().get(b.doc.clientID)?.user?.name === 'bob', 'a sees bob')

  // A late joiner gets the states the server holds.
  const c = client(room)
  await synced(c.provider)
  await until(() => c.provider.awareness.getStates().get(aId)?.user?.name === 'alice', 'c sees alice')

  // Alice's connection drops without a goodbye: the server removes her state for the others
  // (well before the 30 s awareness timeout of the clients).
  a.provider.shouldConnect = false
  a.provider.ws.terminate()
  const dropped = Date.now()
  await until(() => !b.provider.awareness.getStates().has(aId) && !c.provider.awareness.getStates().has(aId),
    'alice removed', 10000)
  assert.ok(Date.now() - dropped < 10000)
  assert.equal(b.provider.awareness.getStates().get(c.doc.clientID), undefined, 'c set no state')
  assert.equal(c.provider.awareness.getStates().get(b.doc.clientID)?.user?.name, 'bob')
})

test('an Accord client (REST) and Yjs clients see each other\'s edits', async () => {
  const room = randomUUID()
  const y = client(room)
  await synced(y.provider)
  y.doc.getMap('root').set('fromYjs', 'hello')
  await until(async () => (await server.read(room))?.state.root?.fromYjs === 'hello', 'server sees the Yjs edit')
  const applied = await server.apply(room, [{ op: 'put', path: ['root', 'fromAccord'], value: 42 }])
  assert.ok(applied.seq >= 2)
  await until(() => y.doc.getMap('root').get('fromAccord') === 42, 'Yjs sees the Accord edit')
  assert.deepEqual(y.doc.getMap('root').toJSON(), { fromYjs: 'hello', fromAccord: 42 })
})

test('garbage on the y-websocket endpoint closes that connection only, with a reason', async () => {
  const room = unique('garbage')
  const good = client(room)
  await synced(good.provider)
  const bad = new WebSocket(`${server.ws}/yjs/${room}`)
  await new Promise((resolve, reject) => { bad.once('open', resolve); bad.once('error', reject) })
  const closed = new Promise(resolve => bad.once('close', (code, reason) => resolve({ code, reason: reason.toString() })))
  bad.send(Buffer.from([0, 7, 1, 2])) // sync message of an unknown subtype
  const { code, reason } = await closed
  assert.equal(code, 4001, reason) // 4000 + MalformedFrame
  assert.match(reason, /unknown y-websocket sync message type/)
  good.doc.getMap('root').set('still', 'works')
  await until(async () => (await server.read(roomDocument(room)))?.state.root?.still === 'works', 'the other connection still syncs')
  assert.equal(good.provider.wsconnected, true)
})
