//! The client task: owns the replica and the WebSocket, and turns commands, frames and timers
//! into calls on the sans-IO replica.
//!
//! States: connecting (a connect future, commands still served) → session (frames both ways)
//! → offline (a backoff delay, commands still served) → connecting. Local edits work in every
//! state; frames go out only in a session.

use std::collections::BTreeSet;
use std::time::Duration;

use accord_engine::replica::{Event, Origin, Replica};
use accord_engine::storage::Storage;
use accord_engine::{DocKind, DocumentId, PeerId};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{Backoff, ClientConfig, ClientError, ClientEvent, Command, Status};

/// The WebSocket read buffer: one read's worth (a larger frame is read in several).
const READ_BUFFER_BYTES: usize = 16 * 1024;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What a command asked of the loop.
enum Flow {
    Continue,
    Stop(Option<oneshot::Sender<()>>),
}

/// Why a session ended.
enum SessionEnd {
    Lost { welcomed: bool },
    Stop(Option<oneshot::Sender<()>>),
}

pub(crate) struct Driver<S: Storage> {
    config: ClientConfig,
    replica: Replica<S>,
    events: mpsc::Sender<ClientEvent>,
    missed_events: u64,
    status: watch::Sender<Status>,
    backoff: Backoff,
    /// Documents synced with the server; subscribed again on every connection.
    synced: BTreeSet<DocumentId>,
    /// The current session's peer id, while connected.
    peer: Option<PeerId>,
    next_peer: u64,
    welcomed: bool,
}

impl<S: Storage> Driver<S> {
    pub(crate) fn new(
        config: ClientConfig,
        replica: Replica<S>,
        events: mpsc::Sender<ClientEvent>,
        status: watch::Sender<Status>,
    ) -> Self {
        let seed = config.rng_seed.unwrap_or_else(rand::random);
        let synced = if config.sync_stored_documents {
            replica.documents().map(|(id, _)| id).collect()
        } else {
            BTreeSet::new()
        };
        Self {
            backoff: Backoff::new(config.backoff, seed),
            config,
            replica,
            events,
            missed_events: 0,
            status,
            synced,
            peer: None,
            next_peer: 1,
            welcomed: false,
        }
    }

    /// Runs until shutdown or until every handle is dropped. The replica (and its storage) is
    /// dropped before a shutdown caller is answered.
    pub(crate) async fn run(self, commands: mpsc::Receiver<Command>) {
        let reply = self.run_inner(commands).await;
        if let Some(reply) = reply {
            let _ = reply.send(());
        }
    }

