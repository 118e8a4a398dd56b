//! The REST API, for back ends that hold no replica: JSON in, JSON out, on the same router as
//! `/sync`.
//!
//! - `POST /v1/documents` `{"kind":"automerge"|"yrs","id"?:"<uuid>"}` creates a document
//!   (201 `{"id","kind"}`; 409 if the id exists).
//! - `GET /v1/documents/{id}` reads its committed state: `{"id","kind","head_seq","state"}`.
//! - `POST /v1/documents/{id}/changes` with a JSON array of ops
//!   (`[{"op":"put","path":["a"],"value":1}]`) applies them as one change through the document's
//!   actor: it gets the next sequence number, is committed, acknowledged and relayed to the
//!   WebSocket subscribers like any other change, and the answer is `{"seq","change"}` (both
//!   `null`, with `head_seq`, when the ops changed nothing).
//! - `GET /v1/documents/{id}/changes?since=N&limit=M` is the change feed in JSON lines
//!   (`application/x-ndjson`): one line per commit after `N`,
//!   `{"seq","change":"<hex>","author":"<uuid>"|null,"bytes":"<base64>"|null}`. `author` is
//!   `null` for the server's own (REST) changes and `bytes` once a snapshot covers the change. At
//!   most `limit` lines (default 1,000, at most 10,000) and about 16 MiB of change bytes; read on
//!   from the last `seq`. The header `x-accord-head-seq` gives the head.
//! - `POST /v1/tokens` (`Authorization: Bearer <admin token>`)
//!   `{"doc"|"prefix","rights":"read"|"write","ttl_secs"?}` mints a client token (201
//!   `{"token","exp"}`).
//!
//! The document endpoints take the same HMAC tokens as the WebSocket (`Authorization: Bearer`),
//! unless auth is disabled. Every failure is a 4xx or 5xx with a JSON body `{"code","message"}`;
//! bodies are limited to [`crate::Config::max_rest_body_bytes`], and requests beyond
//! [`crate::Config::max_rest_in_flight`] at once get 503 `overloaded`.

use std::sync::Arc;

use accord_engine::{DocKind, DocumentId, Op};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;
use serde_json::json;

use crate::auth::{self, AuthError, AuthMode, Claims, Grant, Rights, Scope};
use crate::document::{server_replica, Applied, Command, DocState, Refusal};
use crate::Shared;

/// Feed lines when no `limit` is given.
const FEED_DEFAULT: usize = 1_000;
/// Feed lines at most.
const FEED_MAX: usize = 10_000;
/// Change bytes per feed response at most (past the first line).
const FEED_MAX_BYTES: usize = 16 << 20;
/// Token lifetime when none is given, and at most.
const TOKEN_TTL_DEFAULT: u64 = 3_600;
const TOKEN_TTL_MAX: u64 = 366 * 86_400;

/// The REST routes: bodies limited to `max_rest_body_bytes`, at most `max_rest_in_flight`
/// requests at once.
pub(crate) fn router(shared: &Arc<Shared>) -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/documents", post(create))
        .route("/v1/documents/{id}", get(read))
        .route("/v1/documents/{id}/changes", post(apply).get(feed))
        .route("/v1/documents/{id}/conflicts", get(conflicts))
        .route("/v1/documents/{id}/conflicts/{key}", post(choose))
        .route("/v1/schemas", get(schemas))
        .route("/v1/tokens", post(mint_token))
        .layer(DefaultBodyLimit::max(shared.config.max_rest_body_bytes))
        .route_layer(middleware::from_fn_with_state(shared.clone(), in_flight))
}

/// Serves the request if a permit is free, else answers 503 `overloaded` at once.
async fn in_flight(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let Ok(_permit) = shared.rest_permits.clone().try_acquire_owned() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many REST requests in flight",
        )
        .into_response();
    };
    next.run(request).await
}

/// A failed request: its status and the JSON body `{"code","message"}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn storage(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "REST storage error");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage",
            format!("storage failed: {error}"),
        )
    }

    fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        )
    }

    fn body(rejection: BytesRejection) -> Self {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "bad_body"
        };
        Self::new(status, code, rejection.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "code": self.code, "message": self.message });
        (self.status, Json(body)).into_response()
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Missing => Self::new(
                StatusCode::NOT_FOUND,
                "unknown_document",
                "no such document",
            ),
            Refusal::BadOps(message) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_ops", message)
            }
            Refusal::Storage(message) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "storage", message)
            }
        }
    }
}

type ApiResult = Result<Response, ApiError>;

/// The bearer token of a request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

