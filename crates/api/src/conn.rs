//! Keeps HTTP/1.1 keep-alive honest when a response is sent before its request body was read.
//!
//! Many answers are given without reading the body: a request without credentials is refused by
//! [`crate::auth`] before any handler runs, a bad path parameter before its JSON is parsed. The
//! HTTP server then drains only what has already arrived of the body and otherwise closes the
//! connection after the response, without saying so. A client that sent its headers and body in
//! two writes (Python's `http.client` does) may get the answer, put the connection back in its pool,
//! and lose its next request to that silent close. Worse, a client that sent `Expect: 100-continue`
//! and got a final answer sends no body at all and reuses the connection (botocore does): when the
//! server's drain runs after that client's next request has arrived, it takes the first bytes of
//! that request as the unread body (a `DELETE` is then parsed as `ELETE` and fails its signature).
//!
//! [`settle_body`] removes the race: a body whose declared length is at most [`PREREAD_MAX`] is
//! read in full before the request goes on (every JSON request of the API is that small), so the
//! connection stays reusable whatever the answer; a larger or unsized body (an image upload) is
//! streamed as before, and if the handler answers without reading it to its end the response says
//! `Connection: close`, so the client opens a new connection instead of reusing a dying one.
//!
//! Both endpoints use it: the API through [`settle_body`], the S3 endpoint through [`settle`] with
//! an S3-shaped error for a body that cannot be read.

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

/// Middleware for the API: see the module documentation.
pub async fn settle_body(req: Request, next: Next) -> Response {
    settle(req, next, |e| {
        ApiError::bad_request(
            "IMG.0001",
            format!("The request body could not be read: {e}"),
        )
        .into_response()
    })
    .await
}

/// Reads a small body in full before running `next`, or tracks a larger one (module
/// documentation); `unreadable` answers a small body that could not be read.
pub async fn settle(
    req: Request,
    next: Next,
    unreadable: impl FnOnce(axum::Error) -> Response,
) -> Response {
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
                Err(e) => unreadable(axum::Error::new(e)),
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
