// Preloaded into every Node peer (`node --import ./bind-local.mjs ...`): whatever host a server
// asks for, it listens on 127.0.0.1 only.
import net from 'node:net'

const listen = net.Server.prototype.listen
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'object' && args[0] !== null && 'port' in args[0]) {
    args[0] = { ...args[0], host: '127.0.0.1' }
    delete args[0].address
  } else if (typeof args[0] === 'number' || (typeof args[0] === 'string' && /^\d+$/.test(args[0]))) {
    const port = Number(args[0])
    const cb = args.find((a) => typeof a === 'function')
    return listen.call(this, { port, host: '127.0.0.1' }, cb)
  }
  return listen.apply(this, args)
}
