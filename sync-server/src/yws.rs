//! The y-websocket protocol (`new WebsocketProvider(url, room, ydoc)` from the npm package
//! `y-websocket`) at `/yjs/{room}`: `ws://host:port/yjs` is the provider's server URL.
//!
//! - The room is a Yrs document ([`crate::compat::room_document`]: a UUID room name is that
//!   document, any other name its name-based UUIDv8). It is created on first use when the
//!   token allows writing; a read-only token on a missing room is refused with `UnknownDocument`.
//! - The token travels as the query parameter `?token=` (the provider's `params` option).
//! - Frames are `varUint type` then the payload: sync (0) carries step 1 (state vector),
//!   step 2 or an update, each `varUint subtype` + `varUint8Array`. They map one to one onto
//!   [`SyncPayload::YrsStep1`]/[`SyncPayload::YrsStep2`]/[`SyncPayload::YrsUpdate`], which the
//!   document actor handles through the same `DocSync` as a native Yrs subscriber; acks are not
//!   forwarded. Writes on a read-only token are dropped and answered once with an auth
//!   "permission denied" message (type 2).
//! - Awareness (type 1) is relayed to the other y-websocket connections of the room through
//!   the [`AwarenessHub`], which remembers each client id's latest state (sent to newcomers and
//!   on a query, type 3) and which connection set it; when a connection closes its client ids
//!   are removed with an update of clock + 1 and state `null`, as the y-websocket server does.

use std::collections::BTreeMap;
use std::sync::Arc;

use accord_engine::protocol::{put_bytes, put_varint, ErrorCode, Message, SyncPayload};
use accord_engine::{DocKind, DocumentId};
use axum::body::Bytes;
use tokio::sync::oneshot;

use crate::compat::{random_replica, Conn, Hub, Protocol, RelayQueue, Stop};
use crate::document::{Command, Lease, SubscribeRequest};

const MSG_SYNC: u64 = 0;
const MSG_AWARENESS: u64 = 1;
const MSG_AUTH: u64 = 2;
const MSG_QUERY_AWARENESS: u64 = 3;
const STEP1: u64 = 0;
const STEP2: u64 = 1;
const UPDATE: u64 = 2;

/// Client ids one connection may set awareness states for (a provider sets one per Y.Doc).
const MAX_CLIENTS_PER_CONNECTION: usize = 64;

/// Awareness of every room with y-websocket members: relayed frames, and the latest state of
/// each client id.
pub(crate) type AwarenessHub = Hub<Arc<[u8]>, Awareness>;

/// Removed client ids whose clock is remembered (so a stale echo does not bring them back).
const MAX_TOMBSTONES: usize = 1_024;

/// The awareness of one room.
#[derive(Default)]
pub(crate) struct Awareness {
    states: BTreeMap<u64, ClientState>,
}

/// One client id's awareness.
struct ClientState {
    clock: u32,
    /// `None` once removed.
    json: Option<Arc<str>>,
    /// The connection that set it first.
    owner: u64,
}

impl Awareness {
    fn forget_tombstones(&mut self) {
        let removed = self.states.values().filter(|s| s.json.is_none()).count();
        if removed > MAX_TOMBSTONES {
            self.states.retain(|_, s| s.json.is_some());
        }
    }

    /// Every known state as one awareness frame, or `None` when there is none.
    fn snapshot(&self) -> Option<Vec<u8>> {
        if self.states.is_empty() {
            return None;
        }
        let entries: Vec<(u64, u32, &str)> = self
            .states
            .iter()
            .filter_map(|(client, s)| s.json.as_deref().map(|json| (*client, s.clock, json)))
            .collect();
        if entries.is_empty() {
            return None;
        }
        Some(awareness_frame(&entries))
    }
}

/// One y-websocket connection.
pub(crate) struct Yws {
    document: DocumentId,
    relay: RelayQueue<Arc<[u8]>>,
    lease: Option<Lease>,
    joined: bool,
    /// Whether a read-only refusal was sent already.
    denied: bool,
    /// Document updates taken in this step, written as one merged update by
    /// [`Protocol::coalesce`] (at most `DRAIN_PER_STEP` of `compat`).
    updates: Vec<Vec<u8>>,
}

impl Yws {
    pub(crate) fn new(room: &str, relay: RelayQueue<Arc<[u8]>>) -> Self {
        Self {
            document: crate::compat::room_document(room),
            relay,
            lease: None,
            joined: false,
            denied: false,
            updates: Vec::new(),
        }
    }

