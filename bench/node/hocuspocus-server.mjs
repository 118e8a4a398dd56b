// Hocuspocus 3.4.4 with no extensions (documents in memory), on 127.0.0.1:$PORT.
import { Server } from '@hocuspocus/server'

const port = Number(process.env.PORT || 1234)
const server = new Server({ port, address: '127.0.0.1', quiet: true, stopOnSignals: true })
await server.listen()
console.log(`hocuspocus listening on 127.0.0.1:${port}`)
