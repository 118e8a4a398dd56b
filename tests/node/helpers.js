// Test helpers: start and stop a real accord-server binary, wait for conditions, read documents
// over the REST API.
import { spawn } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import net from 'node:net'
import { createHash } from 'node:crypto'

export const BIN = process.env.ACCORD_SERVER_BIN
if (!BIN) throw new Error('set ACCORD_SERVER_BIN to the accord-server binary')

/** A free TCP port on 127.0.0.1. */
export async function freePort () {
  return new Promise((resolve, reject) => {
    const server = net.createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address()
      server.close(() => resolve(port))
    })
  })
}

export const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))

/** Polls `check` until it returns a truthy value (returned) or `ms` pass (throws `what`). */
export async function until (check, what, ms = 15000) {
  const deadline = Date.now() + ms
  let last
  while (Date.now() < deadline) {
    try {
      last = await check()
      if (last) return last
    } catch (e) {
      last = e
    }
    await sleep(25)
  }
  throw new Error(`timed out waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`)
}

/** A running accord-server (`--no-auth`, its own data dir, a free port). */
export class Server {
  constructor () {
    this.dir = mkdtempSync(join(tmpdir(), 'accord-node-'))
    this.port = null
    this.child = null
  }

  get http () { return `http://127.0.0.1:${this.port}` }
  get ws () { return `ws://127.0.0.1:${this.port}` }

  async start () {
    if (this.port === null) this.port = await freePort()
    const child = spawn(BIN, [
      'serve', '--no-auth', '--listen', `127.0.0.1:${this.port}`, '--data-dir', this.dir
    ], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn' } })
    this.stderr = ''
    child.stdout.on('data', d => { this.stderr += d })
    child.stderr.on('data', d => { this.stderr += d })
    this.child = child
    this.exited = new Promise(resolve => child.once('exit', resolve))
    await until(async () => (await fetch(`${this.http}/healthz`)).ok, `server on ${this.port}`)
    return this
  }

  /** SIGKILL: nothing gets a chance to flush. */
  async kill () {
    this.child.kill('SIGKILL')
    await this.exited
  }

  async stop () {
    if (this.child && this.child.exitCode === null && this.child.signalCode === null) {
      this.child.kill('SIGTERM')
      await Promise.race([this.exited, sleep(5000).then(() => this.child.kill('SIGKILL'))])
      await this.exited
    }
  }

  async cleanup () {
    await this.stop()
    rmSync(this.dir, { recursive: true, force: true })
  }

  /** GET /v1/documents/{id}: `{ kind, head_seq, state }`, or null when missing. */
  async read (id) {
    const response = await fetch(`${this.http}/v1/documents/${id}`)
    if (response.status === 404) return null
    if (!response.ok) throw new Error(`read ${id}: ${response.status} ${await response.text()}`)
    return response.json()
  }

  /** POST ops as one change of the server's. */
  async apply (id, ops) {
    const response = await fetch(`${this.http}/v1/documents/${id}/changes`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(ops)
    })
    if (!response.ok) throw new Error(`apply ${id}: ${response.status} ${await response.text()}`)
    return response.json()
  }
}

/** The document of a y-websocket room (as `compat::room_document` maps it). */
export function roomDocument (room) {
  if (/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(room)) return room.toLowerCase()
  const namespace = Buffer.from('6b1f3c2a9e474d85a30c517e28d69413', 'hex')
  const bytes = createHash('sha256').update(namespace).update(Buffer.from(room, 'utf8')).digest().subarray(0, 16)
  bytes[6] = (bytes[6] & 0x0f) | 0x80
  bytes[8] = (bytes[8] & 0x3f) | 0x80
  const hex = bytes.toString('hex')
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`
}

/** A UUID string from 16 bytes. */
export function uuidOf (bytes) {
  const hex = Buffer.from(bytes).toString('hex')
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`
}

export const unique = prefix => `${prefix}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`