    /// Queues the updates held back in this step as one sync-update frame: y-websocket clients
    /// apply one update per message, so several become one merged update (`Y.mergeUpdates`).
    fn emit_updates(&mut self, conn: &mut Conn) {
        // Taken, so the vector's capacity goes with this step (an idle connection keeps none).
        let mut updates = std::mem::take(&mut self.updates);
        let update = match updates.len() {
            0 => return,
            1 => updates.pop(),
            _ => match crate::document::merge_yrs_updates(updates.iter().map(Vec::as_slice)) {
                Ok(merged) => Some(merged),
                Err(error) => {
                    // They came from the document actor, which encoded them: not expected. Send
                    // them as they are, one frame each.
                    tracing::error!(%error, "merging Yrs updates failed");
                    for update in updates {
                        conn.send(sync_frame(UPDATE, &update));
                    }
                    None
                }
            },
        };
        if let Some(update) = update {
            conn.send(sync_frame(UPDATE, &update));
        }
    }

    /// Applies an awareness update to the room with y-protocols' rules (a higher clock wins; an
    /// equal clock only to remove) and relays what changed to the other members. A client id is
    /// owned by the connection that first set its state: clients re-send what they receive, so
    /// an update never transfers ownership.
    fn awareness(&mut self, conn: &mut Conn, update: &[u8]) -> Result<(), Stop> {
        let entries = parse_awareness(update)?;
        let id = conn.id;
        let outcome = conn.shared.compat.awareness.with(self.document, |room| {
            let states = &mut room.state.states;
            let mut changed: Vec<(u64, u32, &str)> = Vec::new();
            for (client, clock, json) in &entries {
                let removal = *json == "null";
                let accept = match states.get(client) {
                    None => true,
                    Some(current) => {
                        current.clock < *clock
                            || (current.clock == *clock && removal && current.json.is_some())
                    }
                };
                if !accept {
                    continue;
                }
                let owner = match states.get(client) {
                    Some(current) if current.json.is_some() => current.owner,
                    _ => id,
                };
                if !removal && owner == id {
                    let owned = states
                        .values()
                        .filter(|s| s.owner == id && s.json.is_some())
                        .count();
                    if owned >= MAX_CLIENTS_PER_CONNECTION && states.get(client).is_none_or(|s| s.json.is_none()) {
                        return Err(Stop::error(
                            ErrorCode::ProtocolViolation,
                            format!("at most {MAX_CLIENTS_PER_CONNECTION} awareness client ids per connection"),
                        ));
                    }
                }
                if removal && !states.contains_key(client) {
                    continue;
                }
                states.insert(
                    *client,
                    ClientState {
                        clock: *clock,
                        json: (!removal).then(|| Arc::from(*json)),
                        owner,
                    },
                );
                changed.push((*client, *clock, json));
            }
            room.state.forget_tombstones();
            if !changed.is_empty() {
                let frame: Arc<[u8]> = awareness_frame(&changed).into();
                room.broadcast(id, &frame);
            }
            Ok(())
        });
        outcome.unwrap_or(Ok(()))
    }
}

impl Protocol for Yws {
    type Relayed = Arc<[u8]>;

    async fn start(&mut self, conn: &mut Conn) -> Result<(), Stop> {
        let document = self.document;
        if !conn.grant.covers(document) {
            return Err(Stop::error(
                ErrorCode::Forbidden,
                "the token does not cover this room",
            ));
        }
        let Some(lease) = conn.shared.documents.acquire(document) else {
            return Err(Stop::error(
                ErrorCode::ShuttingDown,
                "the server is shutting down",
            ));
        };
        let read_only = !conn.grant.can_write();
        let (reply, answer) = oneshot::channel();
        let command = Command::Subscribe {
            request: SubscribeRequest {
                out: conn.outbox.clone(),
                replica: random_replica(),
                kind: DocKind::Yrs,
                // No acks are forwarded: skip the catch-up read.
                since_seq: u64::MAX,
                read_only,
                may_create: !read_only,
                acks: false,
            },
            reply,
        };
        if !lease.send(command).await {
            return Err(Stop::error(
                ErrorCode::Storage,
                "the document is unavailable",
            ));
        }
        match answer.await {
            Ok(true) => self.lease = Some(lease),
            // Refused: the actor sent the reason (an `Error`), which ends the connection.
            Ok(false) => return Ok(()),
            Err(_) => {
                return Err(Stop::error(
                    ErrorCode::Storage,
                    "the document is unavailable",
                ))
            }
        }
        let snapshot =
            conn.shared
                .compat
                .awareness
                .join(document, conn.id, self.relay.clone(), |room| {
                    room.state.snapshot()
                });
        self.joined = true;
        if let Some(frame) = snapshot {
            conn.send(frame);
        }
        Ok(())
    }

