//! Access tokens: HMAC-SHA256 signed claims naming a document or a prefix of ids, rights and an
//! expiry.
//!
//! A token is `base64url(payload) + "." + base64url(mac)`, where the payload is JSON
//! (`{"doc":"<uuid>","rights":"write","exp":1767225600}` or `{"prefix":"…",…}`) and the mac is the
//! HMAC-SHA256 of the encoded payload under the server secret. Times are unix seconds, read by
//! the caller (the server's driver clock), never here.
//!
//! ```
//! use accord_server::auth::{Claims, Rights, Scope, mint, verify};
//! let claims = Claims { scope: Scope::Prefix(String::new()), rights: Rights::Read, exp: 100 };
//! let token = mint(b"secret", &claims);
//! assert_eq!(verify(b"secret", &token, 99).unwrap(), claims);
//! assert!(verify(b"other", &token, 99).is_err());
//! assert!(verify(b"secret", &token, 100).is_err());
//! ```

use accord_engine::protocol::ErrorCode;
use accord_engine::DocumentId;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// What a token lets its holder do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rights {
    /// Subscribe and receive only.
    Read,
    /// Subscribe, create documents and write.
    Write,
}

/// Which documents a token covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Exactly one document.
    Document(DocumentId),
    /// Every document whose hyphenated id starts with this text (empty: every document).
    Prefix(String),
}

/// The signed content of a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// The documents it covers.
    pub scope: Scope,
    /// What it allows.
    pub rights: Rights,
    /// When it expires, in unix seconds (invalid from that second on).
    pub exp: u64,
}

#[derive(Serialize, Deserialize)]
struct Payload {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    doc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    rights: Rights,
    exp: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token was given.
    #[error("a token is required")]
    Missing,
    /// The token is not `payload.mac` in base64url, or its payload is not valid claims.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The signature does not match.
    #[error("bad token signature")]
    BadSignature,
    /// The token has expired.
    #[error("token expired at {0}")]
    Expired(u64),
}

impl AuthError {
    /// The protocol error code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Expired(_) => ErrorCode::TokenExpired,
            _ => ErrorCode::Unauthorized,
        }
    }
}

impl Claims {
    /// Whether the claims cover `document`.
    pub fn covers(&self, document: DocumentId) -> bool {
        match &self.scope {
            Scope::Document(id) => *id == document,
            Scope::Prefix(prefix) => document.to_string().starts_with(prefix.as_str()),
        }
    }

    /// Whether the claims allow writing.
    pub fn can_write(&self) -> bool {
        self.rights == Rights::Write
    }
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length, so this never fails.
    match HmacSha256::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

/// Signs `claims` with `secret`.
pub fn mint(secret: &[u8], claims: &Claims) -> String {
    let (doc, prefix) = match &claims.scope {
        Scope::Document(id) => (Some(id.to_string()), None),
        Scope::Prefix(p) => (None, Some(p.clone())),
    };
    let payload = Payload {
        doc,
        prefix,
        rights: claims.rights,
        exp: claims.exp,
    };
    let json = serde_json::to_vec(&payload).unwrap_or_default();
    let encoded = URL_SAFE_NO_PAD.encode(json);
    let mut mac = mac(secret);
    mac.update(encoded.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{encoded}.{signature}")
}

/// Checks `token` against `secret` at `now` (unix seconds) and returns its claims.
pub fn verify(secret: &[u8], token: &str, now: u64) -> Result<Claims, AuthError> {
    let (encoded, signature) = token
        .split_once('.')
        .ok_or_else(|| AuthError::Malformed("no '.' separator".into()))?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|e| AuthError::Malformed(e.to_string()))?;
    let mut mac = mac(secret);
    mac.update(encoded.as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| AuthError::BadSignature)?;
    let json = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|e| AuthError::Malformed(e.to_string()))?;
    let payload: Payload =
        serde_json::from_slice(&json).map_err(|e| AuthError::Malformed(e.to_string()))?;
    let scope = match (payload.doc, payload.prefix) {
        (Some(doc), None) => Scope::Document(
            doc.parse::<DocumentId>()
                .map_err(|e| AuthError::Malformed(e.to_string()))?,
        ),
        (None, Some(prefix)) => Scope::Prefix(prefix),
        _ => {
            return Err(AuthError::Malformed(
                "exactly one of doc and prefix is required".into(),
            ))
        }
    };
    if now >= payload.exp {
        return Err(AuthError::Expired(payload.exp));
    }
    Ok(Claims {
        scope,
        rights: payload.rights,
        exp: payload.exp,
    })
}

