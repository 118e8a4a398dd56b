//! The REST API end to end: create, apply ops, read JSON, the change feed, token minting, the
//! error cases, and a WebSocket subscriber seeing a change made over REST.

mod common;

use std::time::Duration;

use accord_engine::storage::MemoryStorage;
use accord_engine::{ChangeId, DocKind, DocumentId, Op, Path};
use accord_server::auth::{admin_token, AdminToken, Rights, Scope};
use base64::Engine;
use common::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

/// An error case: method, path, token, body, expected status and code.
type Case<'a> = (
    &'a str,
    String,
    Option<&'a str>,
    Option<Vec<u8>>,
    u16,
    &'a str,
);

async fn post_json(
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
    body: serde_json::Value,
) -> HttpResponse {
    http(addr, "POST", path, token, Some(body.to_string().as_bytes())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api_creates_applies_reads_feeds_and_mints() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), true);
    config.admin_token = Some(AdminToken("configured-admin".into()));
    config.max_rest_body_bytes = 16 << 10;
    let server = Server::start(config).await;
    let addr = server.addr;

    // Tokens: only an admin mints them.
    let body = json!({"prefix": "", "rights": "write"});
    let refused = post_json(addr, "/v1/tokens", None, body.clone()).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (401, "unauthorized")
    );
    let refused = post_json(addr, "/v1/tokens", Some("nope"), body.clone()).await;
    assert_eq!(refused.status, 401);
    let minted = post_json(addr, "/v1/tokens", Some(&admin_token(SECRET)), body.clone()).await;
    assert_eq!(minted.status, 201, "{}", minted.body);
    let writer = minted.json()["token"].as_str().unwrap().to_string();
    let minted = post_json(addr, "/v1/tokens", Some("configured-admin"), body).await;
    assert_eq!(minted.status, 201);
    let bad = post_json(
        addr,
        "/v1/tokens",
        Some("configured-admin"),
        json!({"rights": "read"}),
    )
    .await;
    assert_eq!((bad.status, bad.code().as_str()), (400, "bad_request"));
    let bad = http(
        addr,
        "POST",
        "/v1/tokens",
        Some("configured-admin"),
        Some(b"{"),
    )
    .await;
    assert_eq!((bad.status, bad.code().as_str()), (400, "bad_json"));

    // Create.
    let create = json!({"kind": "automerge"});
    let refused = post_json(addr, "/v1/documents", None, create.clone()).await;
    assert_eq!(refused.status, 401);
    let created = post_json(addr, "/v1/documents", Some(&writer), create).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.json()["id"].as_str().unwrap().to_string();
    let document: DocumentId = id.parse().unwrap();
    let again = post_json(
        addr,
        "/v1/documents",
        Some(&writer),
        json!({"kind": "yrs", "id": id}),
    )
    .await;
    assert_eq!((again.status, again.code().as_str()), (409, "exists"));
    for (body, code) in [
        (json!({"kind": "nope"}), "bad_request"),
        (json!({"kind": "yrs", "id": "not-a-uuid"}), "bad_id"),
    ] {
        let bad = post_json(addr, "/v1/documents", Some(&writer), body).await;
        assert_eq!((bad.status, bad.code()), (400, code.to_string()));
    }

    // A WebSocket subscriber follows the document.
    let mut subscriber = Client::new(MemoryStorage::new(), 5, replica_config(1 << 20));
    subscriber.connect(addr, Some(writer.clone())).await;
    subscriber
        .replica
        .create(document, DocKind::Automerge)
        .unwrap();
    subscriber.subscribe(document).await;
    assert!(
        subscriber
            .pump_until(WAIT, |c| c.is_subscribed(document))
            .await
    );

    // Apply ops over REST: committed, acknowledged and relayed.
    let changes = format!("/v1/documents/{id}/changes");
    let ops = json!([
        {"op": "put", "path": ["title"], "value": "Lisbon"},
        {"op": "put", "path": ["seats"], "value": {}},
        {"op": "increment", "path": ["views"], "by": 2},
    ]);
    let applied = post_json(addr, &changes, Some(&writer), ops).await;
    assert_eq!(applied.status, 200, "{}", applied.body);
    assert_eq!(applied.json()["seq"], 1);
    let rest_change = ChangeId::from_hex(applied.json()["change"].as_str().unwrap()).unwrap();
    assert!(
        subscriber
            .pump_until(WAIT, |c| {
                c.acks.get(&1) == Some(&rest_change)
                    && c.replica.json(document).unwrap()["title"] == "Lisbon"
            })
            .await,
        "the WebSocket subscriber sees the REST change: {:?}",
        subscriber.replica.json(document)
    );

    // A change from the WebSocket client, then the JSON over REST.
    let ops = vec![Op::Put {
        path: Path::keys(["seats", "12A"]),
        value: json!("ana"),
    }];
    subscriber.replica.change(document, &ops).unwrap();
    assert!(subscriber.pump_until(WAIT, |c| c.outbox_len() == 0).await);
    let read = http(
        addr,
        "GET",
        &format!("/v1/documents/{id}"),
        Some(&writer),
        None,
    )
    .await;
    assert_eq!(read.status, 200, "{}", read.body);
    let read = read.json();
    assert_eq!(read["head_seq"], 2);
    assert_eq!(read["kind"], "automerge");
    assert_eq!(
        read["state"],
        json!({"title": "Lisbon", "seats": {"12A": "ana"}, "views": 2})
    );

    // The change feed.
    let feed = http(
        addr,
        "GET",
        &format!("{changes}?since=0"),
        Some(&writer),
        None,
    )
    .await;
    assert_eq!(feed.status, 200, "{}", feed.body);
    assert!(feed
        .headers
        .to_ascii_lowercase()
        .contains("application/x-ndjson"));
    let lines = feed_lines(&feed.body);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["seq"], 1);
    assert_eq!(lines[0]["change"], rest_change.to_hex());
    assert!(
        lines[0]["author"].is_null(),
        "REST changes are the server's"
    );
    assert_eq!(lines[1]["seq"], 2);
    assert_eq!(lines[1]["change"], subscriber.acks[&2].to_hex());
    assert_eq!(lines[1]["author"], "05050505-0505-0505-0505-050505050505");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(lines[1]["bytes"].as_str().unwrap())
        .unwrap();
    assert!(!bytes.is_empty());
    let feed = http(
        addr,
        "GET",
        &format!("{changes}?since=1"),
        Some(&writer),
        None,
    )
    .await;
    assert_eq!(feed_lines(&feed.body).len(), 1);
    let feed = http(
        addr,
        "GET",
        &format!("{changes}?limit=1"),
        Some(&writer),
        None,
    )
    .await;
    assert_eq!(feed_lines(&feed.body)[0]["seq"], 1);
    assert_eq!(feed_lines(&feed.body).len(), 1);

    // Ops that change nothing commit nothing.
    let same = json!([{"op": "put", "path": ["title"], "value": "Lisbon"}]);
    let unchanged = post_json(addr, &changes, Some(&writer), same).await;
    assert_eq!(unchanged.status, 200);
    assert_eq!(unchanged.json()["seq"], serde_json::Value::Null);
    assert_eq!(unchanged.json()["head_seq"], 2);

    // Errors: JSON bodies with stable codes, never a panic.
    let reader = token(Scope::Prefix(String::new()), Rights::Read, 600);
    let other_doc = token(
        Scope::Document(DocumentId::from_bytes([9; 16])),
        Rights::Write,
        600,
    );
    let missing = DocumentId::from_bytes([8; 16]);
    let one_op = json!([{"op": "put", "path": ["x"], "value": 1}]);
    let cases: Vec<Case> = vec![
        (
            "POST",
            changes.clone(),
            Some(&reader),
            Some(one_op.to_string().into()),
            403,
            "forbidden",
        ),
        (
            "GET",
            format!("/v1/documents/{id}"),
            Some(&other_doc),
            None,
            403,
            "forbidden",
        ),
        (
            "GET",
            format!("/v1/documents/{id}"),
            None,
            None,
            401,
            "unauthorized",
        ),
        (
            "GET",
            format!("/v1/documents/{id}"),
            Some("x.y"),
            None,
            401,
            "unauthorized",
        ),
        (
            "GET",
            format!("/v1/documents/{missing}"),
            Some(&writer),
            None,
            404,
            "unknown_document",
        ),
        (
            "GET",
            format!("/v1/documents/{missing}/changes"),
            Some(&writer),
            None,
            404,
            "unknown_document",
        ),
        (
            "POST",
            format!("/v1/documents/{missing}/changes"),
            Some(&writer),
            Some(one_op.to_string().into()),
            404,
            "unknown_document",
        ),
        (
            "GET",
            "/v1/documents/nope".into(),
            Some(&writer),
            None,
            400,
            "bad_id",
        ),
        (
            "GET",
            format!("{changes}?since=-1"),
            Some(&writer),
            None,
            400,
            "bad_query",
        ),
        (
            "POST",
            changes.clone(),
            Some(&writer),
            Some(b"[{".to_vec()),
            400,
            "bad_json",
        ),
        (
            "POST",
            changes.clone(),
            Some(&writer),
            Some(b"[]".to_vec()),
            400,
            "bad_ops",
        ),
        (
            "POST",
            changes.clone(),
            Some(&writer),
            Some(br#"[{"op":"fly","path":[]}]"#.to_vec()),
            400,
            "bad_ops",
        ),
        (
            "POST",
            changes.clone(),
            Some(&writer),
            Some(br#"{"op":"put"}"#.to_vec()),
            400,
            "bad_ops",
        ),
        (
            "POST",
            changes.clone(),
            Some(&writer),
            Some(br#"[{"op":"put","path":["no","parent"],"value":1}]"#.to_vec()),
            422,
            "bad_ops",
        ),
        (
            "POST",
            changes.clone(),
            Some(&writer),
            Some(vec![b' '; 17 << 10]),
            413,
            "body_too_large",
        ),
    ];
    for (method, path, token, body, status, code) in cases {
        let response = http(addr, method, &path, token, body.as_deref()).await;
        assert_eq!(
            (response.status, response.code().as_str()),
            (status, code),
            "{method} {path}: {}",
            response.body
        );
    }
    let read = http(
        addr,
        "GET",
        &format!("/v1/documents/{id}"),
        Some(&writer),
        None,
    )
    .await;
    assert_eq!(
        read.json()["head_seq"],
        2,
        "failed requests committed nothing"
    );
    assert!(!subscriber.closed);
    server.stop().await;
}

#[tokio::test]
async fn rest_ops_on_yrs_are_all_or_nothing_and_work_without_auth() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), false);
    config.max_rest_in_flight = 1;
    let server = Server::start(config).await;
    let addr = server.addr;
    let document = DocumentId::from_bytes([4; 16]);
    let id = document.to_string();
    let create = json!({"kind": "yrs", "id": id});
    let created = post_json(addr, "/v1/documents", None, create).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let mut subscriber = Client::new(MemoryStorage::new(), 6, replica_config(1 << 20));
    subscriber.connect(addr, None).await;
    subscriber.replica.create(document, DocKind::Yrs).unwrap();
    subscriber.subscribe(document).await;
    assert!(
        subscriber
            .pump_until(WAIT, |c| c.is_subscribed(document))
            .await
    );
    let changes = format!("/v1/documents/{id}/changes");
    let ok = json!([{"op": "put", "path": ["m", "a"], "value": 1}]);
    let applied = post_json(addr, &changes, None, ok).await;
    assert_eq!(applied.status, 200, "{}", applied.body);
    assert_eq!(applied.json()["seq"], 1);
    let has = |want: serde_json::Value| {
        move |c: &mut Client<MemoryStorage>| c.replica.json(document).unwrap() == want
    };
    assert!(
        subscriber
            .pump_until(WAIT, has(json!({"m": {"a": 1}})))
            .await,
        "a Yrs subscriber sees the REST change"
    );
    // The first op applies, the second fails: nothing of it stays.
    let half = json!([
        {"op": "put", "path": ["m", "b"], "value": 2},
        {"op": "put", "path": ["m", "missing", "c"], "value": 3},
    ]);
    let refused = post_json(addr, &changes, None, half).await;
    assert_eq!((refused.status, refused.code().as_str()), (422, "bad_ops"));
    let read = http(addr, "GET", &format!("/v1/documents/{id}"), None, None).await;
    assert_eq!(read.json()["state"], json!({"m": {"a": 1}}));
    assert_eq!(read.json()["head_seq"], 1);
    let next = json!([{"op": "put", "path": ["m", "b"], "value": 2}]);
    let applied = post_json(addr, &changes, None, next).await;
    assert_eq!(applied.json()["seq"], 2, "{}", applied.body);
    let read = http(addr, "GET", &format!("/v1/documents/{id}"), None, None).await;
    assert_eq!(read.json()["state"], json!({"m": {"a": 1, "b": 2}}));
    assert!(
        subscriber
            .pump_until(WAIT, has(json!({"m": {"a": 1, "b": 2}})))
            .await
    );
    // One request in flight at most: a request stalled mid-body holds the only permit.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("POST {changes} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n[");
    tokio::io::AsyncWriteExt::write_all(&mut stalled, head.as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let busy = http(addr, "GET", &format!("/v1/documents/{id}"), None, None).await;
    assert_eq!((busy.status, busy.code().as_str()), (503, "overloaded"));
    drop(stalled);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let read = http(addr, "GET", &format!("/v1/documents/{id}"), None, None).await;
    assert_eq!(read.status, 200, "the permit is back");
    // Minting needs a secret to sign with.
    let minted = post_json(addr, "/v1/tokens", Some("x"), json!({"prefix": ""})).await;
    assert_eq!(minted.status, 401);
    server.stop().await;
}
