//! Keeps HTTP/1.1 keep-alive honest when a response is sent before its request body was read.
//!
//! Many answers are given without reading the body: a request without credentials is refused by
//! [`crate::auth`] before any handler runs, a bad path parameter before its JSON is parsed. The
//! HTTP server then drains only what has already arrived of the body and otherwise closes the
//! connection after the response, without saying so. A client that sent its headers and body in
//! two writes (Python's `http.client` does) may get the answer, put the connection back in its pool,
//! and lose its next request to that silent close.
//!
//! [`settle_body`] removes the race: a body whose declared length is at most [`PREREAD_MAX`] is
//! read in full before the request goes on (every JSON request of the API is that small), so the
//! connection stays reusable whatever the answer; a larger or unsized body (an image upload) is
//! streamed as before, and if the handler answers without reading it to its end the response says
//! `Connection: close`, so the client opens a new connection instead of reusing a dying one.

use crate::error::ApiError;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Largest declared body read in full before the request is handled.
pub const PREREAD_MAX: u64 = 256 * 1024;

/// Middleware: see the module documentation.
pub async fn settle_body(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    match declared {
        _ if chunked => tracked(req, next).await,
        None | Some(0) => next.run(req).await,
        Some(n) if n <= PREREAD_MAX => {
            let (parts, body) = req.into_parts();
            match http_body_util::Limited::new(body, PREREAD_MAX as usize)
                .collect()
                .await
            {
                Ok(c) => {
                    next.run(Request::from_parts(parts, Body::from(c.to_bytes())))
                        .await
                }
                Err(e) => ApiError::bad_request(
                    "IMG.0001",
                    format!("The request body could not be read: {e}"),
                )
                .into_response(),
            }
        }
        Some(_) => tracked(req, next).await,
    }
}

/// Runs the request with a body that records whether it was read to its end, and marks the
/// response `Connection: close` when it was not.
async fn tracked(req: Request, next: Next) -> Response {
    let ended = Arc::new(AtomicBool::new(false));
    let flag = ended.clone();
    let (parts, body) = req.into_parts();
    let stream = body
        .into_data_stream()
        .chain(futures::stream::poll_fn(move |_| {
            flag.store(true, Ordering::Release);
            std::task::Poll::Ready(None)
        }));
    let mut resp = next
        .run(Request::from_parts(parts, Body::from_stream(stream)))
        .await;
    if !ended.load(Ordering::Acquire) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
