//! The Accord wire protocol, version 1.
//!
//! One stream (a WebSocket, or anything that carries ordered binary frames) multiplexes many
//! documents. Every frame is one [`Message`]: a tag byte, then its fields. Integers are unsigned
//! LEB128 varints, byte strings and text are a varint length then the bytes (text is UTF-8),
//! document ids are 16 raw bytes and change ids 32 raw bytes. A message larger than the frame
//! limit travels as consecutive [`Message::Chunk`] frames that the receiver's [`Reassembler`]
//! joins, up to its message limit: a large update is split, never refused or looped.
//!
//! # The conversation
//! 1. The client sends [`Message::Hello`] (protocol version, its replica id, a token). The server
//!    answers [`Message::Welcome`] with its limits, or [`Message::Error`] and closes.
//! 2. For each document: [`Message::Subscribe`] (its kind and the last commit sequence number the
//!    client knows). The server answers [`Message::Subscribed`], then [`Message::Ack`] with every
//!    commit after that number, so a returning client learns the fate of changes it sent before
//!    a disconnect.
//! 3. Both sides bring the document up to date with [`Message::Sync`]:
//!    - Automerge: the Automerge sync protocol, one `automerge::sync::State` per peer and
//!      document, messages exchanged until both sides generate none.
//!    - Yrs: each side sends `YrsStep1` (its state vector); each answers a step 1 with `YrsStep2`
//!      (the update the other lacks); after that, every new change travels as `YrsUpdate`.
//! 4. The server commits every new change: it gives it the document's next sequence number,
//!    makes it durable, then sends [`Message::Ack`] to every subscriber and relays the change.
//!    A refused change gets [`Message::Reject`] with a code and a reason.
//! 5. [`Message::Error`] reports a problem with a code; codes are stable across versions.
//!
//! Replicas that sync with each other directly (no server) use steps 3 only.
//!
//! ```
//! use accord_engine::protocol::{decode, encode, Limits, Message, PROTOCOL_VERSION};
//! use accord_engine::ReplicaId;
//! let hello = Message::Hello {
//!     protocol_version: PROTOCOL_VERSION,
//!     replica: ReplicaId::from_bytes([1; 16]),
//!     token: Some("secret".into()),
//! };
//! let bytes = encode(&hello);
//! assert_eq!(decode(&bytes, &Limits::default()).unwrap(), hello);
//! assert!(decode(&bytes[..5], &Limits::default()).is_err());
//! ```

mod chunk;
mod codec;
mod message;

pub use chunk::{encode_frames, Reassembler};
pub use codec::{decode, encode, put_bytes, put_varint, DecodeError, Limits};
pub use message::{Commit, ErrorCode, Message, SyncPayload};

/// The protocol version this engine speaks.
pub const PROTOCOL_VERSION: u32 = 1;

#[cfg(test)]
mod tests;
