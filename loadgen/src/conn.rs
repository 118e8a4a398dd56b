//! A raw protocol connection: the load generator speaks the wire protocol directly (no replica),
//! so its own CPU cost per change stays small next to the server's.

use std::time::Duration;

use accord_engine::protocol::{encode, Limits, Message, Reassembler, PROTOCOL_VERSION};
use accord_engine::{DocKind, DocumentId, ReplicaId};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Errors are reported, not handled: a string says enough for a load generator.
pub type Result<T> = std::result::Result<T, String>;

const HANDSHAKE: Duration = Duration::from_secs(10);

/// Bytes one socket read takes at most (tungstenite's `read_buffer_size`).
///
/// Not tungstenite's default of 128 KiB: tungstenite 0.28 zeroes that much of its read buffer
/// before every read. With 100 subscribers reading a fan-out of 3,000 changes a second, that
/// was 27% of the load generator's samples (perf) and 0.48–0.50 cores in all; with 4 KiB, 2%
/// and 0.40 cores. On 2 cores the generator shares the machine with the server it measures, so
/// what it wastes is taken from whichever server runs. The frames of every workload but the
/// first sync are far smaller than this.
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// The WebSocket settings of every connection the load generator opens (see
/// [`READ_BUFFER_BYTES`]).
pub(crate) fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES)
}

/// One WebSocket speaking the Accord protocol.
pub struct Conn {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    reassembler: Reassembler,
}

impl Conn {
    /// Connects and completes Hello/Welcome.
    pub async fn open(url: &str, replica: ReplicaId) -> Result<Conn> {
        let (ws, _) = timeout(
            HANDSHAKE,
            tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true),
        )
        .await
        .map_err(|_| format!("connect to {url} timed out"))?
        .map_err(|e| format!("connect to {url}: {e}"))?;
        let mut conn = Conn {
            ws,
            reassembler: Reassembler::new(Limits::default()),
        };
        conn.send(&Message::Hello {
            protocol_version: PROTOCOL_VERSION,
            replica,
            token: None,
        })
        .await?;
        conn.wait_for(|m| matches!(m, Message::Welcome { .. }))
            .await?;
        Ok(conn)
    }

    /// Subscribes to a Yrs document and waits for `Subscribed`.
    pub async fn subscribe(&mut self, document: DocumentId) -> Result<()> {
        self.send(&Message::Subscribe {
            document,
            kind: DocKind::Yrs,
            since_seq: 0,
        })
        .await?;
        self.wait_for(|m| matches!(m, Message::Subscribed { .. }))
            .await
    }

    /// Reads messages until one matches (an `Error` fails), within the handshake timeout.
    pub async fn wait_for(&mut self, mut wanted: impl FnMut(&Message) -> bool) -> Result<()> {
        timeout(HANDSHAKE, async {
            loop {
                let message = self.next().await?;
                if let Message::Error { code, message, .. } = &message {
                    return Err(format!("server error {code:?}: {message}"));
                }
                if wanted(&message) {
                    return Ok(());
                }
            }
        })
        .await
        .map_err(|_| "handshake timed out".to_string())?
    }

    /// Sends one message and flushes.
    pub async fn send(&mut self, message: &Message) -> Result<()> {
        self.feed(message).await?;
        self.flush().await
    }

    /// Queues one message (small messages only: no chunking).
    pub async fn feed(&mut self, message: &Message) -> Result<()> {
        self.ws
            .feed(WsMessage::Binary(encode(message).into()))
            .await
            .map_err(|e| format!("send: {e}"))
    }

    /// Flushes what was fed.
    pub async fn flush(&mut self) -> Result<()> {
        self.ws.flush().await.map_err(|e| format!("flush: {e}"))
    }

    /// The next whole message; an error when the connection closes.
    pub async fn next(&mut self) -> Result<Message> {
        loop {
            match self.ws.next().await {
                Some(Ok(WsMessage::Binary(bytes))) => {
                    match self.reassembler.push(&bytes).map_err(|e| e.to_string())? {
                        Some(message) => return Ok(message),
                        None => continue,
                    }
                }
                Some(Ok(WsMessage::Close(frame))) => return Err(format!("closed: {frame:?}")),
                None => return Err("closed".into()),
                Some(Err(e)) => return Err(format!("receive: {e}")),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Closes politely (bounded in time).
    pub async fn close(mut self) {
        let _ = timeout(Duration::from_secs(1), self.ws.close(None)).await;
    }
}
