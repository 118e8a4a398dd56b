// Shared helpers for the Node clients of bench/run.sh.
import fs from 'node:fs'
import zlib from 'node:zlib'

export function args() {
  const out = {}
  const argv = process.argv.slice(2)
  for (let i = 0; i < argv.length; i++) {
    if (argv[i].startsWith('--')) {
      const key = argv[i].slice(2)
      const next = argv[i + 1]
      if (next === undefined || next.startsWith('--')) out[key] = true
      else { out[key] = next; i++ }
    }
  }
  return out
}

export function mustBeLocal(url) {
  if (!/^wss?:\/\/(127\.0\.0\.1|localhost)[:/]/.test(url)) {
    throw new Error(`refusing a non-local URL: ${url}`)
  }
}

export function readTrace(path) {
  return JSON.parse(zlib.gunzipSync(fs.readFileSync(path)).toString('utf8'))
}

export function median(xs) {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.floor(s.length / 2)]
}

/** CPU seconds (user+system) and RSS bytes of a process, from /proc. */
export function procUsage(pid) {
  if (!pid) return null
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8')
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    const cpu = (Number(f[11]) + Number(f[12])) / 100
    const m = /VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))
    return { cpu, rss: Number(m[1]) * 1024 }
  } catch {
    return null
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

export function withTimeout(promise, ms, what) {
  let t
  return Promise.race([
    promise,
    new Promise((_, rej) => { t = setTimeout(() => rej(new Error(`${what}: timed out after ${ms} ms`)), ms) }),
  ]).finally(() => clearTimeout(t))
}

// automerge-repo's WebSocketClientAdapter emits an unhandled 'error' when a repo shuts down while
// its socket is still connecting; that is not a failure of the measurement.
process.on('uncaughtException', (e) => {
  if (/closed before the connection was established/.test(String(e?.message))) return
  console.error(e)
  process.exit(1)
})