    async fn run_inner(
        mut self,
        mut commands: mpsc::Receiver<Command>,
    ) -> Option<oneshot::Sender<()>> {
        let mut attempt: u32 = 0;
        let reply = 'outer: loop {
            self.set_status(Status::Connecting { attempt });
            // A 16 KiB read buffer, not tungstenite's 128 KiB: the patched tungstenite
            // (vendor/tungstenite) takes it for each burst of frames and lets it go between.
            let ws_config = WebSocketConfig::default()
                .max_frame_size(Some(self.frame_limit()))
                .max_message_size(Some(self.frame_limit()))
                .read_buffer_size(READ_BUFFER_BYTES);
            let url = self.config.url.clone();
            let connect = timeout(
                self.config.connect_timeout,
                tokio_tungstenite::connect_async_with_config(url, Some(ws_config), true),
            );
            tokio::pin!(connect);
            let connected = loop {
                tokio::select! {
                    result = &mut connect => break result,
                    command = commands.recv() => {
                        if let Flow::Stop(reply) = self.command(command) {
                            break 'outer reply;
                        }
                    }
                }
            };
            match connected {
                Ok(Ok((ws, _response))) => match self.session(ws, &mut commands).await {
                    SessionEnd::Stop(reply) => break 'outer reply,
                    SessionEnd::Lost { welcomed } => {
                        if welcomed {
                            attempt = 0;
                        }
                    }
                },
                Ok(Err(error)) => tracing::debug!(%error, url = %self.config.url, "connect failed"),
                Err(_) => tracing::debug!(url = %self.config.url, "connect timed out"),
            }
            let retry_in = self.backoff.delay(attempt);
            attempt = attempt.saturating_add(1);
            self.set_status(Status::Offline { attempt, retry_in });
            let wake = Instant::now() + retry_in;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    command = commands.recv() => {
                        if let Flow::Stop(reply) = self.command(command) {
                            break 'outer reply;
                        }
                    }
                }
            }
        };
        self.set_status(Status::Stopped);
        reply
    }

    fn frame_limit(&self) -> usize {
        self.config
            .replica
            .limits
            .max_frame_bytes
            .saturating_mul(2)
            .saturating_add(1024)
    }

    /// One connection, from hello to loss or shutdown.
    async fn session(&mut self, mut ws: Ws, commands: &mut mpsc::Receiver<Command>) -> SessionEnd {
        let peer = PeerId(self.next_peer);
        self.next_peer += 1;
        self.peer = Some(peer);
        self.welcomed = false;
        self.replica
            .connect_upstream(peer, self.config.token.clone());
        for document in self.synced.clone() {
            if let Err(error) = self.replica.sync_document(peer, document) {
                tracing::warn!(%document, %error, "cannot sync document");
            }
        }
        let idle = self.config.idle_timeout;
        let mut last_heard = Instant::now();
        let end = loop {
            self.drain_events();
            if let Err(error) = self.send_due(&mut ws).await {
                tracing::debug!(%error, "send failed");
                break SessionEnd::Lost {
                    welcomed: self.welcomed,
                };
            }
            tokio::select! {
                command = commands.recv() => {
                    if let Flow::Stop(reply) = self.command(command) {
                        break SessionEnd::Stop(reply);
                    }
                }
                frame = ws.next() => {
                    last_heard = Instant::now();
                    match frame {
                        Some(Ok(WsMessage::Binary(bytes))) => {
                            if let Err(error) = self.replica.handle_frame(peer, &bytes) {
                                tracing::warn!(%error, "server frame refused; reconnecting");
                                break SessionEnd::Lost { welcomed: self.welcomed };
                            }
                        }
                        Some(Ok(WsMessage::Close(_))) | None => {
                            break SessionEnd::Lost { welcomed: self.welcomed };
                        }
                        Some(Err(error)) => {
                            tracing::debug!(%error, "connection lost");
                            break SessionEnd::Lost { welcomed: self.welcomed };
                        }
                        // Pings are answered by tungstenite itself; text is not ours.
                        Some(Ok(_)) => {}
                    }
                }
                _ = tokio::time::sleep_until(last_heard + idle) => {
                    tracing::debug!("server silent; reconnecting");
                    break SessionEnd::Lost { welcomed: self.welcomed };
                }
            }
        };
        self.replica.disconnect(peer);
        self.peer = None;
        self.drain_events();
        while self.replica.poll_transmit().is_some() {}
        if matches!(end, SessionEnd::Stop(_)) {
            let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
        }
        end
    }

    /// Sends every frame the replica has due, then flushes once.
    async fn send_due(&mut self, ws: &mut Ws) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        let mut any = false;
        while let Some(transmit) = self.replica.poll_transmit() {
            if Some(transmit.peer) != self.peer {
                continue;
            }
            ws.feed(WsMessage::Binary(transmit.frame.into())).await?;
            any = true;
        }
        if any {
            ws.flush().await?;
        }
        Ok(())
    }

    /// Serves one command (`None`: every handle is gone, so stop).
    fn command(&mut self, command: Option<Command>) -> Flow {
        let Some(command) = command else {
            return Flow::Stop(None);
        };
        match command {
            Command::Create(document, kind, reply) => {
                let result = self
                    .replica
                    .create(document, kind)
                    .map_err(ClientError::from)
                    .and_then(|()| self.sync(document));
                let _ = reply.send(result);
            }
            Command::Subscribe(document, kind, reply) => {
                let _ = reply.send(self.subscribe(document, kind));
            }
            Command::Change(document, ops, reply) => {
                let _ = reply.send(self.replica.change(document, &ops).map_err(Into::into));
            }
            Command::Json(document, reply) => {
                let _ = reply.send(self.replica.json(document).map_err(Into::into));
            }
            Command::LastSeq(document, reply) => {
                let _ = reply.send(self.replica.last_seq(document).map_err(Into::into));
            }
            Command::ChangeStatus(document, change, reply) => {
                let _ = reply.send(
                    self.replica
                        .change_status(document, change)
                        .map_err(Into::into),
                );
            }
            Command::OutboxLen(reply) => {
                let _ = reply.send(self.replica.outbox().count());
            }
            Command::Conflicts(document, reply) => {
                let _ = reply.send(self.replica.conflicts(document).map_err(Into::into));
            }
            Command::ResolveConflict(document, key, choice, by, reply) => {
                let result = self
                    .replica
                    .resolve_conflict(document, &key, choice, &by)
                    .map_err(Into::into);
                let _ = reply.send(result);
            }
            Command::AddSchema(schema, reply) => {
                self.replica.add_schema(*schema);
                let _ = reply.send(());
            }
            Command::Shutdown(reply) => return Flow::Stop(Some(reply)),
        }
        // Offline, the replica has no peer and queues nothing; events are due either way.
        self.drain_events();
        Flow::Continue
    }

    fn subscribe(&mut self, document: DocumentId, kind: DocKind) -> Result<(), ClientError> {
        if !self.replica.contains(document) {
            self.replica.create(document, kind)?;
        } else {
            let actual = self.replica.document(document)?.kind();
            if actual != kind {
                return Err(accord_engine::replica::ReplicaError::WrongKind {
                    document,
                    actual,
                    expected: kind,
                }
                .into());
            }
        }
        self.sync(document)
    }

    fn sync(&mut self, document: DocumentId) -> Result<(), ClientError> {
        self.synced.insert(document);
        if let Some(peer) = self.peer {
            self.replica.sync_document(peer, document)?;
        }
        Ok(())
    }

    fn drain_events(&mut self) {
        while let Some(event) = self.replica.poll_event() {
            let event = match event {
                Event::Connected { .. } => {
                    self.welcomed = true;
                    self.set_status(Status::Connected);
                    continue;
                }
                Event::Subscribed {
                    document,
                    head_seq,
                    read_only,
                    ..
                } => ClientEvent::Subscribed {
                    document,
                    head_seq,
                    read_only,
                },
                Event::DocumentChanged { document, origin } => ClientEvent::DocumentChanged {
                    document,
                    remote: origin != Origin::Local,
                },
                Event::Confirmed {
                    document,
                    change,
                    seq,
                } => ClientEvent::Confirmed {
                    document,
                    change,
                    seq,
                },
                Event::Rejected {
                    document,
                    change,
                    code,
                    reason,
                } => ClientEvent::Rejected {
                    document,
                    change,
                    code,
                    reason,
                },
                Event::Compensated {
                    document,
                    change,
                    violation,
                    reason,
                } => ClientEvent::Compensated {
                    document,
                    change,
                    violation,
                    reason,
                },
                Event::Violations {
                    document,
                    violations,
                } => ClientEvent::Violations {
                    document,
                    violations,
                },
                Event::PeerError {
                    code,
                    document,
                    message,
                    ..
                } => {
                    tracing::warn!(?code, ?document, %message, "server error");
                    ClientEvent::ServerError {
                        code,
                        document,
                        message,
                    }
                }
            };
            self.emit(event);
        }
    }

    fn set_status(&mut self, status: Status) {
        let changed = self.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
        if changed {
            self.emit(ClientEvent::Status(status));
        }
    }

    /// Queues an event without waiting; a full queue drops it and counts it.
    fn emit(&mut self, event: ClientEvent) {
        if self.missed_events > 0 {
            let lagged = ClientEvent::Lagged {
                missed: self.missed_events,
            };
            if self.events.try_send(lagged).is_err() {
                self.missed_events += 1;
                return;
            }
            self.missed_events = 0;
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = self.events.try_send(event) {
            self.missed_events += 1;
        }
    }
}
