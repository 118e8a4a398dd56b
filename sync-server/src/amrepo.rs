//! The automerge-repo network protocol (`new WebSocketClientAdapter(url)` from
//! `@automerge/automerge-repo-network-websocket`) at `/automerge`.
//!
//! - Each binary frame is one CBOR map with camelCase keys. The client's `join` (with
//!   `supportedProtocolVersions` containing `"1"`) is answered by `peer` (`senderId` = the
//!   server's peer id, `selectedProtocolVersion: "1"`); no common version gets
//!   `{type: "error", message: "unsupported protocol version"}` and the connection closes.
//! - `documentId` is the bs58check encoding of the 16-byte UUID: the same [`DocumentId`] as
//!   Accord's own clients use. `request` and `sync` carry Automerge sync messages: the first
//!   one for a document subscribes this connection to its actor (kind Automerge) exactly as a
//!   native subscriber, and the actor's `Sync` payloads go back as `sync` messages. A `sync`
//!   creates a missing document when the token allows writing; a `request` never does, and is
//!   answered `doc-unavailable` (as is a document the token does not cover, one of the other
//!   kind, or one over `max_documents_per_connection`).
//! - `ephemeral` messages are relayed, unchanged but for `targetId`, to the other
//!   automerge-repo connections subscribed to that document, dropping repeats of a
//!   `(senderId, sessionId, count)` already relayed ([`EphemeralHub`]).
//! - `leave` closes quietly; `remote-heads-changed`, `remote-subscription-change`,
//!   `doc-unavailable` and types this version does not know are ignored.
//! - Bad input (not CBOR, not a map, a message before `join`, a malformed document id, an
//!   Automerge sync message that does not decode) gets `{type: "error", message}` and closes
//!   this connection only.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use accord_engine::protocol::{ErrorCode, Message, SyncPayload};
use accord_engine::{DocKind, DocumentId, ReplicaId};
use axum::body::Bytes;
use ciborium::Value;
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;
use tokio::sync::oneshot;

use crate::compat::{derived_replica, Conn, Hub, Protocol, RelayQueue, Stop};
use crate::document::{Command, Lease, SubscribeRequest};

/// The only protocol version there is.
const PROTOCOL_V1: &str = "1";

/// Longest peer, session or document id accepted.
const MAX_ID_LEN: usize = 256;

/// `(sender, session)` pairs remembered per document for deduplication; the map is cleared
/// when it is full (a repeat after that is relayed once more: harmless for presence).
const MAX_SESSIONS: usize = 4_096;

/// Ephemeral messages of every document with automerge-repo members.
pub(crate) type EphemeralHub = Hub<Arc<Ephemeral>, Sessions>;

/// The highest count relayed per `(senderId, sessionId)` of one document.
#[derive(Default)]
pub(crate) struct Sessions(HashMap<(String, String), u64>);

/// An ephemeral message being relayed.
pub(crate) struct Ephemeral {
    sender: String,
    session: String,
    count: u64,
    document: String,
    data: Vec<u8>,
}

/// One automerge-repo connection.
pub(crate) struct AmRepo {
    server_peer: Arc<str>,
    relay: RelayQueue<Arc<Ephemeral>>,
    /// Who the client is, once it joined. Boxed: this struct is stored in the connection's task
    /// for its whole life, and 40 bytes less kept that task a cell size smaller (session 13).
    joined: Option<Box<Joined>>,
    documents: HashMap<DocumentId, Subscribed>,
}

/// A client that joined.
struct Joined {
    /// Its peer id.
    peer: String,
    /// The replica its changes are attributed to (derived from the peer id).
    replica: ReplicaId,
}

struct Subscribed {
    lease: Lease,
    /// The id as the client spells it.
    encoded: String,
}

/// What a client sends; fields of other message types are ignored without being kept.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Incoming {
    #[serde(rename = "type")]
    kind: String,
    sender_id: Option<String>,
    document_id: Option<String>,
    data: Option<ByteBuf>,
    supported_protocol_versions: Option<Versions>,
    session_id: Option<String>,
    count: Option<u64>,
    #[allow(dead_code)]
    target_id: Option<IgnoredAny>,
}

/// A CBOR byte string.
struct ByteBuf(Vec<u8>);

impl<'de> Deserialize<'de> for ByteBuf {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ByteBuf;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v))
            }
        }
        deserializer.deserialize_byte_buf(V)
    }
}

/// Whether an array of versions contains `"1"` (without keeping the array).
struct Versions(bool);

