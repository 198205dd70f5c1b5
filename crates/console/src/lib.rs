//! # openims-console
//!
//! The web console: a single-page app (source in `console/` at the workspace root) compiled by
//! `build.rs` at build time and embedded in the binary. [`routes`] serves it at `/console`.
//! The console has no API of its own: it signs in with `POST /v3/auth/tokens` and calls the
//! public IMS, Glance, jobs, usage and KMS APIs with `X-Auth-Token` (see docs/console.md).

use axum::body::Body;
use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

include!(concat!(env!("OUT_DIR"), "/assets.rs"));

/// Content-Security-Policy of every console response: nothing is loaded from anywhere but this
/// service, and no inline script runs.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

/// The embedded file at `path` (relative to `/console/`).
pub fn asset(path: &str) -> Option<&'static [u8]> {
    ASSETS.iter().find(|(p, _)| *p == path).map(|(_, b)| *b)
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" => "application/json",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn respond(path: &str, body: &'static [u8]) -> Response {
    let mut r = Response::new(Body::from(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    // Vite puts content hashes in the names under assets/; index.html must be revalidated.
    let cache = if path.starts_with("assets/") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

fn index() -> Response {
    respond("index.html", asset("index.html").unwrap_or_default())
}

async fn file(Path(path): Path<String>) -> Response {
    match asset(&path) {
        Some(b) => respond(&path, b),
        // A path without an extension is a page of the app (deep link): serve the app.
        None if !path.rsplit('/').next().unwrap_or("").contains('.') => index(),
        None => (StatusCode::NOT_FOUND, "no such console file").into_response(),
    }
}

/// `/console`, `/console/` and `/console/{file}`: no authentication (the app signs in itself).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/console", get(|| async { index() }))
        .route("/console/", get(|| async { index() }))
        .route("/console/{*path}", get(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_embeds_an_index_and_its_scripts() {
        let html = std::str::from_utf8(asset("index.html").expect("index.html")).unwrap();
        assert!(html.contains("/console/assets/"), "{html}");
        assert!(ASSETS.iter().any(|(p, _)| p.ends_with(".js")));
        assert!(ASSETS.iter().any(|(p, _)| p.ends_with(".css")));
        // No CDN: every script and stylesheet the page loads comes from this service.
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "{html}"
        );
    }
}
