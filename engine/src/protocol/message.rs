//! The messages of the protocol.

use crate::doc::{ChangeId, DocKind};
use crate::ids::{DocumentId, ReplicaId};

/// One message of the protocol. See the [module docs](super) for the conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Client to server, first: who I am and what I may do.
    Hello {
        /// The protocol version the client speaks.
        protocol_version: u32,
        /// The client's replica id.
        replica: ReplicaId,
        /// An access token, when the server requires one.
        token: Option<String>,
    },
    /// Server to client: the session is open.
    Welcome {
        /// The protocol version the server speaks.
        protocol_version: u32,
        /// The largest frame the server accepts, in bytes.
        max_frame_bytes: u64,
        /// The largest message (after joining chunks) the server accepts, in bytes.
        max_message_bytes: u64,
    },
    /// Start syncing a document.
    Subscribe {
        /// Which document.
        document: DocumentId,
        /// Its CRDT kind (a new document is created with it when the token allows).
        kind: DocKind,
        /// The last commit sequence number the client knows (0 for none).
        since_seq: u64,
    },
    /// The server accepted a subscription.
    Subscribed {
        /// Which document.
        document: DocumentId,
        /// Its kind.
        kind: DocKind,
        /// Its latest commit sequence number.
        head_seq: u64,
        /// Whether this connection may only read it.
        read_only: bool,
    },
    /// Stop syncing a document.
    Unsubscribe {
        /// Which document.
        document: DocumentId,
    },
    /// CRDT data for one document.
    Sync {
        /// Which document.
        document: DocumentId,
        /// The data.
        payload: SyncPayload,
    },
    /// Changes durably committed, with their sequence numbers (ascending, gapless per document).
    Ack {
        /// Which document.
        document: DocumentId,
        /// The commits.
        commits: Vec<Commit>,
    },
    /// A change was refused.
    Reject {
        /// Which document.
        document: DocumentId,
        /// The refused change.
        change: ChangeId,
        /// Why, as a code.
        code: ErrorCode,
        /// Why, in words.
        reason: String,
    },
    /// Something went wrong.
    Error {
        /// What, as a code.
        code: ErrorCode,
        /// The document concerned, if one.
        document: Option<DocumentId>,
        /// What, in words.
        message: String,
    },
    /// One part of a message too large for one frame.
    Chunk {
        /// Which chunked message (chunks of one message are consecutive).
        stream: u32,
        /// The part's position, from 0.
        index: u32,
        /// Whether this is the last part.
        last: bool,
        /// The part's bytes.
        data: Vec<u8>,
    },
}

impl Message {
    /// The message's name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Welcome { .. } => "welcome",
            Message::Subscribe { .. } => "subscribe",
            Message::Subscribed { .. } => "subscribed",
            Message::Unsubscribe { .. } => "unsubscribe",
            Message::Sync { .. } => "sync",
            Message::Ack { .. } => "ack",
            Message::Reject { .. } => "reject",
            Message::Error { .. } => "error",
            Message::Chunk { .. } => "chunk",
        }
    }
}

/// CRDT data, by kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncPayload {
    /// An Automerge sync message.
    Automerge(Vec<u8>),
    /// A Yrs state vector (V1): "send me what I lack".
    YrsStep1(Vec<u8>),
    /// A Yrs update (V1) answering a step 1.
    YrsStep2(Vec<u8>),
    /// A Yrs update (V1) made or received after the handshake.
    YrsUpdate(Vec<u8>),
}

impl SyncPayload {
    /// The document kind this payload is for.
    pub fn kind(&self) -> DocKind {
        match self {
            SyncPayload::Automerge(_) => DocKind::Automerge,
            _ => DocKind::Yrs,
        }
    }

    /// The payload's bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            SyncPayload::Automerge(b)
            | SyncPayload::YrsStep1(b)
            | SyncPayload::YrsStep2(b)
            | SyncPayload::YrsUpdate(b) => b,
        }
    }
}

/// One committed change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commit {
    /// Its sequence number in the document.
    pub seq: u64,
    /// The change.
    pub change: ChangeId,
}

/// Why something failed. The numbers are stable across protocol versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A frame that does not decode.
    MalformedFrame,
    /// A frame or message over the size limit.
    MessageTooLarge,
    /// No protocol version in common.
    UnsupportedVersion,
    /// No token, or a bad one.
    Unauthorized,
    /// The token has expired.
    TokenExpired,
    /// The token does not allow this (a write on a read-only token, another document).
    Forbidden,
    /// The document does not exist.
    UnknownDocument,
    /// Too many documents on this connection.
    TooManyDocuments,
    /// The connection did not keep up, or the server is at a limit.
    Overloaded,
    /// A message that makes no sense now (sync before subscribe, a second hello).
    ProtocolViolation,
    /// The document exists with the other CRDT kind.
    KindMismatch,
    /// CRDT data that the document refused.
    InvalidChange,
    /// Storage failed; nothing was acknowledged.
    Storage,
    /// The server is shutting down.
    ShuttingDown,
    /// An invariant refused the change.
    InvariantViolated,
    /// A code this version does not know.
    Other(u16),
}

impl ErrorCode {
    /// The wire number.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::MalformedFrame => 1,
            ErrorCode::MessageTooLarge => 2,
            ErrorCode::UnsupportedVersion => 3,
            ErrorCode::Unauthorized => 4,
            ErrorCode::TokenExpired => 5,
            ErrorCode::Forbidden => 6,
            ErrorCode::UnknownDocument => 7,
            ErrorCode::TooManyDocuments => 8,
            ErrorCode::Overloaded => 9,
            ErrorCode::ProtocolViolation => 10,
            ErrorCode::KindMismatch => 11,
            ErrorCode::InvalidChange => 12,
            ErrorCode::Storage => 13,
            ErrorCode::ShuttingDown => 14,
            ErrorCode::InvariantViolated => 15,
            ErrorCode::Other(code) => code,
        }
    }

    /// The code for a wire number.
    pub fn from_code(code: u16) -> Self {
        match code {
            1 => ErrorCode::MalformedFrame,
            2 => ErrorCode::MessageTooLarge,
            3 => ErrorCode::UnsupportedVersion,
            4 => ErrorCode::Unauthorized,
            5 => ErrorCode::TokenExpired,
            6 => ErrorCode::Forbidden,
            7 => ErrorCode::UnknownDocument,
            8 => ErrorCode::TooManyDocuments,
            9 => ErrorCode::Overloaded,
            10 => ErrorCode::ProtocolViolation,
            11 => ErrorCode::KindMismatch,
            12 => ErrorCode::InvalidChange,
            13 => ErrorCode::Storage,
            14 => ErrorCode::ShuttingDown,
            15 => ErrorCode::InvariantViolated,
            other => ErrorCode::Other(other),
        }
    }

    /// A short stable name, for metrics labels.
    pub fn label(self) -> &'static str {
        match self {
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::UnknownDocument => "unknown_document",
            ErrorCode::TooManyDocuments => "too_many_documents",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::ProtocolViolation => "protocol_violation",
            ErrorCode::KindMismatch => "kind_mismatch",
            ErrorCode::InvalidChange => "invalid_change",
            ErrorCode::Storage => "storage",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::InvariantViolated => "invariant_violated",
            ErrorCode::Other(_) => "other",
        }
    }
}