impl<'de> Deserialize<'de> for Versions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Versions;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of protocol versions")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Versions, A::Error> {
                let mut found = false;
                while let Some(version) = seq.next_element::<VersionItem>()? {
                    found |= version.0;
                }
                Ok(Versions(found))
            }
        }
        deserializer.deserialize_seq(V)
    }
}

/// One version: true when it is `"1"`; anything else (even not a string) is just not it.
struct VersionItem(bool);

impl<'de> Deserialize<'de> for VersionItem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = VersionItem;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a protocol version")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<VersionItem, E> {
                Ok(VersionItem(v == PROTOCOL_V1))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<VersionItem, E> {
                Ok(VersionItem(false))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<VersionItem, E> {
                Ok(VersionItem(false))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// The bs58check form of a document id, as automerge-repo writes it.
pub(crate) fn encode_document_id(document: DocumentId) -> String {
    bs58::encode(document.as_bytes()).with_check().into_string()
}

/// A document id from its bs58check form (optionally with the `automerge:` URL prefix).
pub(crate) fn decode_document_id(text: &str) -> Option<DocumentId> {
    let text = text.strip_prefix("automerge:").unwrap_or(text);
    if text.len() > 64 {
        return None;
    }
    let bytes = bs58::decode(text).with_check(None).into_vec().ok()?;
    let bytes: [u8; 16] = bytes.try_into().ok()?;
    Some(DocumentId::from_bytes(bytes))
}

fn encode(fields: Vec<(&str, Value)>) -> Vec<u8> {
    let map = Value::Map(
        fields
            .into_iter()
            .map(|(k, v)| (Value::Text(k.to_owned()), v))
            .collect(),
    );
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = ciborium::into_writer(&map, &mut out);
    out
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn bad(reason: impl Into<String>) -> Stop {
    Stop::error(ErrorCode::MalformedFrame, reason)
}

fn id_field(value: Option<String>, name: &str) -> Result<String, Stop> {
    match value {
        Some(v) if !v.is_empty() && v.len() <= MAX_ID_LEN => Ok(v),
        Some(_) => Err(bad(format!("{name} must be 1 to {MAX_ID_LEN} bytes"))),
        None => Err(bad(format!("{name} is missing"))),
    }
}

impl AmRepo {
    pub(crate) fn new(server_peer: Arc<str>, relay: RelayQueue<Arc<Ephemeral>>) -> Self {
        Self {
            server_peer,
            relay,
            joined: None,
            documents: HashMap::new(),
        }
    }

    /// The client's peer id, once it joined.
    fn peer(&self) -> Option<&String> {
        self.joined.as_ref().map(|joined| &joined.peer)
    }

    fn unavailable(&self, conn: &mut Conn, encoded: &str) {
        let Some(peer) = self.peer() else { return };
        conn.send(encode(vec![
            ("type", text("doc-unavailable")),
            ("senderId", text(&self.server_peer)),
            ("targetId", text(peer)),
            ("documentId", text(encoded)),
        ]));
    }

    fn join(&mut self, conn: &mut Conn, message: Incoming) -> Result<(), Stop> {
        let sender = id_field(message.sender_id, "senderId")?;
        if let Some(peer) = self.peer() {
            if *peer != sender {
                return Err(Stop::error(
                    ErrorCode::ProtocolViolation,
                    "a second join with another peer id",
                ));
            }
        }
        if !message.supported_protocol_versions.is_some_and(|v| v.0) {
            return Err(Stop::error(
                ErrorCode::UnsupportedVersion,
                "unsupported protocol version",
            ));
        }
        let replica = derived_replica(&format!("accord:automerge-repo-peer:{sender}"));
        conn.send(encode(vec![
            ("type", text("peer")),
            ("senderId", text(&self.server_peer)),
            ("targetId", text(&sender)),
            ("selectedProtocolVersion", text(PROTOCOL_V1)),
            (
                "peerMetadata",
                Value::Map(vec![(text("isEphemeral"), Value::Bool(false))]),
            ),
        ]));
        self.joined = Some(Box::new(Joined {
            peer: sender,
            replica,
        }));
        Ok(())
    }

    /// A `request` or `sync`: subscribes on first sight, then hands the data to the actor.
    async fn sync(
        &mut self,
        conn: &mut Conn,
        message: Incoming,
        request: bool,
    ) -> Result<(), Stop> {
        let encoded = id_field(message.document_id, "documentId")?;
        let Some(document) = decode_document_id(&encoded) else {
            return Err(bad(format!("{encoded:?} is not a bs58check document id")));
        };
        let data = match message.data {
            Some(ByteBuf(data)) if !data.is_empty() => data,
            _ => return Err(bad("a sync message without data")),
        };
        if !self.documents.contains_key(&document) {
            if !conn.grant.covers(document) {
                tracing::debug!(connection = conn.id, %document, "not covered by the token");
                self.unavailable(conn, &encoded);
                return Ok(());
            }
            if self.documents.len() >= conn.shared.config.max_documents_per_connection {
                tracing::debug!(connection = conn.id, %document, "too many documents");
                self.unavailable(conn, &encoded);
                return Ok(());
            }
            let Some(lease) = conn.shared.documents.acquire(document) else {
                return Err(Stop::error(
                    ErrorCode::ShuttingDown,
                    "the server is shutting down",
                ));
            };
            let can_write = conn.grant.can_write();
            let (reply, answer) = oneshot::channel();
            let command = Command::Subscribe {
                request: SubscribeRequest {
                    out: conn.outbox.clone(),
                    replica: self
                        .joined
                        .as_ref()
                        .map_or_else(crate::compat::random_replica, |joined| joined.replica),
                    kind: DocKind::Automerge,
                    since_seq: u64::MAX,
                    read_only: !can_write,
                    // A request means the client has nothing: never create for it.
                    may_create: can_write && !request,
                    acks: false,
                },
                reply,
            };
            if !lease.send(command).await || answer.await != Ok(true) {
                // The actor said why (an `Error` about this document, answered with
                // `doc-unavailable` in `document`), or it is gone.
                return Ok(());
            }
            conn.shared
                .compat
                .ephemeral
                .join(document, conn.id, self.relay.clone(), |_| ());
            self.documents.insert(
                document,
                Subscribed {
                    lease,
                    encoded: encoded.clone(),
                },
            );
        }
        let Some(subscribed) = self.documents.get(&document) else {
            return Ok(());
        };
        let command = Command::Sync {
            connection: conn.id,
            payload: SyncPayload::Automerge(data),
        };
        if !subscribed.lease.send(command).await {
            self.drop_document(conn, document).await;
            self.unavailable(conn, &encoded);
        }
        Ok(())
    }

    fn ephemeral(&mut self, conn: &mut Conn, message: Incoming) -> Result<(), Stop> {
        let sender = id_field(message.sender_id, "senderId")?;
        let session = id_field(message.session_id, "sessionId")?;
        let encoded = id_field(message.document_id, "documentId")?;
        let Some(document) = decode_document_id(&encoded) else {
            return Err(bad(format!("{encoded:?} is not a bs58check document id")));
        };
        let Some(count) = message.count else {
            return Err(bad("an ephemeral message without count"));
        };
        let Some(ByteBuf(data)) = message.data else {
            return Err(bad("an ephemeral message without data"));
        };
        if !conn.grant.covers(document) {
            return Ok(());
        }
        let id = conn.id;
        conn.shared.compat.ephemeral.with(document, |room| {
            let sessions = &mut room.state.0;
            let key = (sender, session);
            if sessions.get(&key).is_some_and(|last| count <= *last) {
                return;
            }
            if sessions.len() >= MAX_SESSIONS && !sessions.contains_key(&key) {
                sessions.clear();
            }
            let (sender, session) = key.clone();
            sessions.insert(key, count);
            let item = Arc::new(Ephemeral {
                sender,
                session,
                count,
                document: encoded,
                data,
            });
            room.broadcast(id, &item);
        });
        Ok(())
    }

    async fn drop_document(&mut self, conn: &mut Conn, document: DocumentId) {
        if let Some(subscribed) = self.documents.remove(&document) {
            conn.shared
                .compat
                .ephemeral
                .leave(document, conn.id, |_| ());
            let unsubscribe = Command::Unsubscribe {
                connection: conn.id,
            };
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                subscribed.lease.send(unsubscribe),
            )
            .await;
        }
    }
}

impl Protocol for AmRepo {
    type Relayed = Arc<Ephemeral>;

    async fn start(&mut self, _conn: &mut Conn) -> Result<(), Stop> {
        Ok(())
    }

    async fn frame(&mut self, conn: &mut Conn, bytes: Bytes) -> Result<(), Stop> {
        let message: Incoming = ciborium::de::from_reader_with_recursion_limit(&bytes[..], 64)
            .map_err(|e| bad(format!("not an automerge-repo message: {e}")))?;
        if self.joined.is_none() && message.kind != "join" {
            return Err(Stop::error(
                ErrorCode::ProtocolViolation,
                format!("the first message must be join, not {:?}", message.kind),
            ));
        }
        match message.kind.as_str() {
            "join" => self.join(conn, message),
            "request" => self.sync(conn, message, true).await,
            "sync" => self.sync(conn, message, false).await,
            "ephemeral" => self.ephemeral(conn, message),
            "leave" => Err(Stop::quiet()),
            "remote-heads-changed" | "remote-subscription-change" | "doc-unavailable" => Ok(()),
            other => {
                tracing::debug!(connection = conn.id, kind = other, "ignored message type");
                Ok(())
            }
        }
    }

    fn document(&mut self, conn: &mut Conn, message: Message) -> Result<(), Stop> {
        match message {
            Message::Sync {
                document,
                payload: SyncPayload::Automerge(data),
            } => {
                let (Some(peer), Some(subscribed)) = (self.peer(), self.documents.get(&document))
                else {
                    return Ok(());
                };
                if data.is_empty() {
                    return Ok(());
                }
                conn.send(encode(vec![
                    ("type", text("sync")),
                    ("senderId", text(&self.server_peer)),
                    ("targetId", text(peer)),
                    ("documentId", text(&subscribed.encoded)),
                    ("data", Value::Bytes(data)),
                ]));
                Ok(())
            }
            Message::Error {
                code: ErrorCode::InvalidChange,
                message,
                ..
            } => Err(Stop::error(ErrorCode::InvalidChange, message)),
            Message::Error {
                document: Some(document),
                code,
                message,
            } => {
                tracing::debug!(connection = conn.id, %document, ?code, %message, "doc-unavailable");
                let encoded = encode_document_id(document);
                if let Some(subscribed) = self.documents.remove(&document) {
                    // Not waiting here: the actor dropped or will drop this subscriber anyway.
                    conn.shared
                        .compat
                        .ephemeral
                        .leave(document, conn.id, |_| ());
                    drop(subscribed);
                }
                self.unavailable(conn, &encoded);
                Ok(())
            }
            Message::Error { code, message, .. } => Err(Stop::error(code, message)),
            // Acks, Subscribed, and Rejects of a read-only token's writes: automerge-repo has
            // no word for them.
            _ => Ok(()),
        }
    }

    fn relayed(&mut self, conn: &mut Conn, item: Arc<Ephemeral>) -> Result<(), Stop> {
        let Some(peer) = self.peer() else {
            return Ok(());
        };
        conn.send(encode(vec![
            ("type", text("ephemeral")),
            ("senderId", text(&item.sender)),
            ("targetId", text(peer)),
            ("count", Value::Integer(item.count.into())),
            ("sessionId", text(&item.session)),
            ("documentId", text(&item.document)),
            ("data", Value::Bytes(item.data.clone())),
        ]));
        Ok(())
    }

    fn farewell(&mut self, stop: &Stop) -> Vec<Vec<u8>> {
        if stop.code.is_none() {
            return Vec::new();
        }
        let mut fields = vec![
            ("type", text("error")),
            ("senderId", text(&self.server_peer)),
            ("message", text(&stop.reason)),
        ];
        if let Some(peer) = self.peer() {
            fields.push(("targetId", text(peer)));
        }
        vec![encode(fields)]
    }

    async fn finish(&mut self, conn: &mut Conn) {
        let documents: Vec<DocumentId> = self.documents.keys().copied().collect();
        for document in documents {
            self.drop_document(conn, document).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_ids_round_trip_as_automerge_repo_spells_them() {
        let id = DocumentId::from_bytes([7; 16]);
        let text = encode_document_id(id);
        assert_eq!(decode_document_id(&text), Some(id));
        assert_eq!(decode_document_id(&format!("automerge:{text}")), Some(id));
        assert_eq!(decode_document_id("3Xz"), None);
        let mut broken = text.clone();
        broken.pop();
        broken.push(if text.ends_with('2') { '3' } else { '2' });
        assert_eq!(decode_document_id(&broken), None);
    }

    #[test]
    fn decodes_a_join_ignoring_metadata() {
        let bytes = encode(vec![
            ("type", text("join")),
            ("senderId", text("peer-1")),
            (
                "peerMetadata",
                Value::Map(vec![(text("storageId"), text("x"))]),
            ),
            (
                "supportedProtocolVersions",
                Value::Array(vec![text("0"), text("1")]),
            ),
        ]);
        let message: Incoming = ciborium::from_reader(&bytes[..]).unwrap();
        assert_eq!(message.kind, "join");
        assert!(message.supported_protocol_versions.unwrap().0);
        let garbage: Result<Incoming, _> = ciborium::from_reader(&[0xff, 0x00][..]);
        assert!(garbage.is_err());
    }
}
