//! Encoding and the size-limited decoder.
//!
//! Written by hand rather than with a serde format: the layout is the protocol's contract, every
//! length is checked against what is left before anything is allocated, and the decoder has no
//! state to corrupt. Any malformed input is a [`DecodeError`], never a panic.

use super::message::{Commit, ErrorCode, Message, SyncPayload};
use crate::doc::{ChangeId, DocKind};
use crate::ids::{DocumentId, ReplicaId};

/// Size limits the decoder enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest single frame, in bytes.
    pub max_frame_bytes: usize,
    /// The largest message after joining chunks, in bytes.
    pub max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 1 << 20,
            max_message_bytes: 64 << 20,
        }
    }
}

/// Why bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame ended before a field did.
    #[error("truncated frame: {0}")]
    Truncated(&'static str),
    /// An unknown message tag.
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    /// An unknown value in a field.
    #[error("invalid {field}: {value}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// The bad value.
        value: u64,
    },
    /// A varint longer than 10 bytes or past 64 bits.
    #[error("varint overflow")]
    VarintOverflow,
    /// Text that is not UTF-8.
    #[error("text is not UTF-8")]
    Utf8,
    /// Bytes left over after the message.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// Over a size limit.
    #[error("{what} of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Frame or message.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Chunks out of order or interleaved.
    #[error("chunk out of sequence: {0}")]
    ChunkSequence(&'static str),
}

mod tag {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const SUBSCRIBE: u8 = 3;
    pub const SUBSCRIBED: u8 = 4;
    pub const UNSUBSCRIBE: u8 = 5;
    pub const SYNC: u8 = 6;
    pub const ACK: u8 = 7;
    pub const REJECT: u8 = 8;
    pub const ERROR: u8 = 9;
    pub const CHUNK: u8 = 10;
}

mod payload_tag {
    pub const AUTOMERGE: u8 = 1;
    pub const YRS_STEP1: u8 = 2;
    pub const YRS_STEP2: u8 = 3;
    pub const YRS_UPDATE: u8 = 4;
}

/// Encodes a message as one frame (see [`super::encode_frames`] to split large ones).
pub fn encode(message: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    match message {
        Message::Hello {
            protocol_version,
            replica,
            token,
        } => {
            out.push(tag::HELLO);
            put_varint(&mut out, u64::from(*protocol_version));
            out.extend_from_slice(replica.as_bytes());
            match token {
                Some(token) => {
                    out.push(1);
                    put_bytes(&mut out, token.as_bytes());
                }
                None => out.push(0),
            }
        }
        Message::Welcome {
            protocol_version,
            max_frame_bytes,
            max_message_bytes,
        } => {
            out.push(tag::WELCOME);
            put_varint(&mut out, u64::from(*protocol_version));
            put_varint(&mut out, *max_frame_bytes);
            put_varint(&mut out, *max_message_bytes);
        }
        Message::Subscribe {
            document,
            kind,
            since_seq,
        } => {
            out.push(tag::SUBSCRIBE);
            out.extend_from_slice(document.as_bytes());
            out.push(kind.code());
            put_varint(&mut out, *since_seq);
        }
        Message::Subscribed {
            document,
            kind,
            head_seq,
            read_only,
        } => {
            out.push(tag::SUBSCRIBED);
            out.extend_from_slice(document.as_bytes());
            out.push(kind.code());
            put_varint(&mut out, *head_seq);
            out.push(u8::from(*read_only));
        }
        Message::Unsubscribe { document } => {
            out.push(tag::UNSUBSCRIBE);
            out.extend_from_slice(document.as_bytes());
        }
        Message::Sync { document, payload } => {
            out.reserve(payload.bytes().len() + 24);
            out.push(tag::SYNC);
            out.extend_from_slice(document.as_bytes());
            out.push(match payload {
                SyncPayload::Automerge(_) => payload_tag::AUTOMERGE,
                SyncPayload::YrsStep1(_) => payload_tag::YRS_STEP1,
                SyncPayload::YrsStep2(_) => payload_tag::YRS_STEP2,
                SyncPayload::YrsUpdate(_) => payload_tag::YRS_UPDATE,
            });
            put_bytes(&mut out, payload.bytes());
        }
        Message::Ack { document, commits } => {
            out.push(tag::ACK);
            out.extend_from_slice(document.as_bytes());
            put_varint(&mut out, commits.len() as u64);
            for commit in commits {
                put_varint(&mut out, commit.seq);
                out.extend_from_slice(&commit.change.0);
            }
        }
        Message::Reject {
            document,
            change,
            code,
            reason,
        } => {
            out.push(tag::REJECT);
            out.extend_from_slice(document.as_bytes());
            out.extend_from_slice(&change.0);
            put_varint(&mut out, u64::from(code.code()));
            put_bytes(&mut out, reason.as_bytes());
        }
        Message::Error {
            code,
            document,
            message,
        } => {
            out.push(tag::ERROR);
            put_varint(&mut out, u64::from(code.code()));
            match document {
                Some(d) => {
                    out.push(1);
                    out.extend_from_slice(d.as_bytes());
                }
                None => out.push(0),
            }
            put_bytes(&mut out, message.as_bytes());
        }
        Message::Chunk {
            stream,
            index,
            last,
            data,
        } => {
            out.reserve(data.len() + 16);
            out.push(tag::CHUNK);
            put_varint(&mut out, u64::from(*stream));
            put_varint(&mut out, u64::from(*index));
            out.push(u8::from(*last));
            put_bytes(&mut out, data);
        }
    }
    out
}