    async fn frame(&mut self, conn: &mut Conn, bytes: Bytes) -> Result<(), Stop> {
        let mut reader = Reader::new(&bytes);
        match reader.var()? {
            MSG_SYNC => {
                let subtype = reader.var()?;
                let data = reader.buf()?.to_vec();
                let payload = match subtype {
                    STEP1 => SyncPayload::YrsStep1(data),
                    STEP2 => SyncPayload::YrsStep2(data),
                    UPDATE => SyncPayload::YrsUpdate(data),
                    other => {
                        return Err(Stop::error(
                            ErrorCode::MalformedFrame,
                            format!("unknown y-websocket sync message type {other}"),
                        ))
                    }
                };
                let Some(lease) = &self.lease else {
                    return Ok(());
                };
                let command = Command::Sync {
                    connection: conn.id,
                    payload,
                };
                if !lease.send(command).await {
                    return Err(Stop::error(
                        ErrorCode::Storage,
                        "the document stopped; reconnect",
                    ));
                }
                Ok(())
            }
            MSG_AWARENESS => {
                let update = reader.buf()?;
                if !self.joined {
                    return Ok(());
                }
                self.awareness(conn, update)
            }
            MSG_QUERY_AWARENESS => {
                let snapshot = conn
                    .shared
                    .compat
                    .awareness
                    .with(self.document, |room| room.state.snapshot())
                    .flatten();
                if let Some(frame) = snapshot {
                    conn.send(frame);
                }
                Ok(())
            }
            // Clients do not send auth messages; tolerated and ignored.
            MSG_AUTH => Ok(()),
            other => Err(Stop::error(
                ErrorCode::MalformedFrame,
                format!("unknown y-websocket message type {other}"),
            )),
        }
    }

    fn document(&mut self, conn: &mut Conn, message: Message) -> Result<(), Stop> {
        match message {
            Message::Sync { payload, .. } => {
                let (subtype, data) = match payload {
                    SyncPayload::YrsStep1(sv) => (STEP1, sv),
                    SyncPayload::YrsStep2(update) => (STEP2, update),
                    SyncPayload::YrsUpdate(update) => {
                        // Held back to be merged with the others of this step.
                        self.updates.push(update);
                        return Ok(());
                    }
                    SyncPayload::Automerge(_) => return Ok(()),
                };
                // Whatever was held back goes first: the order of frames is kept.
                self.emit_updates(conn);
                conn.send(sync_frame(subtype, &data));
                Ok(())
            }
            Message::Error { code, message, .. } => Err(Stop::error(code, message)),
            Message::Reject {
                code: ErrorCode::Forbidden,
                reason,
                ..
            } => {
                if !self.denied {
                    self.denied = true;
                    self.emit_updates(conn);
                    conn.send(auth_denied(&reason));
                }
                Ok(())
            }
            Message::Reject { code, reason, .. } => Err(Stop::error(code, reason)),
            // Acks, Subscribed: nothing to tell a y-websocket client.
            _ => Ok(()),
        }
    }

    fn relayed(&mut self, conn: &mut Conn, item: Arc<[u8]>) -> Result<(), Stop> {
        // Awareness is independent of document updates: no need to emit them first.
        conn.send(item.to_vec());
        Ok(())
    }

    fn coalesce(&mut self, conn: &mut Conn) {
        self.emit_updates(conn);
    }

    fn farewell(&mut self, stop: &Stop) -> Vec<Vec<u8>> {
        match stop.code {
            Some(
                ErrorCode::Unauthorized
                | ErrorCode::Forbidden
                | ErrorCode::TokenExpired
                | ErrorCode::UnknownDocument
                | ErrorCode::KindMismatch,
            ) => vec![auth_denied(&stop.reason)],
            _ => Vec::new(),
        }
    }

    async fn finish(&mut self, conn: &mut Conn) {
        if self.joined {
            let id = conn.id;
            conn.shared
                .compat
                .awareness
                .leave(self.document, id, |room| {
                    // Remove the states this connection set, as the y-websocket server does.
                    let mut removed = Vec::new();
                    for (client, state) in room.state.states.iter_mut() {
                        if state.owner == id && state.json.is_some() {
                            state.clock = state.clock.wrapping_add(1);
                            state.json = None;
                            removed.push((*client, state.clock, "null"));
                        }
                    }
                    tracing::debug!(connection = id, ?removed, "awareness states removed");
                    if !removed.is_empty() {
                        let frame: Arc<[u8]> = awareness_frame(&removed).into();
                        room.broadcast(id, &frame);
                    }
                    room.state.forget_tombstones();
                });
        }
        if let Some(lease) = self.lease.take() {
            let unsubscribe = Command::Unsubscribe {
                connection: conn.id,
            };
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), lease.send(unsubscribe))
                    .await;
        }
    }
}