fn auth_error(error: AuthError) -> ApiError {
    let code = match error {
        AuthError::Expired(_) => "token_expired",
        _ => "unauthorized",
    };
    ApiError::new(StatusCode::UNAUTHORIZED, code, error.to_string())
}

/// Checks the request's token for `document`, and for writing when `write`.
fn authorize(
    shared: &Shared,
    headers: &HeaderMap,
    document: DocumentId,
    write: bool,
) -> Result<(), ApiError> {
    let grant =
        Grant::check(&shared.config.auth, bearer(headers), auth::unix_now()).map_err(auth_error)?;
    if !grant.covers(document) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the token does not cover this document",
        ));
    }
    if write && !grant.can_write() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token is read-only",
        ));
    }
    Ok(())
}

fn parse_id(id: &str) -> Result<DocumentId, ApiError> {
    id.parse::<DocumentId>().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_id",
            format!("not a document id: {e}"),
        )
    })
}

/// Parses a JSON body: bad syntax is `bad_json`, the wrong shape `bad_shape` (or `what`).
fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &'static str,
) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let code = match e.classify() {
            serde_json::error::Category::Data => what,
            _ => "bad_json",
        };
        ApiError::new(StatusCode::BAD_REQUEST, code, e.to_string())
    })
}

/// Sends `command` (built around a reply channel) to `document`'s actor and waits for the answer.
async fn ask<T>(
    shared: &Arc<Shared>,
    document: DocumentId,
    command: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> Command,
) -> Result<T, ApiError> {
    let lease = shared
        .documents
        .acquire(document)
        .ok_or_else(ApiError::shutting_down)?;
    let (reply, answer) = tokio::sync::oneshot::channel();
    if !lease.send(command(reply)).await {
        return Err(ApiError::shutting_down());
    }
    answer.await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage",
            "the document stopped (storage failed or shutdown); nothing was committed",
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    kind: DocKind,
    #[serde(default)]
    id: Option<String>,
}

async fn create(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = body.map_err(ApiError::body)?;
    let request: CreateBody = parse_json(&body, "bad_request")?;
    let document = match request.id {
        Some(id) => parse_id(&id)?,
        None => {
            let mut bytes = [0u8; 16];
            getrandom::fill(&mut bytes).map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("no randomness for an id: {e}"),
                )
            })?;
            DocumentId::from_random_bytes(bytes)
        }
    };
    authorize(&shared, &headers, document, true)?;
    let kind = request.kind;
    let created = shared
        .storage
        .create(document, kind)
        .await
        .map_err(ApiError::storage)?;
    if !created {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "exists",
            format!("document {document} exists"),
        ));
    }
    let body = json!({ "id": document.to_string(), "kind": kind });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn read(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let document = parse_id(&id)?;
    authorize(&shared, &headers, document, false)?;
    let state: DocState = ask(&shared, document, |reply| Command::Read { reply }).await??;
    let body = json!({
        "id": document.to_string(),
        "kind": state.kind,
        "head_seq": state.head_seq,
        "state": state.json,
    });
    Ok(Json(body).into_response())
}

async fn apply(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let document = parse_id(&id)?;
    authorize(&shared, &headers, document, true)?;
    let body = body.map_err(ApiError::body)?;
    let ops: Vec<Op> = parse_json(&body, "bad_ops")?;
    if ops.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_ops",
            "an empty list of ops",
        ));
    }
    let applied = ask(&shared, document, |reply| Command::Apply { ops, reply }).await??;
    let body = match applied {
        Applied::Committed { seq, change } => {
            json!({ "seq": seq, "change": change.to_hex(), "head_seq": seq })
        }
        Applied::Unchanged { head_seq } => {
            json!({ "seq": null, "change": null, "head_seq": head_seq })
        }
    };
    Ok(Json(body).into_response())
}

/// The conflict inbox of a document: open conflicts with their options.
async fn conflicts(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let document = parse_id(&id)?;
    authorize(&shared, &headers, document, false)?;
    let open = ask(&shared, document, |reply| Command::Conflicts { reply }).await??;
    let body: Vec<serde_json::Value> = open
        .into_iter()
        .map(|(key, conflict)| json!({ "key": key, "conflict": conflict }))
        .collect();
    Ok(Json(json!({ "conflicts": body })).into_response())
}

#[derive(Deserialize)]
struct Choice {
    choice: usize,
    by: String,
}