/// Decodes one frame, enforcing `limits.max_frame_bytes`.
pub fn decode(frame: &[u8], limits: &Limits) -> Result<Message, DecodeError> {
    if frame.len() > limits.max_frame_bytes {
        return Err(DecodeError::TooLarge {
            what: "frame",
            size: frame.len(),
            limit: limits.max_frame_bytes,
        });
    }
    let mut r = Reader {
        bytes: frame,
        at: 0,
    };
    let message = match r.u8("tag")? {
        tag::HELLO => Message::Hello {
            protocol_version: r.u32("protocol version")?,
            replica: ReplicaId::from_bytes(r.array("replica id")?),
            token: match r.u8("token flag")? {
                0 => None,
                1 => Some(r.string("token")?),
                other => return Err(invalid("token flag", other)),
            },
        },
        tag::WELCOME => Message::Welcome {
            protocol_version: r.u32("protocol version")?,
            max_frame_bytes: r.varint("max frame")?,
            max_message_bytes: r.varint("max message")?,
        },
        tag::SUBSCRIBE => Message::Subscribe {
            document: r.document()?,
            kind: r.kind()?,
            since_seq: r.varint("since seq")?,
        },
        tag::SUBSCRIBED => Message::Subscribed {
            document: r.document()?,
            kind: r.kind()?,
            head_seq: r.varint("head seq")?,
            read_only: r.bool("read only")?,
        },
        tag::UNSUBSCRIBE => Message::Unsubscribe {
            document: r.document()?,
        },
        tag::SYNC => {
            let document = r.document()?;
            let kind = r.u8("payload tag")?;
            let bytes = r.bytes("payload")?.to_vec();
            let payload = match kind {
                payload_tag::AUTOMERGE => SyncPayload::Automerge(bytes),
                payload_tag::YRS_STEP1 => SyncPayload::YrsStep1(bytes),
                payload_tag::YRS_STEP2 => SyncPayload::YrsStep2(bytes),
                payload_tag::YRS_UPDATE => SyncPayload::YrsUpdate(bytes),
                other => return Err(invalid("payload tag", other)),
            };
            Message::Sync { document, payload }
        }
        tag::ACK => {
            let document = r.document()?;
            let count = r.varint("commit count")?;
            // Each commit takes at least 33 bytes: refuse counts the frame cannot hold before
            // allocating for them.
            if count > (r.remaining() / 33) as u64 {
                return Err(DecodeError::Truncated("commits"));
            }
            let mut commits = Vec::with_capacity(count as usize);
            for _ in 0..count {
                commits.push(Commit {
                    seq: r.varint("seq")?,
                    change: ChangeId(r.array("change id")?),
                });
            }
            Message::Ack { document, commits }
        }
        tag::REJECT => Message::Reject {
            document: r.document()?,
            change: ChangeId(r.array("change id")?),
            code: r.error_code()?,
            reason: r.string("reason")?,
        },
        tag::ERROR => Message::Error {
            code: r.error_code()?,
            document: match r.u8("document flag")? {
                0 => None,
                1 => Some(r.document()?),
                other => return Err(invalid("document flag", other)),
            },
            message: r.string("message")?,
        },
        tag::CHUNK => Message::Chunk {
            stream: r.u32("stream")?,
            index: r.u32("index")?,
            last: r.bool("last")?,
            data: r.bytes("chunk data")?.to_vec(),
        },
        other => return Err(DecodeError::UnknownTag(other)),
    };
    if r.remaining() > 0 {
        return Err(DecodeError::Trailing(r.remaining()));
    }
    Ok(message)
}

fn invalid(field: &'static str, value: u8) -> DecodeError {
    DecodeError::Invalid {
        field,
        value: u64::from(value),
    }
}

/// Appends `value` as an unsigned LEB128 varint (7 bits a byte, low first), the integer encoding
/// of this protocol and of lib0 (`writeVarUint`), which y-protocols messages use.
pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Appends `bytes` prefixed by their length as a varint ([`put_varint`]; lib0's
/// `writeVarUint8Array`).
pub fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated(what));
        }
        let slice = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(slice)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(invalid(what, other)),
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let mut value: u64 = 0;
        for i in 0..10 {
            let byte = self.u8(what)?;
            let part = u64::from(byte & 0x7f);
            if i == 9 && part > 1 {
                return Err(DecodeError::VarintOverflow);
            }
            value |= part << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::VarintOverflow)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let value = self.varint(what)?;
        u32::try_from(value).map_err(|_| DecodeError::Invalid { field: what, value })
    }

    fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.varint(what)?;
        if len > self.remaining() as u64 {
            return Err(DecodeError::Truncated(what));
        }
        self.take(len as usize, what)
    }

    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let bytes = self.bytes(what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::Utf8)
    }

    fn document(&mut self) -> Result<DocumentId, DecodeError> {
        Ok(DocumentId::from_bytes(self.array("document id")?))
    }

    fn kind(&mut self) -> Result<DocKind, DecodeError> {
        let code = self.u8("kind")?;
        DocKind::from_code(code).ok_or(invalid("kind", code))
    }

    fn error_code(&mut self) -> Result<ErrorCode, DecodeError> {
        let value = self.varint("error code")?;
        let code = u16::try_from(value).map_err(|_| DecodeError::Invalid {
            field: "error code",
            value,
        })?;
        Ok(ErrorCode::from_code(code))
    }
}