/// `[0, subtype, varUint8Array(data)]`: a sync message.
fn sync_frame(subtype: u64, data: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(data.len() + 12);
    put_varint(&mut frame, MSG_SYNC);
    put_varint(&mut frame, subtype);
    put_bytes(&mut frame, data);
    frame
}

/// `[2, 0, reason]`: y-protocols' "permission denied".
fn auth_denied(reason: &str) -> Vec<u8> {
    let mut frame = Vec::with_capacity(reason.len() + 8);
    put_varint(&mut frame, MSG_AUTH);
    put_varint(&mut frame, 0);
    put_bytes(&mut frame, reason.as_bytes());
    frame
}

/// `[1, varUint8Array(update)]` for `(client, clock, JSON state)` entries.
fn awareness_frame(entries: &[(u64, u32, &str)]) -> Vec<u8> {
    let mut update = Vec::new();
    put_varint(&mut update, entries.len() as u64);
    for (client, clock, json) in entries {
        put_varint(&mut update, *client);
        put_varint(&mut update, u64::from(*clock));
        put_bytes(&mut update, json.as_bytes());
    }
    let mut frame = Vec::with_capacity(update.len() + 8);
    put_varint(&mut frame, MSG_AWARENESS);
    put_bytes(&mut frame, &update);
    frame
}

/// Decodes an awareness update, checking every length and that each state is JSON (other
/// clients `JSON.parse` it).
fn parse_awareness(update: &[u8]) -> Result<Vec<(u64, u32, &str)>, Stop> {
    let mut reader = Reader::new(update);
    let count = reader.var()?;
    // Each entry takes at least 3 bytes: nothing is allocated for a count the bytes cannot hold.
    if count > (update.len() / 3) as u64 {
        return Err(malformed(
            "an awareness update counts more entries than it holds",
        ));
    }
    let mut entries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let client = reader.var()?;
        let clock = u32::try_from(reader.var()?)
            .map_err(|_| malformed("an awareness clock over 32 bits"))?;
        let json = std::str::from_utf8(reader.buf()?)
            .map_err(|_| malformed("an awareness state that is not UTF-8"))?;
        if serde_json::from_str::<serde::de::IgnoredAny>(json).is_err() {
            return Err(malformed("an awareness state that is not JSON"));
        }
        entries.push((client, clock, json));
    }
    Ok(entries)
}

fn malformed(text: &str) -> Stop {
    Stop::error(ErrorCode::MalformedFrame, text)
}

/// lib0's decoding: LEB128 varUint (at most 64 bits) and varUint8Array.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn var(&mut self) -> Result<u64, Stop> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = self.bytes.get(self.at) else {
                return Err(malformed("a y-websocket message ends early"));
            };
            self.at += 1;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                break;
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed("a varUint over 64 bits"))
    }

    fn buf(&mut self) -> Result<&'a [u8], Stop> {
        let len = self.var()?;
        let rest = self.bytes.len() - self.at;
        if len > rest as u64 {
            return Err(malformed(
                "a y-websocket length past the end of the message",
            ));
        }
        let start = self.at;
        self.at += len as usize;
        Ok(&self.bytes[start..self.at])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for value in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(Reader::new(&out).var().unwrap(), value);
        }
        assert!(Reader::new(&[0x80]).var().is_err());
        assert!(Reader::new(&[0xff; 11]).var().is_err());
        assert!(Reader::new(&[5, 1, 2]).buf().is_err());
    }

    #[test]
    fn awareness_round_trips_and_rejects_garbage() {
        let frame = awareness_frame(&[(7, 3, r#"{"user":"a"}"#), (9, 1, "null")]);
        let mut reader = Reader::new(&frame);
        assert_eq!(reader.var().unwrap(), MSG_AWARENESS);
        let update = reader.buf().unwrap();
        let entries = parse_awareness(update).unwrap();
        assert_eq!(entries, vec![(7, 3, r#"{"user":"a"}"#), (9, 1, "null")]);
        assert!(parse_awareness(&[200, 200, 200, 1]).is_err());
        let mut bad = Vec::new();
        put_varint(&mut bad, 1);
        put_varint(&mut bad, 1);
        put_varint(&mut bad, 1);
        put_bytes(&mut bad, b"{not json");
        assert!(parse_awareness(&bad).is_err());
    }
}
