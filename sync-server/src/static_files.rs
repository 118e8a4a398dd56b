//! Static files (the demo app) from a directory given by `--demo-dir` ([`crate::Config::demo_dir`]).
//!
//! Mounted as the router's fallback, so every route of the server keeps priority and nothing is
//! served when no directory is configured. `GET /` serves `index.html`; a directory serves its
//! `index.html`.
//!
//! Architecture Invariant: only a path made of plain segments (`[A-Za-z0-9._-]`, not starting with
//! a dot) is looked up, and the file found must canonicalize to a place inside the directory, so
//! neither `..`, percent-encoding, hidden files nor symlinks lead outside it. Paths and files have
//! a size bound; a file over it is refused rather than read.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;

/// The longest request path looked up, in bytes.
const PATH_BYTES_MAX: usize = 512;
/// Path segments looked up at most.
const SEGMENTS_MAX: usize = 16;
/// The largest file served, in bytes.
const FILE_BYTES_MAX: u64 = 32 << 20;

/// Adds the static file fallback to `router` when `directory` is set; otherwise returns it as is.
pub(crate) fn mount(router: Router, directory: Option<PathBuf>) -> Router {
    let Some(directory) = directory else {
        return router;
    };
    let directory = Arc::new(directory);
    router.fallback(move |request: Request<Body>| {
        let directory = directory.clone();
        async move { serve(&directory, request).await }
    })
}

async fn serve(directory: &Arc<PathBuf>, request: Request<Body>) -> Response {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let Some(relative) = relative_path(request.uri().path()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let directory = directory.clone();
    let found = tokio::task::spawn_blocking(move || read_inside(&directory, &relative)).await;
    match found {
        Ok(Ok((path, bytes))) => {
            let mut response = Response::new(Body::from(bytes));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(content_type(&path)),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            headers.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            response
        }
        Ok(Err(status)) => status.into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The request path as segments to join onto the directory, or `None` if it is not a plain path.
fn relative_path(uri_path: &str) -> Option<PathBuf> {
    if uri_path.len() > PATH_BYTES_MAX || !uri_path.starts_with('/') {
        return None;
    }
    let mut relative = PathBuf::new();
    let mut segments = 0;
    for segment in uri_path.split('/').filter(|s| !s.is_empty()) {
        let plain = segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !plain || segment.starts_with('.') {
            return None;
        }
        segments += 1;
        if segments > SEGMENTS_MAX {
            return None;
        }
        relative.push(segment);
    }
    Some(relative)
}

/// Reads `relative` (or its `index.html` if it is a directory) if it lies inside `directory`.
fn read_inside(directory: &Path, relative: &Path) -> Result<(PathBuf, Vec<u8>), StatusCode> {
    let root = directory
        .canonicalize()
        .map_err(|_| StatusCode::NOT_FOUND)?;
    let mut path = root
        .join(relative)
        .canonicalize()
        .map_err(|_| StatusCode::NOT_FOUND)?;
    if path.is_dir() {
        path = path
            .join("index.html")
            .canonicalize()
            .map_err(|_| StatusCode::NOT_FOUND)?;
    }
    if !path.starts_with(&root) {
        return Err(StatusCode::NOT_FOUND);
    }
    let metadata = std::fs::metadata(&path).map_err(|_| StatusCode::NOT_FOUND)?;
    if !metadata.is_file() {
        return Err(StatusCode::NOT_FOUND);
    }
    if metadata.len() > FILE_BYTES_MAX {
        return Err(StatusCode::PAYLOAD_TOO_LARGE);
    }
    let bytes = std::fs::read(&path).map_err(|_| StatusCode::NOT_FOUND)?;
    if bytes.len() as u64 > FILE_BYTES_MAX {
        return Err(StatusCode::PAYLOAD_TOO_LARGE);
    }
    Ok((path, bytes))
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "wasm" => "application/wasm",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "webmanifest" => "application/manifest+json",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_paths_are_looked_up() {
        assert_eq!(relative_path("/"), Some(PathBuf::new()));
        assert_eq!(relative_path("/app.js"), Some(PathBuf::from("app.js")));
        assert_eq!(
            relative_path("/pkg/a_b-c.wasm"),
            Some(PathBuf::from("pkg/a_b-c.wasm"))
        );
        for bad in [
            "/../etc/passwd",
            "/a/../../b",
            "/.git/config",
            "/%2e%2e/x",
            "/a\\b",
            "relative",
            "/a:b",
        ] {
            assert_eq!(relative_path(bad), None, "{bad}");
        }
        assert_eq!(relative_path(&format!("/{}", "a".repeat(600))), None);
        assert_eq!(relative_path(&"/a".repeat(17)), None);
    }

    #[test]
    fn files_outside_the_directory_are_not_served() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("demo");
        std::fs::create_dir_all(root.join("pkg")).unwrap();
        std::fs::write(root.join("index.html"), "<h1>demo</h1>").unwrap();
        std::fs::write(root.join("pkg/x.wasm"), [0u8, 97, 115, 109]).unwrap();
        std::fs::write(outer.path().join("secret"), "no").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(outer.path().join("secret"), root.join("link")).unwrap();

        let (path, bytes) = read_inside(&root, Path::new("")).unwrap();
        assert_eq!(bytes, b"<h1>demo</h1>");
        assert_eq!(content_type(&path), "text/html; charset=utf-8");
        let (path, _) = read_inside(&root, Path::new("pkg/x.wasm")).unwrap();
        assert_eq!(content_type(&path), "application/wasm");
        assert_eq!(
            read_inside(&root, Path::new("missing.js")).unwrap_err(),
            StatusCode::NOT_FOUND
        );
        #[cfg(unix)]
        assert_eq!(
            read_inside(&root, Path::new("link")).unwrap_err(),
            StatusCode::NOT_FOUND
        );
    }
}