/// How the server checks access.
#[derive(Clone)]
pub enum AuthMode {
    /// Every client needs a token signed with this secret.
    Secret(Vec<u8>),
    /// No checks: every client may read and write every document.
    Disabled,
}

impl std::fmt::Debug for AuthMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthMode::Secret(_) => f.write_str("Secret(..)"),
            AuthMode::Disabled => f.write_str("Disabled"),
        }
    }
}

/// The admin token given to the server (`ACCORD_ADMIN_TOKEN`); its `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(pub String);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// What one connection may do, decided at its hello.
#[derive(Clone, Debug)]
pub enum Grant {
    /// Everything (auth disabled).
    All,
    /// What the token's claims allow, until they expire. Boxed: every connection holds its
    /// grant for its whole life, in place in its task (8 bytes instead of ~40).
    Token(Box<Claims>),
}

impl Grant {
    /// Checks a hello's token under `mode` at `now`.
    pub fn check(mode: &AuthMode, token: Option<&str>, now: u64) -> Result<Grant, AuthError> {
        match mode {
            AuthMode::Disabled => Ok(Grant::All),
            AuthMode::Secret(secret) => {
                let token = token.ok_or(AuthError::Missing)?;
                verify(secret, token, now).map(|claims| Grant::Token(Box::new(claims)))
            }
        }
    }

    /// The expiry, if any.
    pub fn expires_at(&self) -> Option<u64> {
        match self {
            Grant::All => None,
            Grant::Token(c) => Some(c.exp),
        }
    }

    /// Whether the grant has expired at `now`.
    pub fn expired(&self, now: u64) -> bool {
        self.expires_at().is_some_and(|exp| now >= exp)
    }

    /// Whether it covers `document`.
    pub fn covers(&self, document: DocumentId) -> bool {
        match self {
            Grant::All => true,
            Grant::Token(c) => c.covers(document),
        }
    }

    /// Whether it allows writing.
    pub fn can_write(&self) -> bool {
        match self {
            Grant::All => true,
            Grant::Token(c) => c.can_write(),
        }
    }
}

/// The admin token derived from the server secret: base64url of the HMAC-SHA256 of a fixed
/// label. It authenticates `POST /v1/tokens` (as does `ACCORD_ADMIN_TOKEN` when set) and can be
/// printed with `accord-server admin-token`.
pub fn admin_token(secret: &[u8]) -> String {
    let mut mac = mac(secret);
    mac.update(b"accord admin token v1");
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// Compares two secrets in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Seconds since the unix epoch, from the system clock (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_check_signature_expiry_and_scope() {
        let doc = DocumentId::from_bytes([3; 16]);
        let claims = Claims {
            scope: Scope::Document(doc),
            rights: Rights::Write,
            exp: 1000,
        };
        let token = mint(b"k", &claims);
        let got = verify(b"k", &token, 10).unwrap();
        assert!(got.covers(doc));
        assert!(!got.covers(DocumentId::from_bytes([4; 16])));
        assert_eq!(verify(b"x", &token, 10), Err(AuthError::BadSignature));
        assert_eq!(verify(b"k", &token, 1000), Err(AuthError::Expired(1000)));
        assert!(matches!(
            verify(b"k", "garbage", 10),
            Err(AuthError::Malformed(_))
        ));
        assert_ne!(admin_token(b"k"), admin_token(b"x"));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd") && !constant_time_eq(b"abc", b"ab"));
        let mut tampered = token.clone();
        tampered.insert(3, 'A');
        assert!(verify(b"k", &tampered, 10).is_err());
    }
}