/// Settles an open conflict with one of its options: a change like any other, committed,
/// acknowledged and relayed.
async fn choose(
    State(shared): State<Arc<Shared>>,
    Path((id, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let document = parse_id(&id)?;
    authorize(&shared, &headers, document, true)?;
    let body = body.map_err(ApiError::body)?;
    let Choice { choice, by } = parse_json(&body, "bad_choice")?;
    let applied = ask(&shared, document, |reply| Command::Choose {
        key,
        choice,
        by,
        reply,
    })
    .await??;
    let body = match applied {
        Applied::Committed { seq, change } => json!({ "seq": seq, "change": change.to_hex() }),
        Applied::Unchanged { head_seq } => json!({ "seq": null, "head_seq": head_seq }),
    };
    Ok(Json(body).into_response())
}

/// The invariants the server enforces, by document type (clients fetch them to warn early).
async fn schemas(State(shared): State<Arc<Shared>>) -> ApiResult {
    Ok(Json(json!({ "schemas": shared.config.schemas })).into_response())
}

#[derive(Deserialize)]
struct FeedQuery {
    #[serde(default)]
    since: u64,
    #[serde(default)]
    limit: Option<usize>,
}

async fn feed(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<FeedQuery>, QueryRejection>,
) -> ApiResult {
    let document = parse_id(&id)?;
    authorize(&shared, &headers, document, false)?;
    let Query(query) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?;
    let limit = query.limit.unwrap_or(FEED_DEFAULT).clamp(1, FEED_MAX);
    let since = query.since;
    // Feed reads queue here, not in the store's read queue, where they would hold every reader
    // thread and stall documents' loads.
    let _feed =
        shared.feed_permits.acquire().await.map_err(|_| {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "closed")
        })?;
    let found = shared
        .storage
        .read(move |store| {
            let Some((_, head)) = store.head(document)? else {
                return Ok(None);
            };
            Ok(Some((
                head,
                store.feed(document, since, limit, FEED_MAX_BYTES)?,
            )))
        })
        .await
        .map_err(ApiError::storage)?;
    let Some((head, commits)) = found else {
        return Err(Refusal::Missing.into());
    };
    let mut out = String::new();
    for commit in commits {
        let author = (commit.author != server_replica()).then(|| commit.author.to_string());
        let line = json!({
            "seq": commit.seq,
            "change": commit.change.to_hex(),
            "author": author,
            "bytes": commit.bytes.map(|b| STANDARD.encode(b)),
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-ndjson"),
            ),
            (
                header::HeaderName::from_static("x-accord-head-seq"),
                HeaderValue::from(head),
            ),
        ],
        out,
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    #[serde(default)]
    doc: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default = "read_rights")]
    rights: Rights,
    #[serde(default)]
    ttl_secs: Option<u64>,
}

fn read_rights() -> Rights {
    Rights::Read
}

/// Whether `headers` carry an admin token: `ACCORD_ADMIN_TOKEN`, or the one derived from the
/// secret.
fn is_admin(shared: &Shared, headers: &HeaderMap) -> bool {
    let Some(given) = bearer(headers) else {
        return false;
    };
    let configured = shared.config.admin_token.as_ref().is_some_and(|admin| {
        !admin.0.is_empty() && auth::constant_time_eq(admin.0.as_bytes(), given.as_bytes())
    });
    let derived = match &shared.config.auth {
        AuthMode::Secret(secret) => {
            auth::constant_time_eq(auth::admin_token(secret).as_bytes(), given.as_bytes())
        }
        AuthMode::Disabled => false,
    };
    configured | derived
}

async fn mint_token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    if !is_admin(&shared, &headers) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "minting tokens needs the admin token (Authorization: Bearer)",
        ));
    }
    let AuthMode::Secret(secret) = &shared.config.auth else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "auth_disabled",
            "the server runs without a secret: there is nothing to sign tokens with",
        ));
    };
    let body = body.map_err(ApiError::body)?;
    let request: TokenBody = parse_json(&body, "bad_request")?;
    let scope = match (request.doc, request.prefix) {
        (Some(doc), None) => Scope::Document(parse_id(&doc)?),
        (None, Some(prefix)) => Scope::Prefix(prefix),
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "give exactly one of doc and prefix",
            ))
        }
    };
    let ttl = request.ttl_secs.unwrap_or(TOKEN_TTL_DEFAULT);
    if ttl == 0 || ttl > TOKEN_TTL_MAX {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("ttl_secs must be between 1 and {TOKEN_TTL_MAX}"),
        ));
    }
    let claims = Claims {
        scope,
        rights: request.rights,
        exp: auth::unix_now().saturating_add(ttl),
    };
    let token = auth::mint(secret, &claims);
    let body = json!({ "token": token, "exp": claims.exp });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}
